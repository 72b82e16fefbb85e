"""LoRA adapters (Hu et al. 2021): a weight W [in, out] becomes W + scale * A B with
A [in, r] and B [r, out]; B starts at zero, so step 0 computes the base model exactly.

scale = lora.alpha / r ("standard") or alpha / sqrt(r) ("rslora"). Targets (lora.targets,
moex/config.py LoRAConfig): the attention projections q, k, v, o; the dense blocks' SwiGLU
(gate, up, down); the shared experts' SwiGLU; the routed experts, per expert (A [E, D, r],
B [E, r, F] for gate and up, A [E, F, r], B [E, r, D] for down: moex/moe/experts.py runs
them through the same dispatch and grouped matmul as the experts' own weights). The router
trains in full when lora.train_router, else it is frozen like every other base weight.

Parameters live beside the weight they adapt: module `lora_NAME` next to the parameter
`NAME_<shape>` (attn/lora_q next to attn/q_DxHxA), holding `a_<in>xr` and `b_rx<out>`
(the lowercase r is the rank; leading E for experts). Which leaves train, and the merge
W + scale * A B, are decided here from those paths alone, so a pure params dict (a
checkpoint, an export) is read without building the model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moex.config import LoRAConfig

PREFIX = "lora_"  # an adapter module's attribute name: PREFIX + the adapted weight's stem


class Adapter(nnx.Module):
  """A [*lead, *in, r] and B [*lead, r, *out] for a weight [*lead, *in, *out].

  `letters` are the weight's shape letters split into (lead, in, out), e.g. ("", "D",
  "HxA") for q_DxHxA or ("E", "D", "F") for gate_ExDxF; they name the two parameters.
  A is uniform in +-1/sqrt(fan in) (PEFT's default), B zero.
  """

  def __init__(self, lead: tuple[int, ...], in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], names: tuple[tuple, tuple, tuple],
               letters: tuple[str, str, str], lora: LoRAConfig, rngs: nnx.Rngs):
    r, dtype = lora.rank, jnp.dtype(lora.dtype)
    lead_n, in_n, out_n = names
    lead_l, in_l, out_l = letters
    lx = lead_l + "x" if lead_l else ""
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    self.a_name, self.b_name = f"a_{lx}{in_l}xr", f"b_{lx}rx{out_l}"
    a = jax.random.uniform(rngs.params(), lead + in_shape + (r,), dtype, -bound, bound)
    setattr(self, self.a_name, nnx.Param(a, out_sharding=lead_n + in_n + (None,)))
    setattr(self, self.b_name, nnx.Param(jnp.zeros(lead + (r,) + out_shape, dtype),
                                         out_sharding=lead_n + (None,) + out_n))
    self.scale = lora.scale
    self.in_ndim = len(in_shape)

  @property
  def a(self) -> jax.Array:
    return getattr(self, self.a_name)[...]

  @property
  def b(self) -> jax.Array:
    return getattr(self, self.b_name)[...]

  def scaled_b(self) -> jax.Array:
    return self.b * self.scale

  def __call__(self, x: jax.Array) -> jax.Array:
    """scale * (x A) B for x [..., *in] (no leading axes): [..., *out], in x's dtype."""
    dt = x.dtype
    r = self.a.shape[-1]
    a = self.a.astype(dt).reshape(-1, r)
    xa = x.reshape(x.shape[:x.ndim - self.in_ndim] + (-1,)) @ a
    b = self.scaled_b().astype(dt)
    return (xa @ b.reshape(r, -1)).reshape(xa.shape[:-1] + b.shape[1:])


class Factory:
  """Makes the adapters lora.targets names. Their random A comes from a stream of their own,
  derived from the model's key without drawing from it: the base weights initialise exactly
  as they do without adapters."""

  def __init__(self, lora: LoRAConfig | None, rngs: nnx.Rngs):
    self.lora = lora if lora is not None and lora.enabled else None
    self.rngs = None if self.lora is None else nnx.Rngs(
        params=jax.random.fold_in(rngs.params.key[...], 0x4C6F5241))

  def __call__(self, target: str, param_name: str, shape: tuple, names: tuple,
               in_ndim: int, lead_ndim: int = 0) -> Adapter | None:
    """The adapter of weight `param_name` (e.g. "q_DxHxA", shape (D, H, A), `names` its
    logical axes; after `lead_ndim` leading axes, the first `in_ndim` are its input), or
    None when lora.targets leaves `target` out."""
    if self.lora is None or not self.lora.has(target):
      return None
    letters = param_name.split("_", 1)[1].split("x")
    lead, rest = letters[:lead_ndim], letters[lead_ndim:]
    cut = (lead_ndim, lead_ndim + in_ndim)
    return Adapter(tuple(shape[:cut[0]]), tuple(shape[cut[0]:cut[1]]), tuple(shape[cut[1]:]),
                   (tuple(names[:cut[0]]), tuple(names[cut[0]:cut[1]]),
                    tuple(names[cut[1]:])),
                   ("x".join(lead), "x".join(rest[:in_ndim]), "x".join(rest[in_ndim:])),
                   self.lora, self.rngs)


# ---------------------------------------------------------------------------------------
# Pure params dicts: which leaves train, and the merge.


def is_adapter(path: tuple) -> bool:
  return any(isinstance(k, str) and k.startswith(PREFIX) for k in path)


def is_trainable(path: tuple, lora: LoRAConfig) -> bool:
  """Every parameter trains without adapters; with them, the adapters (and the routers'
  kernels when lora.train_router)."""
  if not lora.enabled:
    return True
  return is_adapter(path) or (lora.train_router and len(path) >= 2
                              and path[-2] == "router" and path[-1] == "kernel_DxE")


def split(tree: dict, keep) -> tuple[dict, dict]:
  """(the leaves whose path `keep(path)` accepts, the others), both nested dicts without
  empty branches."""

  def go(node: dict, path: tuple):
    yes, no = {}, {}
    for k, v in node.items():
      if isinstance(v, dict):
        a, b = go(v, path + (k,))
        if a:
          yes[k] = a
        if b:
          no[k] = b
      elif keep(path + (k,)):
        yes[k] = v
      else:
        no[k] = v
    return yes, no

  return go(tree, ())


def join(a: dict, b: dict) -> dict:
  """The union of two nested dicts with disjoint leaves (split's inverse)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = join(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def partition(params: dict, lora: LoRAConfig) -> tuple[dict, dict]:
  """(trainable, frozen) parameters; without adapters (params, {})."""
  if not lora.enabled:
    return params, {}
  return split(params, lambda p: is_trainable(p, lora))


def base_of(params: dict) -> dict:
  """The parameters without adapters (what a base workdir holds)."""
  return split(params, lambda p: not is_adapter(p))[0]


def adapters_of(params: dict) -> dict:
  return split(params, is_adapter)[0]


def weight_name(module: str, adapter: dict) -> str:
  """The weight an adapter module adapts, from the names alone: lora_q with a_Dxr and
  b_rxHxA -> q_DxHxA; lora_gate with a_ExDxr and b_ExrxF -> gate_ExDxF."""
  a = next(k for k in adapter if k.startswith("a_"))[2:]
  b = next(k for k in adapter if k.startswith("b_"))[2:]
  lead = "Ex" if a.startswith("Ex") else ""
  ins = a[len(lead):-len("xr")]
  outs = b[len(lead) + len("rx"):]
  return f"{module[len(PREFIX):]}_{lead}{ins}x{outs}"


def delta(a, b, scale: float, weight_shape: tuple, lead_ndim: int):
  """scale * A B in the weight's layout (numpy or jax arrays, float32 math)."""
  xp = jnp if isinstance(a, jax.Array) else np
  a = xp.asarray(a, xp.float32)
  b = xp.asarray(b, xp.float32)
  lead, r = a.shape[:lead_ndim], a.shape[-1]
  a2 = a.reshape(lead + (-1, r))
  b2 = b.reshape(lead + (r, -1))
  return (scale * (a2 @ b2)).reshape(weight_shape)


def merged(params: dict, lora: LoRAConfig) -> dict:
  """W + scale * A B for every adapter, the adapters removed: a base-model params dict
  (each weight keeps its dtype; the sum is computed in float32)."""

  def go(node: dict) -> dict:
    out = {k: go(v) if isinstance(v, dict) else v for k, v in node.items()
           if not k.startswith(PREFIX)}
    for k, v in node.items():
      if k.startswith(PREFIX):
        w = weight_name(k, v)
        a_key = next(n for n in v if n.startswith("a_"))
        b_key = next(n for n in v if n.startswith("b_"))
        lead_ndim = 1 if a_key.startswith("a_Ex") else 0  # E leads: the routed experts
        base = node[w]
        d = delta(v[a_key], v[b_key], lora.scale, tuple(base.shape), lead_ndim)
        xp = jnp if isinstance(base, jax.Array) else np
        out[w] = (xp.asarray(base, xp.float32) + d).astype(base.dtype)
    return out

  return go(params)


def count(params: dict) -> int:
  """Parameters in adapter modules."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters_of(params)))
