"""experiments/*.py: every config validates and documents its command."""

import importlib
import pathlib

import pytest

from moex import config as config_lib
from moex.train import flops

EXPERIMENTS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "experiments")
                     .glob("*.py") if p.stem != "__init__")
VARIANTS = {"bench_cpu": [None, "dropless"],
            "mixtral_gpu": [None, "dropless", "dropless_chunked"]}
for _name in EXPERIMENTS:  # configs run by moex.sweep list their variants
  _variants = getattr(importlib.import_module(f"experiments.{_name}"), "VARIANTS", None)
  if _variants:
    VARIANTS[_name] = [None, *_variants]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_validates_and_names_its_command(name):
  module = importlib.import_module(f"experiments.{name}")
  assert "python -m moex." in module.__doc__
  for arg in VARIANTS.get(name, [None]):
    cfg = config_lib.validate(module.get_config(arg), vocab_size=259)
    assert flops.train_flops_per_token(cfg) > 0


def test_mixtral_gpu_has_mixtral_layer_widths():
  from experiments import mixtral_gpu
  cfg = config_lib.validate(mixtral_gpu.get_config(), vocab_size=259)
  active = flops.active_params_per_token(cfg)
  per_layer_experts = active["routed_experts"] / cfg.model.num_layers
  assert per_layer_experts == 2 * 3 * 4096 * 14336  # two of Mixtral's experts per token


def test_mixtral_gpu_step_traces_without_allocating():
  """The GPU config cannot run here (2.9B float32 parameters); its step must still trace."""
  import jax
  import numpy as np
  from experiments import mixtral_gpu
  from moex.parallel import mesh as mesh_lib, sharding
  from moex.train import optimizer, state as state_lib, step as step_lib

  cfg = config_lib.validate(mixtral_gpu.get_config("dropless"), vocab_size=259)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  tx, _ = optimizer.make(cfg.opt, cfg.train.steps)
  model, _ = state_lib.build(cfg, tx, mesh)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.abstract_state["params"]))
  assert 3.0e9 < params < 3.3e9  # 3.16B: 2 x 1.4B of experts + 262M of embeddings
  tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), np.int32)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    core, _ = step_lib.make_train_step(cfg, model.graphdef, tx)
    lowered = jax.jit(core).lower(model.abstract_state, tokens)
  assert "bf16" in lowered.as_text()


def test_sweep_variants_differ_where_they_say():
  from experiments import balancing, capacity_sweep
  cf = {v: capacity_sweep.get_config(v).moe for v in capacity_sweep.VARIANTS}
  assert [cf[v].capacity_factor for v in ("1.0", "1.25", "2.0")] == [1.0, 1.25, 2.0]
  assert cf["dropless"].dispatch == "dropless" and cf["1.0"].dispatch == "capacity"
  with pytest.raises(ValueError, match="capacity_sweep"):
    capacity_sweep.get_config("big")
  from experiments import sparse_vs_dense
  svd = {v: sparse_vs_dense.get_config(v).model for v in sparse_vs_dense.VARIANTS}
  assert svd["dense"].first_dense_layers == svd["dense"].num_layers
  assert svd["moe"].first_dense_layers < svd["moe"].num_layers
  assert svd["moe"].d_ff == svd["dense"].d_ff == 2 * sparse_vs_dense.get_config().moe.d_expert
  bal = {v: balancing.get_config(v).moe for v in balancing.VARIANTS}
  assert [bal[v].load_balance_weight for v in balancing.VARIANTS] == [0.0, 1e-2, 0.0, 0.0]
  assert bal["aux_free"].router == "sigmoid_bias" and bal["none"].router == "topk_softmax"
  assert bal["aux_free_fast"].router == "sigmoid_bias"
  assert bal["aux_free_fast"].bias_update_rate == 10 * bal["aux_free"].bias_update_rate
  assert all(m.z_loss_weight == 0 for m in bal.values())


@pytest.mark.parametrize("suffix", ["", "_x3"])
def test_upcycling_spends_the_same_extra_compute_three_ways(suffix):
  from experiments import upcycling
  per_step = {}
  for v in upcycling.VARIANTS + upcycling.LONGER:
    c = upcycling.get_config(v)
    cfg = config_lib.validate(c, vocab_size=259)
    per_step[v] = (c.train.steps, flops.train_flops_per_token(cfg) * c.data.batch_size *
                   c.data.seq_len, cfg.model.moe_layers)
  total = lambda v: per_step[v][0] * per_step[v][1]
  extra = total("dense_continue" + suffix)
  assert extra == total("dense_continue") * (3 if suffix else 1)
  for v in ("copy", "drop")[:2 if not suffix else 1]:  # within half an MoE step's FLOPs
    v += suffix
    assert abs(total(v) - extra) <= per_step[v][1] / 2 and per_step[v][2] == (0, 1, 2, 3)
  scratch = "scratch" + suffix
  assert abs(total(scratch) - total("dense") - extra) <= per_step[scratch][1] / 2
  assert per_step["dense"][2] == per_step["dense_continue" + suffix][2] == ()
  assert set(upcycling.INIT_FROM) == set(upcycling.UPCYCLE) | {"dense_continue" + suffix
                                                               for suffix in ("", "_x3")}
  with pytest.raises(ValueError, match="upcycling"):
    upcycling.get_config("big")
