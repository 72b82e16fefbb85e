"""moex/train/footprint.py (and moex.model.params counts): Mixtral 8x7B's parameters and what each device
holds on a mesh, computed without allocating a parameter."""

import functools
import math

import jax
import pytest
from jax.sharding import AbstractMesh

from experiments import mixtral_8x7b, tiny
from moex import config as config_lib
from moex.model import params
from moex.train import footprint, optimizer, state as state_lib

@functools.lru_cache(maxsize=None)
def _footprint(devices: int, **mesh) -> footprint.Footprint:
  """footprint.footprint of Mixtral on `devices` with mesh overrides (each computed once)."""
  return footprint.footprint(_mixtral(**mesh), devices)


def _mixtral(**mesh):
  cd = mixtral_8x7b.get_config()
  for k, v in mesh.items():
    cd.mesh[k] = v
  return config_lib.validate(cd)


def test_mixtral_counts_its_published_total_and_active_parameters():
  counts = params.counts(_mixtral())
  total = sum(c.total for c in counts.values())
  active = sum(c.active for c in counts.values())
  assert total == pytest.approx(46.7e9, rel=0.01)
  assert active == pytest.approx(12.9e9, rel=0.01)
  assert counts["routed_experts"].total == 32 * 8 * 3 * 4096 * 14336
  assert counts["routed_experts"].active == counts["routed_experts"].total // 4  # top-2 of 8


def _model_elements(cfg) -> dict[str, int]:
  """Elements per part of the model's own (abstract) parameters."""
  tx, _ = optimizer.make(cfg.opt, cfg.train.steps)
  model, _ = state_lib.build(cfg, tx, AbstractMesh((1, 1, 1, 1), config_lib.MESH_AXES))
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(model.abstract_state["params"])[0]:
    part = params.part_of(tuple(k.key for k in path), cfg.model)
    out[part] = out.get(part, 0) + math.prod(leaf.shape)
  return out


def _tiny_with_every_part(qk_norm: str = "none"):
  cd = tiny.get_config()
  cd.model.first_dense_layers, cd.moe.num_shared_experts, cd.moe.d_shared = 1, 2, 64
  cd.model.qk_norm = qk_norm
  return config_lib.validate(cd, vocab_size=259)


@pytest.mark.parametrize("make", [
    _mixtral, _tiny_with_every_part, lambda: _tiny_with_every_part("head"),
    lambda: _tiny_with_every_part("full")], ids=["mixtral", "tiny", "tiny-qk-head", "tiny-qk-full"])
def test_the_count_is_the_models_own(make):
  cfg = make()
  want = {k: c.total for k, c in params.counts(cfg).items() if c.total}
  assert _model_elements(cfg) == want


def test_footprint_allocates_no_parameter():
  before = sum(x.nbytes for x in jax.live_arrays())
  fp = footprint.footprint(_mixtral(), 64)
  assert sum(x.nbytes for x in jax.live_arrays()) - before < 2 ** 20
  assert fp.mesh == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}  # fsdp=-1 from 64
  assert fp.total_params == sum(c.total for c in params.counts(_mixtral()).values())


def test_expert_bytes_halve_when_the_expert_axis_doubles():
  four, eight = _footprint(32, expert=4, fsdp=8), _footprint(64)
  assert four.param_bytes["routed_experts"] == 2 * eight.param_bytes["routed_experts"]
  assert four.param_bytes["attention"] == eight.param_bytes["attention"]  # split over fsdp
  # bf16, [E, D, F] over expert x fsdp: 32 layers x 3 x (8/8) x (4096/8) x 14336 x 2 bytes.
  assert eight.param_bytes["routed_experts"] == 32 * 3 * 512 * 14336 * 2
  # mu and nu in the parameters' dtype, and optax's step counts (replicated int32 scalars).
  assert 0 < eight.opt_bytes - 2 * sum(eight.param_bytes.values()) <= 16


def test_activation_estimate_follows_remat_and_batch():
  full = _footprint(64)
  b, l = full.tokens
  assert (b, l) == (256 // 64, 4096)
  assert full.activations[0].bytes == 32 * 2 * b * l * 4096  # remat=full: bf16 block inputs

  cd = tiny.get_config()  # remat "none", float32, 16 x 256 tokens on one device
  none = footprint.footprint(config_lib.validate(cd, vocab_size=259), 1)
  cd.model.remat = "full"
  remat = footprint.footprint(config_lib.validate(cd, vocab_size=259), 1)
  assert none.activations[0].bytes == 4 * remat.activations[1].bytes  # 4 blocks' full sets
  assert len(none.activations) == len(remat.activations) - 1  # nothing recomputed
  assert remat.activation_bytes < none.activation_bytes
  cd.data.batch_size = 8
  half = footprint.footprint(config_lib.validate(cd, vocab_size=259), 1)
  assert half.tokens == (8, 256)
  for a, b in zip(half.activations, remat.activations):
    assert 2 * a.bytes == b.bytes, a.name  # every term is linear in the batch


def test_report_says_whether_it_fits():
  fp = _footprint(64)
  fits = footprint.report(fp, "mixtral", memory_gib=95).splitlines()[-1]
  assert fits == f"fits in 95 GiB per device ({fp.total_bytes / (95 * 2 ** 30):.0%} of it)"
  assert footprint.report(fp, "mixtral", memory_gib=16).splitlines()[-1].startswith(
      "does not fit in 16 GiB per device")


def test_describe_refuses_a_bad_device_count_or_memory_in_one_line():
  cd = mixtral_8x7b.get_config()
  for devices, memory, line in [
      (None, None, "--devices: needed to resolve mesh.fsdp=-1"),
      (0, None, "--devices=0: must be at least 1"),
      (64, float("nan"), "--device_memory_gb=nan: must be a finite number of GiB above 0"),
      (64, float("inf"), "--device_memory_gb=inf: must be a finite number of GiB above 0"),
      (64, 0.0, "--device_memory_gb=0.0: must be a finite number of GiB above 0")]:
    with pytest.raises(footprint.FootprintError) as e:
      footprint.describe(cd, "mixtral", devices, memory)
    assert str(e.value) == line
  with pytest.raises(config_lib.ConfigError, match="mesh.fsdp: -1 cannot fill 12 devices"):
    footprint.describe(cd, "mixtral", 12)


def test_an_adapter_run_shows_its_memory_beside_a_full_fine_tune():
  """LoRA: gradients and optimizer state of the adapters only, the adapters' own bytes,
  and a full fine-tune of the same model on the same mesh for comparison."""
  cd = tiny.get_config()
  cd.lora.rank, cd.lora.targets = 16, "attention,experts"
  fp = footprint.footprint(config_lib.validate(cd, vocab_size=259), 1)
  full = fp.full
  assert full is not None and full.full is None
  n = fp.trainable_params
  assert fp.adapter_bytes == fp.grad_bytes == 4 * n  # float32, one device
  assert 2 * 4 * n <= fp.opt_bytes < 2 * 4 * n + 64  # mu and nu of the adapters (+ counts)
  assert full.grad_bytes == sum(full.param_bytes.values()) > 4 * fp.grad_bytes
  text = footprint.report(fp, "lora")
  assert f"LoRA adapters" in text and f"({n:,} trainable parameters)" in text
  assert "a full fine-tune of the same model: gradients" in text
