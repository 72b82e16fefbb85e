"""moex/model/lora.py: LoRA adapters on attention, dense blocks, shared and routed experts.

On every dispatch path and grouped-matmul backend: zero adapters (B = 0) give bitwise the
base model's logits and random ones change them; the merged model (W + scale * A B) equals
the unmerged one. Adapter gradients equal those of the base model run on merged weights
(autodiff through the merge: a dense W + scale * A B for every token), per target. A train
step changes no base weight, the trainable count is the formula's, and the step's program
computes no gradient of a base weight at all.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import tiny
from moex import config as config_lib
from moex.model import lora
from moex.parallel import mesh as mesh_lib
from moex.train import optimizer, state as state_lib, step as step_lib

nnx.use_eager_sharding(False)

D, F, E, R = 32, 24, 8, 4  # F != D: a [E, D, F] cotangent is told apart from [E, F, D]


def make_cfg(rank=R, targets="all", dispatch="dropless", backend="chunked", **moe):
  c = tiny.get_config()
  c.model.d_model, c.model.num_layers, c.model.num_heads = D, 3, 4
  c.model.num_kv_heads, c.model.head_dim, c.model.d_ff = 2, 8, 40
  c.model.first_dense_layers = 1
  c.moe.num_experts, c.moe.d_expert, c.moe.dispatch, c.moe.grouped_matmul = E, F, dispatch, backend
  c.moe.num_shared_experts, c.moe.d_shared = 1, 16
  c.moe.capacity_factor = 1.0  # drops on the capacity path
  for k, v in moe.items():
    c.moe[k] = v
  c.data.seq_len, c.data.batch_size = 16, 4
  c.lora.rank, c.lora.targets = rank, targets
  return config_lib.validate(c, vocab_size=259)


@functools.cache
def built(rank=R, targets="all", **moe):
  """(cfg, model, tx, step-0 state) of make_cfg(...), built once per run."""
  cfg = make_cfg(rank, targets, **moe)
  return (cfg, *build(cfg))


def build(cfg):
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  return model, tx, init_fn(0)


def randomized(params, seed=1, scale=0.3):
  """Random non-zero A and B (with B = 0 a forgotten adapter would look correct)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(size=x.shape) * scale / np.sqrt(x.shape[-1]),
                               x.dtype) if lora.is_adapter(tuple(k.key for k in p)) else x,
      params)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 17)), jnp.int32)
FEW = TOKENS[:1, :3]  # one sequence of 2 tokens: T*K < E, the decode-time "gather" path

# (name, moe overrides, train, tokens): every dispatch path, and the backends of dropless.
# The fast tier keeps one capacity, one dropless and the gather path.
_slow = pytest.mark.slow
PATHS = [
    ("capacity", dict(dispatch="capacity"), True, TOKENS),
    pytest.param("expert_choice", dict(router="expert_choice", allow_noncausal_routing=True),
                 True, TOKENS, marks=_slow),
    ("gather", dict(), False, FEW),
    ("dropless-chunked", dict(backend="chunked"), True, TOKENS),
] + [pytest.param(f"dropless-{b}", dict(backend=b), True, TOKENS, marks=_slow)
     for b in ("tiled", "blocked", "ragged_dot")]


@pytest.mark.parametrize("name,moe,train,tokens", PATHS,
                         ids=["capacity", "expert_choice", "gather", "dropless-chunked",
                              "dropless-tiled", "dropless-blocked", "dropless-ragged_dot"])
def test_zero_adapters_are_the_base_model_and_merged_equals_unmerged(name, moe, train, tokens):
  del name
  _, base_model, _, base_state = built(0, **moe)
  cfg, model, _, state = built(**moe)
  # Adapters draw from their own random stream: the base weights are the base model's.
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                   lora.base_of(state["params"]), base_state["params"]))

  def logits_fn(graphdef):
    rng = jax.random.PRNGKey(3)
    return jax.jit(lambda p, b: step_lib.forward(graphdef, p, b, tokens, train=train,
                                                 rng=rng)[0])

  base = logits_fn(base_model.graphdef)
  with_adapters = logits_fn(model.graphdef)
  want = base(base_state["params"], base_state["buffers"])
  assert np.array_equal(with_adapters(state["params"], state["buffers"]), want)

  params = randomized(state["params"])
  got = with_adapters(params, state["buffers"])
  assert float(jnp.max(jnp.abs(got - want))) > 1e-2  # the adapters are wired in
  merged = base(lora.merged(params, cfg.lora), base_state["buffers"])
  rel = float(jnp.max(jnp.abs(merged - got)) / jnp.max(jnp.abs(got)))
  assert rel <= 1e-5, rel


@pytest.mark.parametrize("dispatch", [pytest.param("dropless", marks=_slow), "capacity"])
def test_adapter_gradients_equal_the_merged_weights_reference(dispatch):
  """d loss / d (A, B) through the adapters == through the base model on W + scale * A B
  (autodiff of the merge), for every target's A and B (all targets on)."""
  cfg, model, _, state = built(dispatch=dispatch)
  base_cfg, base_model, _, _ = built(0, dispatch=dispatch)
  params = randomized(state["params"])
  adapters, base = lora.split(params, lora.is_adapter)
  rng = jax.random.PRNGKey(5)

  def loss(graphdef, p, c):
    return step_lib.loss_fn(p, state["buffers"], TOKENS, rng, graphdef=graphdef, cfg=c)[0]

  got = jax.grad(lambda a: loss(model.graphdef, lora.join(a, base), cfg))(adapters)
  want = jax.grad(lambda a: loss(base_model.graphdef,
                                 lora.merged(lora.join(a, base), cfg.lora), base_cfg))(adapters)
  targets = set()
  for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
    keys = tuple(k.key for k in path)
    w = want
    for k in keys:
      w = w[k]
    assert float(jnp.max(jnp.abs(w))) > 0, keys
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6, err_msg="/".join(keys))
    targets.add(next(k for k in keys if k.startswith(lora.PREFIX)))
  # every kind of adapter was compared: q k v o, dense/shared/expert gate up down
  assert targets == {"lora_q", "lora_k", "lora_v", "lora_o", "lora_gate", "lora_up",
                     "lora_down"}


def _count_formula(cfg) -> int:
  m, r = cfg.model, cfg.lora.rank
  d, ha, ja = m.d_model, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  attention = r * ((d + ha) + 2 * (d + ja) + (ha + d))
  swiglu = lambda f: 3 * r * (d + f)
  moe_layers = len(m.moe_layers)
  return (m.num_layers * attention + (m.num_layers - moe_layers) * swiglu(m.d_ff)
          + moe_layers * (3 * E * r * (d + F) + swiglu(16)))


def _outputs(jaxpr):
  """Every equation's output shapes, sub-jaxprs (loops, custom VJPs) included."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(getattr(v.aval, "shape", ()))
    for p in eqn.params.values():
      for j in (p if isinstance(p, (list, tuple)) else (p,)):
        inner = getattr(j, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          yield from _outputs(inner)
        elif hasattr(j, "eqns"):
          yield from _outputs(j)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_only_adapters_train_and_no_base_gradient_is_computed(dispatch):
  cfg, model, tx, state = built(dispatch=dispatch)
  assert lora.count(state["params"]) == _count_formula(cfg)
  assert state_lib.trainable_count(cfg, state["params"]) == _count_formula(cfg)
  core, _ = step_lib.make_train_step(cfg, model.graphdef, tx)
  step = jax.jit(core)
  new = state
  for _ in range(3):
    new, metrics = step(new, TOKENS)
  assert np.isfinite(float(metrics["scalars"]["loss"]))
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                      lora.base_of(new["params"]), lora.base_of(state["params"]))
  assert jax.tree.all(same)
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                       lora.adapters_of(new["params"]),
                                       lora.adapters_of(state["params"])))
  # The optimizer holds moments of the adapters only.
  assert sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim) == \
      2 * _count_formula(cfg)
  # No equation of the step makes an expert weight's cotangent ([E, D, F] or [E, F, D]);
  # the full fine-tune's step does (the control).
  expert_shapes = {(E, D, F), (E, F, D)}
  shapes = set(_outputs(jax.make_jaxpr(core)(state, TOKENS).jaxpr))
  assert not shapes & expert_shapes, shapes & expert_shapes
  full, full_model, full_tx, full_state = built(0, dispatch=dispatch)
  full_core, _ = step_lib.make_train_step(full, full_model.graphdef, full_tx)
  assert set(_outputs(jax.make_jaxpr(full_core)(full_state, TOKENS).jaxpr)) & expert_shapes


@pytest.mark.parametrize("overrides,message", [
    (dict(rank=4096), "lora.rank: 4096 is above the smaller side"),
    (dict(targets="attention,bogus"), "lora.targets: unknown target 'bogus'"),
    (dict(rank=-1), "lora.rank: must be an int >= 0"),
    (dict(scaling="sqrt"), "lora.scaling: unknown value 'sqrt'"),
    (dict(alpha=0.0), "lora.alpha: must be > 0"),
])
def test_bad_lora_config_is_one_line(overrides, message):
  c = tiny.get_config()
  c.lora.rank = 8
  for k, v in overrides.items():
    c.lora[k] = v
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, vocab_size=259)
  assert str(e.value).startswith(message), str(e.value)
  assert "\n" not in str(e.value)


def test_targets_the_model_lacks_are_refused():
  c = tiny.get_config()
  c.model.first_dense_layers = c.model.num_layers  # a dense model
  c.lora.rank, c.lora.targets = 4, "attention,experts"
  with pytest.raises(config_lib.ConfigError, match=r"^lora.targets: experts: the model has no "
                     r"MoE block \(routed experts\)$"):
    config_lib.validate(c, vocab_size=259)
  c.lora.targets = "shared"
  c.model.first_dense_layers = 0
  with pytest.raises(config_lib.ConfigError, match="^lora.targets: shared: the model has no "
                     "shared experts$"):
    config_lib.validate(c, vocab_size=259)
  c.lora.targets = "all"  # every target this model has
  assert config_lib.validate(c, vocab_size=259).lora.targets == "q,k,v,o,experts"


def test_a_config_without_a_lora_section_has_no_adapters():
  c = tiny.get_config()
  del c["lora"]
  cfg = config_lib.validate(c, vocab_size=259)
  assert not cfg.lora.enabled and lora.partition({"a": 1}, cfg.lora) == ({"a": 1}, {})


def test_rslora_scale():
  cfg = dataclasses.replace(config_lib.LoRAConfig(), rank=16, alpha=32.0)
  assert cfg.scale == 2.0
  assert dataclasses.replace(cfg, scaling="rslora").scale == 8.0


@pytest.mark.slow
@pytest.mark.xdist_group("lora_parallel")
def test_expert_parallel_meshes_give_the_one_device_losses_and_adapters():
  """tests/multidevice/lora_equivalence.py: 1 device vs (expert=8), (data=2, expert=4),
  (data=2, expert=2, tensor=2) on the dropless path and (expert=8) on the capacity path."""
  import multidevice_run  # pylint: disable=g-import-not-at-top
  stdout, rows = multidevice_run.run("lora_equivalence.py")
  assert len(rows) == 4, stdout
  for row in rows:
    where = f"{row['dispatch']} on {row['mesh']}"
    np.testing.assert_allclose(row["losses"], row["one_device"], rtol=2e-5, err_msg=where)
    assert row["adapters"] <= 1, where  # within ep_equivalence.compare's tolerance
    assert row["adapters_moved"], where  # B left zero: the comparison would be vacuous
