"""moex/config.py: every bad value fails before compiling, with one line naming the key."""

import subprocess
import sys

import pytest

from experiments import tiny
from moex import config as config_lib


def _set(cd, key, value):
  section, name = key.split(".")
  with cd.unlocked():
    cd[section][name] = value
  return cd


def test_default_config_validates():
  cfg = config_lib.validate(tiny.get_config(), vocab_size=259)
  assert cfg.model.vocab_size == 259
  assert cfg.model.moe_layers == (0, 1, 2, 3)
  assert cfg.moe.capacity(256, 1.25) == 80  # ceil(1.25 * 256 * 2 / 8)


@pytest.mark.parametrize("key,value,fragment", [
    ("moe.top_k", 10, "moe.top_k: 10 must be <= moe.num_experts=8"),
    ("moe.capacity_factor", 0.0, "moe.capacity_factor: must be > 0"),
    ("moe.capacity_factor", -1.0, "moe.capacity_factor: must be > 0"),
    ("moe.router", "nope", "moe.router: unknown value 'nope'"),
    ("moe.dispatch", "magic", "moe.dispatch: unknown value 'magic'"),
    ("moe.grouped_matmul", "cuda", "moe.grouped_matmul: unknown value 'cuda'"),
    ("model.num_kv_heads", 3, "model.num_kv_heads: 3 does not divide"),
    ("data.val_fraction", 1.5, "data.val_fraction"),
    ("mesh.expert", 0, "mesh.expert"),
    ("train.steps", 0, "train.steps: must be > 0"),
])
def test_bad_values_name_the_key(key, value, fragment):
  with pytest.raises(config_lib.ConfigError, match="^" + fragment.split(":")[0]) as e:
    config_lib.validate(_set(tiny.get_config(), key, value), vocab_size=259)
  assert fragment in str(e.value)
  assert "\n" not in str(e.value)


def test_unknown_key_is_an_error():
  cd = tiny.get_config()
  with cd.unlocked():
    cd.moe.num_expert = 4  # typo
  with pytest.raises(config_lib.ConfigError, match="moe.num_expert: unknown key"):
    config_lib.validate(cd)


def _main(tmp_path, *overrides, env=None):
  cmd = [sys.executable, "-m", "moex.main", "--config=experiments/tiny.py",
         f"--workdir={tmp_path / 'w'}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        cwd=str(config_lib.__file__).rsplit("/moex/", 1)[0], env=env)


@pytest.mark.slow
def test_main_exits_with_one_line_for_bad_value(tmp_path):
  r = _main(tmp_path, "--config.moe.top_k=9")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last == "moex: config error: moe.top_k: 9 must be <= moe.num_experts=8"


@pytest.mark.slow
def test_main_exits_with_one_line_for_missing_data(tmp_path):
  r = _main(tmp_path, f"--config.data.source={tmp_path}/nothing/*.txt")
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith("moex: config error: data.source:")


@pytest.mark.slow
def test_main_exits_with_one_line_when_data_is_too_small(tmp_path):
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "b.py").write_text("y = 2\n")
  r = _main(tmp_path, f"--config.data.source={tmp_path}/*.py",
            f"--config.data.cache_dir={tmp_path}/cache")
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith("moex: config error: data.batch_size:")


# ---------------------------------------------------------------------------------------
# Keys validate used to miss.


def test_missing_seed_is_a_config_error():
  cd = tiny.get_config()
  del cd["seed"]
  with pytest.raises(config_lib.ConfigError, match="^seed: missing$"):
    config_lib.validate(cd, vocab_size=259)


@pytest.mark.parametrize("key,value,fragment", [
    ("opt.b1", 1.0, "opt.b1: must be in [0, 1), got 1.0"),
    ("opt.b1", -0.1, "opt.b1: must be in [0, 1), got -0.1"),
    ("opt.b2", 1.0, "opt.b2: must be in [0, 1), got 1.0"),
    ("opt.weight_decay", -0.1, "opt.weight_decay: must be >= 0, got -0.1"),
    ("data.val_fraction", 0.0, "data.val_fraction: must be in (0, 1), got 0.0"),
    ("data.val_fraction", 1.0, "data.val_fraction: must be in (0, 1), got 1.0"),
    ("opt.schedule", "linear", "opt.schedule: unknown value 'linear' (known: cosine, wsd)"),
    ("opt.decay_fraction", 0.0, "opt.decay_fraction: must be in (0, 1], got 0.0"),
    ("opt.decay_fraction", 1.5, "opt.decay_fraction: must be in (0, 1], got 1.5"),
    ("model.qk_norm", "layer", "model.qk_norm: unknown value 'layer' (known: none, head, full)"),
    ("model.dense_layers", (1, 4), "model.dense_layers: block 4 is not in [0, "
     "model.num_layers=4)"),
    ("model.dense_layers", (1, "a"), "model.dense_layers: must be a list of block indices, got "
     "(1, 'a')"),
])
def test_optimizer_and_data_ranges(key, value, fragment):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_set(tiny.get_config(), key, value), vocab_size=259)
  assert str(e.value) == fragment


@pytest.mark.parametrize("prepared,weights,message", [
    ("a,b", "1,2,3", "data.mixture_weights: 3 weights for 2 data.prepared directories"),
    ("a,b", "1,0", "data.mixture_weights: must all be finite and > 0, got '1,0'"),
    ("a,b", "1,x", "data.mixture_weights: '1,x' is not comma-separated numbers"),
    ("", "1", "data.mixture_weights: set without data.prepared"),
    ("a,a", "", "data.prepared: lists a directory twice: ('a', 'a')"),
])
def test_prepared_data_fields(prepared, weights, message):
  cd = _set(_set(tiny.get_config(), "data.prepared", prepared), "data.mixture_weights", weights)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cd, vocab_size=259)
  assert str(e.value) == message


def test_prepared_weights_are_normalized_and_default_equal():
  cd = tiny.get_config()
  assert config_lib.validate(cd, vocab_size=259).data.prepared_dirs == ()  # off by default
  cd = _set(cd, "data.prepared", " a , gs://b/c ")
  assert config_lib.validate(cd, vocab_size=259).data.weights == (0.5, 0.5)
  cfg = config_lib.validate(_set(cd, "data.mixture_weights", "3,1"), vocab_size=259)
  assert cfg.data.prepared_dirs == ("a", "gs://b/c") and cfg.data.weights == (0.75, 0.25)


def test_dense_layers_override_the_moe_pattern():
  cd = _set(tiny.get_config(), "model.dense_layers", [2, 0])
  cfg = config_lib.validate(cd, vocab_size=259)
  assert cfg.model.moe_layers == (1, 3)
  assert cfg.model.dense_layers == (0, 2)


def test_init_from_must_be_a_path_string():
  cd = tiny.get_config()
  assert config_lib.validate(cd, vocab_size=259).train.init_from == ""  # off by default
  with cd.unlocked():
    del cd.train["init_from"]
    cd.train.init_from = 3
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cd, vocab_size=259)
  assert str(e.value) == ("train.init_from: must be a str (a workdir path or gs:// URL; '' = "
                          "off), got 3")


def test_rules_name_known_logical_axes():
  cd = tiny.get_config()
  cd.mesh.rules = tuple(cd.mesh.rules) + (("experts", "expert"),)  # typo of "expert"
  with pytest.raises(config_lib.ConfigError, match=r"^mesh\.rules\[experts\]: unknown "
                     r"logical axis 'experts' \(known: batch, "):
    config_lib.validate(cd, vocab_size=259)


def test_every_parameter_logical_axis_is_known():
  """LOGICAL_AXES cannot go stale: every name a parameter carries is in it."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from moex.model import decoder  # pylint: disable=g-import-not-at-top
  # Imported as the trainer does: it turns off flax's eager sharding, which needs a mesh.
  from moex.train import state as _  # pylint: disable=g-import-not-at-top,unused-import

  cd = tiny.get_config()
  cd.model.num_layers, cd.model.first_dense_layers = 2, 1  # a dense block and an MoE one
  cd.moe.router, cd.moe.num_shared_experts = "sigmoid_bias", 1  # router bias, shared expert
  cfg = config_lib.validate(cd, vocab_size=259)
  model = nnx.eval_shape(lambda: decoder.Decoder(cfg.model, cfg.moe, nnx.Rngs(0)))
  variables = jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))
  names = {n for v in variables for n in (v.get_metadata().get("out_sharding") or ())}
  names.discard(None)
  assert {"vocab", "embed", "heads", "kv_heads", "mlp", "expert", "expert_mlp"} <= names
  assert names <= set(config_lib.LOGICAL_AXES), names - set(config_lib.LOGICAL_AXES)


# ---------------------------------------------------------------------------------------
# MoE defaults: one source, MoEConfig.


def test_tiny_moe_section_holds_every_moe_field():
  """Every MoEConfig field is in the experiment's ConfigDict: --config.moe.KEY=V works."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  fields = [f.name for f in dataclasses.fields(config_lib.MoEConfig)]
  assert sorted(tiny.get_config().moe.keys()) == sorted(fields)


def test_tiny_moe_values_are_pinned():
  """The tiny experiment's MoE values; changing one moves its trained numbers."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  cfg = config_lib.validate(tiny.get_config(), vocab_size=259)
  assert dataclasses.asdict(cfg.moe) == dict(
      num_experts=8, top_k=2, d_expert=256, router="topk_softmax", dispatch="capacity",
      capacity_factor=1.25, eval_capacity_factor=0.0, min_capacity=4, drop_policy="position",
      renormalize_after_drop=False, renormalize=False, jitter=0.0, bias_update_rate=1e-3,
      num_groups=1, topk_groups=1, routed_scaling=1.0, allow_noncausal_routing=False,
      num_shared_experts=0, d_shared=0, load_balance_weight=1e-2, seq_load_balance_weight=0.0,
      z_loss_weight=1e-3, aux_reduce="mean", grouped_matmul="auto", ep_buffer_factor=0.0,
      stats_max_experts=64)


def test_every_moe_field_is_documented_in_the_dataclass():
  import dataclasses  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top
  lines = inspect.getsource(config_lib.MoEConfig).splitlines()
  for f in dataclasses.fields(config_lib.MoEConfig):
    line = next(s for s in lines if s.strip().startswith(f"{f.name}:"))
    assert "#" in line, f"MoEConfig.{f.name} has no comment"


# ---------------------------------------------------------------------------------------
# Routing checks (moved from tests/moe_balancing_test.py).


def _validate(**moe):
  cd = tiny.get_config()
  for k, v in moe.items():
    cd.moe[k] = v
  return config_lib.validate(cd, vocab_size=259)


def test_expert_choice_needs_allow_noncausal_routing():
  with pytest.raises(config_lib.ConfigError, match=r"^moe\.router: .*allow_noncausal_routing"):
    _validate(router="expert_choice")
  assert _validate(router="expert_choice", allow_noncausal_routing=True).moe.router == \
      "expert_choice"


def test_switch_needs_top_k_one():
  with pytest.raises(config_lib.ConfigError, match=r"^moe\.top_k: "):
    _validate(router="switch", top_k=2)
  assert _validate(router="switch", top_k=1).moe.top_k == 1


def test_switch_refuses_renormalize():
  with pytest.raises(config_lib.ConfigError, match=r"^moe\.renormalize: "):
    _validate(router="switch", top_k=1, renormalize=True)


def test_config_accepts_chunked_grouped_matmul():
  assert _validate(dispatch="dropless", grouped_matmul="chunked").moe.grouped_matmul == \
      "chunked"


def test_capacity_arithmetic_and_min_capacity():
  cap = lambda s, k, e, cf, m: config_lib.MoEConfig(
      num_experts=e, top_k=k, min_capacity=m).capacity(s, cf)
  assert cap(8, 2, 4, 1.0, 0) == 4  # ceil(1.0 * 8 * 2 / 4)
  assert cap(8, 2, 4, 1.25, 0) == 5
  assert cap(8, 2, 4, 0.01, 0) == 1  # never below 1 when anything is routed
  assert cap(8, 2, 4, 0.01, 3) == 3  # min_capacity wins
  assert cap(8, 2, 4, 2.0, 3) == 8  # ... only when larger
  assert cap(3, 2, 8, 1.0, 4) == 4  # ceil(0.75) = 1 < 4
  # The module-level formula is the same one (moex.report recomputes capacities with it).
  assert config_lib.capacity(1.25, 8, 2, 4, 0) == 5
  assert config_lib.capacity(0.01, 8, 2, 4, 3) == 3


def test_a_section_that_is_not_a_configdict_names_it():
  cd = tiny.get_config()
  del cd["opt"]
  cd.opt = 3
  with pytest.raises(config_lib.ConfigError, match=r"^opt: must be a section \(ConfigDict\), "
                     r"got 3$"):
    config_lib.validate(cd, vocab_size=259)


def _float_keys() -> list[str]:
  """Every float field of every section of the tiny config."""
  cd = tiny.get_config()
  return [f"{s}.{k}" for s in ("model", "moe", "data", "opt", "train")
          for k, v in cd[s].items() if isinstance(v, float)]


def test_float_keys_cover_every_section_with_floats():
  keys = _float_keys()
  assert {"opt.learning_rate", "opt.eps", "opt.grad_clip", "model.rope_theta",
          "moe.capacity_factor", "data.val_fraction", "train.progress_seconds"} <= set(keys)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("key", _float_keys())
def test_every_float_must_be_finite(key, value):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_set(tiny.get_config(), key, value), vocab_size=259)
  assert str(e.value) == f"{key}: must be finite, got {value!r}"


@pytest.mark.parametrize("key", ["document_mask", "document_positions"])
def test_document_flags_are_bools_on_by_default(key):
  cd = tiny.get_config()
  assert getattr(config_lib.validate(cd, vocab_size=259).data, key) is True
  with cd.unlocked():
    del cd.data[key]
  assert getattr(config_lib.validate(cd, vocab_size=259).data, key) is True  # old configs
  with cd.unlocked():
    cd.data[key] = "yes"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cd, vocab_size=259)
  assert str(e.value) == f"data.{key}: must be True or False, got 'yes'"
