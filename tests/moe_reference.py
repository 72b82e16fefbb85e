"""A deliberately slow, plain reference of the MoE block, for the moe_*_test.py files.

Written token by token and choice by choice, with none of the buffers, sorts or grouped
matmuls of moex/moe, so a test that agrees with it checks the fast paths against the
definition. Pure jnp: jax.grad works through it (the routing decisions are discrete).
The end of the file is the harness the tests share: small configs and weights, an MoEBlock
holding given weights, jitted runs of block and reference, and their comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def route_token(x_D: jax.Array, w_router_DxE: jax.Array,
                top_k: int) -> tuple[jax.Array, jax.Array]:
  """Mixtral routing of one token: (expert ids [K] best first, weights [K])."""
  logits_E = jnp.dot(x_D.astype(jnp.float32), w_router_DxE.astype(jnp.float32))
  # Stable sort on the negated logits: ties go to the lower expert id.
  experts_K = jnp.argsort(-logits_E, stable=True)[:top_k]
  return experts_K, jax.nn.softmax(logits_E[experts_K])


def expert_ffn(x_D: jax.Array, wg_DxF: jax.Array, wu_DxF: jax.Array,
               wd_FxD: jax.Array) -> jax.Array:
  """One SwiGLU expert on one token."""
  return (jax.nn.silu(x_D @ wg_DxF) * (x_D @ wu_DxF)) @ wd_FxD


def kept_mask_numpy(experts_BxLxK: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
  """Which assignments survive: per sequence, choice 0 of every token before choice 1, ...

  Within a choice, earlier positions first; expert e keeps its first `capacity`.
  """
  b, l, k = experts_BxLxK.shape
  kept_BxLxK = np.zeros((b, l, k), bool)
  for bi in range(b):
    taken_E = [0] * num_experts  # assignments this sequence has sent to each expert so far
    for ki in range(k):
      for t in range(l):
        e = int(experts_BxLxK[bi, t, ki])
        kept_BxLxK[bi, t, ki] = taken_E[e] < capacity
        taken_E[e] += 1
  return kept_BxLxK


def kept_mask(experts_BxLxK: jax.Array, num_experts: int, capacity: int | None) -> jax.Array:
  """kept_mask_numpy as a jax op (a host callback), usable under jit and grad."""
  if capacity is None:
    return jnp.ones(experts_BxLxK.shape, bool)
  return jax.pure_callback(
      lambda ex: kept_mask_numpy(np.asarray(ex), num_experts, capacity),
      jax.ShapeDtypeStruct(experts_BxLxK.shape, jnp.bool_),
      jax.lax.stop_gradient(experts_BxLxK))


def reference_moe(x_BxLxD: jax.Array, w_router_DxE: jax.Array, wg_ExDxF: jax.Array,
                  wu_ExDxF: jax.Array, wd_ExFxD: jax.Array, top_k: int,
                  capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The MoE block, token by token: (output [B, L, D], kept [B, L, K] bool).

  capacity=None is dropless. A dropped assignment contributes zero and the survivors keep
  their weights (no renormalization).
  """
  b, l, d = x_BxLxD.shape
  e = w_router_DxE.shape[1]
  x_TxD = x_BxLxD.reshape(b * l, d)
  experts_TxK, weights_TxK = jax.vmap(lambda x: route_token(x, w_router_DxE, top_k))(x_TxD)
  kept_BxLxK = kept_mask(experts_TxK.reshape(b, l, top_k), e, capacity)
  kept_TxK = kept_BxLxK.reshape(b * l, top_k)

  def one_token(x_D, experts_K, weights_K, kept_K):
    y_D = jnp.zeros((d,), jnp.float32)
    for j in range(top_k):
      ex = experts_K[j]
      out_D = expert_ffn(x_D, wg_ExDxF[ex], wu_ExDxF[ex], wd_ExFxD[ex])
      y_D = y_D + jnp.where(kept_K[j], weights_K[j], 0.0) * out_D
    return y_D

  y_TxD = jax.vmap(one_token)(x_TxD, experts_TxK, weights_TxK, kept_TxK)
  return y_TxD.reshape(b, l, d).astype(x_BxLxD.dtype), kept_BxLxK


# ---------------------------------------------------------------------------------------
# Every router, drop policy, renormalization and shared experts (moe_routing_test.py and
# ---------------------------------------------------------------------------------------
# Every router, both drop policies, renormalization after drops, shared experts and expert
# choice (moe_routing_test.py, moe_layer_test.py). Still token by token; the discrete
# choices are made with a stable sort (ties: the lower expert id, as lax.top_k).


def choose_token(logits_E: jax.Array, router: str, top_k: int, *, renormalize: bool = False,
                 routed_scaling: float = 1.0, bias_E: jax.Array | None = None,
                 num_groups: int = 1, topk_groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """One token of a learned router: (expert ids [K] best first, combine weights [K]).

  topk_softmax: softmax over the K best logits. softmax_topk / switch: the K best of the
  softmax over all E (renormalize: divided by their sum). sigmoid_bias: the K best of
  sigmoid + bias among the experts of the `topk_groups` best groups (a group scores the
  sum of its two best sigmoid + bias), weighted sigmoid / sum of the chosen sigmoids.
  Every weight is then multiplied by routed_scaling.
  """
  e = logits_E.shape[0]
  if router == "topk_softmax":
    experts_K = jnp.argsort(-logits_E, stable=True)[:top_k]
    weights_K = jax.nn.softmax(logits_E[experts_K])
  elif router in ("softmax_topk", "switch"):
    p_E = jax.nn.softmax(logits_E)
    experts_K = jnp.argsort(-p_E, stable=True)[:top_k]
    weights_K = p_E[experts_K]
    if renormalize:
      weights_K = weights_K / jnp.sum(weights_K)
  elif router == "sigmoid_bias":
    s_E = jax.nn.sigmoid(logits_E)
    choice_E = s_E + (0.0 if bias_E is None else bias_E)
    if num_groups > 1:
      per = e // num_groups
      group_score = jnp.stack([
          jnp.sum(jnp.sort(choice_E[g * per:(g + 1) * per])[-min(2, per):])
          for g in range(num_groups)])
      best_groups = jnp.argsort(-group_score, stable=True)[:topk_groups]
      in_best_E = jnp.any(jnp.arange(e)[:, None] // per == best_groups[None, :], axis=1)
      choice_E = jnp.where(in_best_E, choice_E, -jnp.inf)
    experts_K = jnp.argsort(-choice_E, stable=True)[:top_k]
    weights_K = s_E[experts_K] / jnp.sum(s_E[experts_K])
  else:
    raise ValueError(f"choose_token: {router!r} is not a learned token-choice router")
  return experts_K.astype(jnp.int32), weights_K * routed_scaling


def kept_mask_priority_numpy(experts_BxLxK: np.ndarray, priority_BxLxK: np.ndarray,
                             num_experts: int, capacity: int) -> np.ndarray:
  """kept_mask_numpy, but within each choice the tokens go by decreasing priority (equal
  priorities: by position)."""
  b, l, k = experts_BxLxK.shape
  kept_BxLxK = np.zeros((b, l, k), bool)
  for bi in range(b):
    taken_E = [0] * num_experts
    for ki in range(k):
      for t in sorted(range(l), key=lambda t: -float(priority_BxLxK[bi, t, ki])):  # stable
        e = int(experts_BxLxK[bi, t, ki])
        kept_BxLxK[bi, t, ki] = taken_E[e] < capacity
        taken_E[e] += 1
  return kept_BxLxK


def kept_mask_priority(experts_BxLxK: jax.Array, priority_BxLxK: jax.Array | None,
                       num_experts: int, capacity: int | None) -> jax.Array:
  """kept_mask_priority_numpy as a jax op; priority None is kept_mask (position order)."""
  if capacity is None or priority_BxLxK is None:
    return kept_mask(experts_BxLxK, num_experts, capacity)
  return jax.pure_callback(
      lambda ex, pr: kept_mask_priority_numpy(np.asarray(ex), np.asarray(pr), num_experts,
                                              capacity),
      jax.ShapeDtypeStruct(experts_BxLxK.shape, jnp.bool_),
      jax.lax.stop_gradient(experts_BxLxK), jax.lax.stop_gradient(priority_BxLxK))


def reference_block(x_BxLxD: jax.Array, w_router_DxE: jax.Array, wg_ExDxF: jax.Array,
                    wu_ExDxF: jax.Array, wd_ExFxD: jax.Array, shared=None, *, router: str,
                    top_k: int, capacity: int | None = None, drop_policy: str = "position",
                    renormalize_after_drop: bool = False, choices_BxLxK=None,
                    bias_E=None, **router_kw) -> tuple[jax.Array, jax.Array]:
  """Any token-choice router, token by token: (output [B, L, D], kept [B, L, K] bool).

  `choices_BxLxK` gives the experts of the non-learned routers (hash, random), weighted
  routed_scaling / K each. capacity=None is dropless; otherwise, per sequence, choice 0 of
  every token before choice 1, by position or (drop_policy="probability") by decreasing
  combine weight. A dropped assignment gives zero; renormalize_after_drop rescales the
  survivors to the token's original total weight. `shared` = (gate [D, S], up [D, S],
  down [S, D]) adds the always-on shared SwiGLU.
  """
  b, l, d = x_BxLxD.shape
  e = w_router_DxE.shape[1]
  x_TxD = x_BxLxD.reshape(b * l, d)
  if choices_BxLxK is not None:
    experts_TxK = jnp.asarray(choices_BxLxK, jnp.int32).reshape(b * l, top_k)
    weights_TxK = jnp.full((b * l, top_k), router_kw.get("routed_scaling", 1.0) / top_k)
  else:
    logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), w_router_DxE.astype(jnp.float32))
    experts_TxK, weights_TxK = jax.vmap(
        lambda z: choose_token(z, router, top_k, bias_E=bias_E, **router_kw))(logits_TxE)
  priority = weights_TxK.reshape(b, l, top_k) if drop_policy == "probability" else None
  kept_BxLxK = kept_mask_priority(experts_TxK.reshape(b, l, top_k), priority, e, capacity)

  def one_token(x_D, experts_K, weights_K, kept_K):
    kept_w_K = jnp.where(kept_K, weights_K, 0.0)
    if renormalize_after_drop:
      kept_total = jnp.sum(kept_w_K)
      kept_w_K = jnp.where(kept_total > 0,
                           kept_w_K * jnp.sum(weights_K) / jnp.maximum(kept_total, 1e-30), 0.0)
    y_D = jnp.zeros((d,), jnp.float32)
    for j in range(top_k):
      ex = experts_K[j]
      y_D = y_D + kept_w_K[j] * expert_ffn(x_D, wg_ExDxF[ex], wu_ExDxF[ex], wd_ExFxD[ex])
    if shared is not None:
      y_D = y_D + expert_ffn(x_D, *shared)
    return y_D

  y_TxD = jax.vmap(one_token)(x_TxD, experts_TxK, weights_TxK,
                              kept_BxLxK.reshape(b * l, top_k))
  return y_TxD.reshape(b, l, d).astype(x_BxLxD.dtype), kept_BxLxK


def reference_expert_choice(x_BxLxD: jax.Array, w_router_DxE: jax.Array, wg_ExDxF: jax.Array,
                            wu_ExDxF: jax.Array, wd_ExFxD: jax.Array, shared=None, *,
                            capacity: int) -> jax.Array:
  """Expert choice: expert e takes the min(C, L) tokens of each sequence with the highest
  softmax probability for e (ties: the earlier token) and adds probability * its output."""
  b, l, d = x_BxLxD.shape
  e = w_router_DxE.shape[1]
  p_BxLxE = jax.nn.softmax(jnp.einsum("bld,de->ble", x_BxLxD, w_router_DxE), axis=-1)
  # rank[b, t, e]: place of token t in expert e's ranking of sequence b.
  rank_BxLxE = jnp.argsort(jnp.argsort(-p_BxLxE, axis=1, stable=True), axis=1)
  taken_BxLxE = rank_BxLxE < min(capacity, l)

  def one_token(x_D, p_E, taken_E):
    y_D = jnp.zeros((d,), jnp.float32)
    for ei in range(e):
      out_D = expert_ffn(x_D, wg_ExDxF[ei], wu_ExDxF[ei], wd_ExFxD[ei])
      y_D = y_D + jnp.where(taken_E[ei], p_E[ei], 0.0) * out_D
    if shared is not None:
      y_D = y_D + expert_ffn(x_D, *shared)
    return y_D

  y_TxD = jax.vmap(one_token)(x_BxLxD.reshape(b * l, d), p_BxLxE.reshape(b * l, e),
                              taken_BxLxE.reshape(b * l, e))
  return y_TxD.reshape(b, l, d).astype(x_BxLxD.dtype)


@functools.partial(jax.jit, static_argnames=("router", "top_k", "renormalize",
                                             "routed_scaling", "num_groups", "topk_groups"))
def _choices(x_BxLxD, w_router_DxE, bias_E, **kw):
  b, l, d = x_BxLxD.shape
  logits_TxE = jnp.dot(x_BxLxD.reshape(b * l, d), w_router_DxE)
  experts_TxK, _ = jax.vmap(lambda z: choose_token(z, bias_E=bias_E, **kw))(logits_TxE)
  return experts_TxK.reshape(b, l, -1)


def reference_choices(x_BxLxD, w_router_DxE, *, router: str, top_k: int, bias_E=None,
                      **router_kw) -> np.ndarray:
  """The experts [B, L, K] (best first) a learned router picks, as numpy."""
  return np.asarray(_choices(jnp.asarray(x_BxLxD, jnp.float32), w_router_DxE, bias_E,
                             router=router, top_k=top_k, **router_kw))


def infer_uniform_choices(x_BxLxD, wg_ExDxF, wu_ExDxF, wd_ExFxD, y_BxLxD, top_k: int,
                          routed_scaling: float = 1.0, atol: float = 1e-5) -> np.ndarray:
  """The experts of hash / random routing, read off a dropless output: per token the one
  set of K distinct experts whose outputs, weighted routed_scaling / K, sum to y.

  Returns [B, L, K] ascending; AssertionError when no set, or several, match a token.
  """
  x = np.asarray(x_BxLxD, np.float64)
  wg, wu, wd = (np.asarray(w, np.float64) for w in (wg_ExDxF, wu_ExDxF, wd_ExFxD))
  g = np.einsum("bld,edf->blef", x, wg)
  out_BxLxExD = np.einsum("blef,efd->bled", g / (1 + np.exp(-g)) *
                          np.einsum("bld,edf->blef", x, wu), wd)
  y = np.asarray(y_BxLxD, np.float64)
  b, l, _ = y.shape
  found = np.zeros((b, l, top_k), np.int64)
  for bi in range(b):
    for t in range(l):
      hits = [s for s in itertools.combinations(range(wg.shape[0]), top_k)
              if np.allclose(routed_scaling / top_k * out_BxLxExD[bi, t, list(s)].sum(0),
                             y[bi, t], rtol=0, atol=atol)]
      assert len(hits) == 1, f"token ({bi}, {t}): expert sets matching the output: {hits}"
      found[bi, t] = hits[0]
  return found


def consecutive_order(sets_BxLxK: np.ndarray, num_experts: int) -> np.ndarray:
  """Hash expert sets {a, a+1, ...} (mod E, ascending) in the router's order a, a+1, ...

  AssertionError when a set is not consecutive (K < E)."""
  k = sets_BxLxK.shape[-1]
  out = np.zeros_like(sets_BxLxK)
  for idx in np.ndindex(sets_BxLxK.shape[:-1]):
    s = {int(v) for v in sets_BxLxK[idx]}
    starts = [a for a in s if (a - 1) % num_experts not in s]
    assert len(starts) == 1, f"hash experts {sorted(s)} of token {idx} are not consecutive"
    out[idx] = (starts[0] + np.arange(k)) % num_experts
  return out


# ---------------------------------------------------------------------------------------
# Harness shared by the moe_*_test.py files: small configs and weights, an MoEBlock
# holding them, and module-level jits so equal configs and shapes compile once per process.

D, F = 16, 32
nnx.use_eager_sharding(False)  # as in every moe test file: no mesh here


def _fast_compile_options() -> dict:
  """XLA:CPU spends nearly all of these tests' time compiling small programs. Without LLVM
  optimization and with the classic (non-fusion-emitter) codegen it compiles 3-5x faster;
  the HLO, and so every float32 result up to rounding, is the same. {} where unsupported."""
  if jax.default_backend() != "cpu":
    return {}
  opts = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda v: v + 1).lower(1.0).compile(opts)
  except Exception:  # pylint: disable=broad-except  (an XLA without these options)
    return {}
  return {"compiler_options": opts}


JIT_OPTIONS = _fast_compile_options()


def small_cfgs(**moe_overrides):
  """experiments/tiny.py shrunk to D=16, F=32, E=4, K=2, min_capacity=0, then overridden
  (dataclasses.replace: no validation, so a test may build any combination)."""
  from experiments import tiny  # pylint: disable=g-import-not-at-top
  from moex import config  # pylint: disable=g-import-not-at-top

  base = config.validate(tiny.get_config(), vocab_size=259)
  model = dataclasses.replace(base.model, d_model=D)
  moe = dataclasses.replace(base.moe, num_experts=4, top_k=2, d_expert=F, min_capacity=0)
  return model, dataclasses.replace(moe, **moe_overrides)


def random_weights(e: int, seed: int, shared_width: int = 0) -> dict:
  """O(1) router logits and expert outputs (so 1e-5 is a tight tolerance): a dict router,
  gate, up, down and shared ((gate, up, down) of width shared_width, or None)."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape, scale: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  w = {"router": arr(D, e, scale=1.0), "gate": arr(e, D, F, scale=D**-0.5),
       "up": arr(e, D, F, scale=D**-0.5), "down": arr(e, F, D, scale=F**-0.5), "shared": None}
  if shared_width:
    w["shared"] = (arr(D, shared_width, scale=D**-0.5), arr(D, shared_width, scale=D**-0.5),
                   arr(shared_width, D, scale=shared_width**-0.5))
  return w


def random_x(b: int, l: int, seed: int = 100) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, l, D)), jnp.float32)


def swiglu_numpy(x, gate_DxS, up_DxS, down_SxD) -> np.ndarray:
  """(silu(x Wg) * x Wu) Wd in float64."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, gate_DxS, up_DxS, down_SxD))
  g = x @ wg
  return (g / (1 + np.exp(-g)) * (x @ wu)) @ wd


def random_bias(e: int) -> np.ndarray:
  """A sigmoid_bias balancing bias in [-0.3, 0.3]: big enough to change choices."""
  return np.random.default_rng(e).permutation(np.linspace(-0.3, 0.3, e)).astype(np.float32)


def build_block(moe_cfg, w: dict, bias_E=None):
  """An MoEBlock (moex/moe/layer.py) holding the weights `w` and, for sigmoid_bias, the
  bias (default zeros). Abstract init: an eager random init would compile per shape."""
  from moex.moe.layer import MoEBlock  # pylint: disable=g-import-not-at-top

  model_cfg = small_cfgs()[0]
  abstract = nnx.eval_shape(lambda: MoEBlock(model_cfg, moe_cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = {"router": {"kernel_DxE": w["router"]},
          "experts": {"gate_ExDxF": w["gate"], "up_ExDxF": w["up"], "down_ExFxD": w["down"]}}
  if moe_cfg.router == "sigmoid_bias":
    pure["router"]["bias_E"] = jnp.asarray(
        np.zeros(moe_cfg.num_experts) if bias_E is None else bias_E, jnp.float32)
  if w.get("shared") is not None:
    sg, su, sd = w["shared"]
    pure["shared"] = {"gate_DxF": sg, "up_DxF": su, "down_FxD": sd}
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _block_apply(graphdef, state, x, tokens, rng, train):
  """(y, stats): the block's output and its MoEOutput's statistics."""
  y, out = nnx.merge(graphdef, state)(x, train=train, tokens_BxL=tokens, rng=rng)
  return y, out.stats


def _block_loss(graphdef, state, x, ct, tokens, rng, train):
  y, s = _block_apply(graphdef, state, x, tokens, rng, train)
  return jnp.sum(y * ct), (y, s)


_block_forward = jax.jit(_block_apply, static_argnums=(0, 5), **JIT_OPTIONS)
_block_grad = jax.jit(jax.grad(_block_loss, argnums=(1, 2), has_aux=True),
                      static_argnums=(0, 6), **JIT_OPTIONS)


def run_block(block, x, *, train: bool, ct=None, tokens=None, rng=None):
  """(y, stats, grads): grads of sum(y * ct), a dict x, router, gate, up, down, shared
  (None without a cotangent)."""
  graphdef, state = nnx.split(block)
  if ct is None:
    y, s = _block_forward(graphdef, state, x, tokens, rng, train)
    return y, s, None
  (g_state, g_x), (y, s) = _block_grad(graphdef, state, x, ct, tokens, rng, train)
  g = nnx.to_pure_dict(g_state)
  grads = {"x": g_x, "router": g["router"]["kernel_DxE"], "gate": g["experts"]["gate_ExDxF"],
           "up": g["experts"]["up_ExDxF"], "down": g["experts"]["down_ExFxD"], "shared": None}
  if g.get("shared"):
    grads["shared"] = (g["shared"]["gate_DxF"], g["shared"]["up_DxF"], g["shared"]["down_FxD"])
  return y, s, grads


def _ref_loss(params, ct, bias_E, choices, spec):
  x, wr, wg, wu, wd, shared = params
  kw = dict(spec)
  if kw.pop("router") == "expert_choice":
    y, kept = reference_expert_choice(x, wr, wg, wu, wd, shared, **kw), jnp.ones((), bool)
  else:
    y, kept = reference_block(x, wr, wg, wu, wd, shared, router=dict(spec)["router"],
                              bias_E=bias_E, choices_BxLxK=choices, **kw)
  return jnp.sum(y * ct), (y, kept)


_ref_forward = jax.jit(lambda *a: _ref_loss(*a)[1], static_argnums=(4,), **JIT_OPTIONS)
_ref_grad = jax.jit(jax.grad(_ref_loss, has_aux=True), static_argnums=(4,), **JIT_OPTIONS)


def reference_spec(moe_cfg, capacity: int | None) -> dict:
  """run_reference's keyword arguments for an MoEConfig and capacity (None: dropless)."""
  if moe_cfg.router == "expert_choice":
    return dict(router="expert_choice", capacity=capacity)
  return dict(router=moe_cfg.router, top_k=moe_cfg.top_k, capacity=capacity,
              drop_policy=moe_cfg.drop_policy,
              renormalize_after_drop=moe_cfg.renormalize_after_drop,
              renormalize=moe_cfg.renormalize, routed_scaling=moe_cfg.routed_scaling,
              num_groups=moe_cfg.num_groups, topk_groups=moe_cfg.topk_groups)


def run_reference(x, w: dict, *, ct=None, bias_E=None, choices=None, **spec):
  """reference_block (or reference_expert_choice for router="expert_choice") as
  (y, kept, grads), grads keyed like run_block's (None without a cotangent)."""
  params = (x, w["router"], w["gate"], w["up"], w["down"], w.get("shared"))
  spec_t = tuple(sorted(spec.items()))
  bias = None if bias_E is None else jnp.asarray(bias_E, jnp.float32)
  if ct is None:
    y, kept = _ref_forward(params, jnp.zeros_like(x), bias, choices, spec_t)
    return y, kept, None
  g, (y, kept) = _ref_grad(params, ct, bias, choices, spec_t)
  return y, kept, dict(zip(("x", "router", "gate", "up", "down", "shared"), g))


def assert_grads_close(got: dict, want: dict, **tol) -> None:
  for name in ("x", "router", "gate", "up", "down", "shared"):
    if want.get(name) is None:
      assert got.get(name) is None, name
      continue
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]))):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), **tol,
                                 err_msg=f"d/d{name}[{i}]")


def compare_with_reference(moe_cfg, w: dict, x, ct, tokens=None, *, capacity: int | None,
                           train: bool = True, rng=None, bias_E=None,
                           check_twice: bool = False, tol=None):
  """Runs MoEBlock and the reference (output, grads when ct is given, expert load and
  kept counts) and asserts they agree; returns (y, stats, choices [B, L, K] or None).

  hash / random choices are read off a dropless run of the block (infer_uniform_choices);
  random must then run without drops, since the order of its choices is unknown.
  """
  tol = tol or dict(rtol=1e-5, atol=1e-5)
  block = build_block(moe_cfg, w, bias_E)
  y, s, grads = run_block(block, x, train=train, ct=ct, tokens=tokens, rng=rng)
  if check_twice:  # the same inputs give the same bits
    again = run_block(block, x, train=train, ct=ct, tokens=tokens, rng=rng)
    jax.tree.map(np.testing.assert_array_equal, again, (y, s, grads))
  choices = None
  if moe_cfg.router in ("hash", "random"):
    assert capacity is None or moe_cfg.router == "hash", "random: unknown order under drops"
    y_free = y if capacity is None else run_block(
        build_block(dataclasses.replace(moe_cfg, dispatch="dropless", grouped_matmul="tiled"),
                    w), x, train=train, tokens=tokens, rng=rng)[0]
    if w.get("shared") is not None:
      y_free = y_free - swiglu_numpy(x, *w["shared"])
    choices = infer_uniform_choices(x, w["gate"], w["up"], w["down"], y_free,
                                    moe_cfg.top_k, moe_cfg.routed_scaling)
    if moe_cfg.router == "hash" and moe_cfg.top_k < moe_cfg.num_experts:
      choices = consecutive_order(choices, moe_cfg.num_experts)
  spec = reference_spec(moe_cfg, capacity)
  y_ref, kept, grads_ref = run_reference(x, w, ct=ct, bias_E=bias_E, choices=choices, **spec)
  np.testing.assert_allclose(y, y_ref, **tol)
  if ct is not None:
    assert_grads_close(grads, grads_ref, **tol)
  if moe_cfg.router != "expert_choice":
    if choices is None:
      choices = reference_choices(x, w["router"], bias_E=bias_E, **{
          k: v for k, v in spec.items()
          if k not in ("capacity", "drop_policy", "renormalize_after_drop")})
    e = moe_cfg.num_experts
    np.testing.assert_array_equal(s["expert_load"], np.bincount(choices.ravel(), minlength=e))
    kept_e = np.bincount(choices[np.asarray(kept)].ravel(), minlength=e)
    np.testing.assert_array_equal(s["expert_kept"], kept_e)
  return y, s, choices


# Edge cases (moe_routing_test.py runs them dropless, moe_layer_test.py with drops):
#   few_tokens: 3 tokens, E=8, K=2: 6 assignments for 8 experts; capacity 1.
#   one_expert: every token's first choice is one expert; capacity 4 of its 8 per sequence.
#   k_equals_e: K = E = 4; capacity 4 of 8 tokens per expert.
EDGE_CASES = {
    "few_tokens": dict(b=1, l=3, e=8, k=2, cf=1.0, dropless="ragged_dot"),
    "one_expert": dict(b=2, l=8, e=4, k=2, cf=1.0, dropless="tiled"),
    "k_equals_e": dict(b=2, l=8, e=4, k=4, cf=0.5, dropless="chunked"),
}
EDGE_ROUTERS = {
    "few_tokens": ("topk_softmax", "softmax_topk", "switch", "sigmoid_bias", "hash", "random",
                   "expert_choice"),
    "one_expert": ("topk_softmax", "softmax_topk", "switch", "sigmoid_bias", "hash"),
    "k_equals_e": ("topk_softmax", "softmax_topk", "sigmoid_bias", "hash", "random"),
}
FAVOURITE = 2  # the expert every token prefers in one_expert


def run_edge_case(case: str, router: str, path: str) -> None:
  """One EDGE_CASES case through compare_with_reference (output and grads), plus its
  counting facts. path: "capacity" (drops) or "dropless" (the case's backend)."""
  c = EDGE_CASES[case]
  b, l, e = c["b"], c["l"], c["e"]
  k = 1 if router == "switch" else c["k"]
  moe = small_cfgs(router=router, num_experts=e, top_k=k, capacity_factor=c["cf"],
                   allow_noncausal_routing=True, dispatch=path, grouped_matmul=c["dropless"],
                   routed_scaling=2.5 if router == "sigmoid_bias" else 1.0)[1]
  capacity = moe.capacity(l, c["cf"]) if path == "capacity" else None
  assert case != "few_tokens" or capacity in (1, None)
  w = random_weights(e, seed=5)
  x, ct = random_x(b, l, seed=6), random_x(b, l, seed=8)
  tokens = jnp.asarray(np.arange(b * l).reshape(b, l) * 7, jnp.int32)
  bias = random_bias(e) if router == "sigmoid_bias" else None
  if case == "one_expert":
    if router == "sigmoid_bias":  # the balancing bias alone sends everything to one expert
      bias = np.zeros(e, np.float32)
      bias[FAVOURITE] = 10.0
    elif router == "hash":  # one token id everywhere
      tokens = jnp.full((b, l), 11, jnp.int32)
    else:  # feature 0 > 1 and a router weight of 20 on it
      wr = np.array(w["router"])
      wr[0] = 0.0
      wr[0, FAVOURITE] = 20.0
      w = dict(w, router=jnp.asarray(wr))
      xn = np.array(x)
      xn[..., 0] = np.abs(xn[..., 0]) + 1.0
      x = jnp.asarray(xn)
  _, s, choices = compare_with_reference(moe, w, x, ct, tokens, capacity=capacity, bias_E=bias)
  load, kept = np.asarray(s["expert_load"]), np.asarray(s["expert_kept"])
  if router == "expert_choice":  # each expert takes C tokens of each sequence
    np.testing.assert_array_equal(load, [b * min(capacity, l)] * e)
  else:
    assert load.sum() == b * l * k
  if capacity is not None:
    assert np.all(kept <= b * capacity)
  else:
    np.testing.assert_array_equal(kept, load)
  if case == "one_expert":
    if router == "hash":
      assert np.all(choices == choices[0, 0])
    else:
      assert load[FAVOURITE] == b * l and np.all(choices[..., 0] == FAVOURITE)
    if capacity is not None:
      assert kept[FAVOURITE] == b * capacity < load[FAVOURITE]
  if case == "k_equals_e":
    np.testing.assert_array_equal(load, [b * l] * e)
    if capacity is not None:
      np.testing.assert_array_equal(kept, [b * capacity] * e)
  if case == "few_tokens" and router != "expert_choice":
    assert int(np.sum(load == 0)) >= e - l * k
