"""Upcycling: a dense model's feed-forward blocks -> MoE blocks, or an MoE -> more experts.

One method is one `Method` in METHODS: the kind of source block it takes (dense or MoE),
its initialization (one block's weights in, an MoE block's out; NumPy), its refusals, and
when the upcycled model's step-0 output equals the source's. Everything else is shared:
`check` (the shapes outside the FFN, each block's source and target kinds, then the
method's own refusals), `build` (the target's parameters from the one parameter tree,
moex/model/params.py: every leaf the source's at the same path, except the router and
routed experts of each block the method upcycles) and `upcycle` (source workdir -> params/,
upcycle.json, config.json last). Its settings are `Options` fields (moex.upcycle defines a
flag per field).

Shape letters: D model width, F hidden width (the dense FFN's or an expert's), E experts,
O expert groups and I experts per group (granular: a copy of the dense FFN is a group of
G shards). Every initialization takes a numpy Generator, so a seed fixes the result;
weights are float32.

| method   | experts                                                     | router          |
|----------|-------------------------------------------------------------|-----------------|
| copy     | E exact copies of the dense FFN (Komatsuzaki et al. 2022)   | N(0, std)       |
| noise    | copies; per expert a fraction of each matrix's entries       | N(0, std)       |
|          | replaced by N(0, sigma) (OLMoE's ablation)                  |                 |
| drop     | copies; per expert a fraction r of the hidden units (gate/up | N(0, std)       |
|          | columns, down rows) drawn from N(mean, std) of the dense     |                 |
|          | matrix (Drop-Upcycling, Nakamura et al. 2025)               |                 |
| granular | expert c*G + s = shard s (hidden units s*F/G .. (s+1)*F/G)   | N(0, std) per   |
|          | of the dense FFN, down scaled (He et al. 2024)              | copy c, shared  |
|          |                                                             | by its G shards |
| expand   | an MoE's E experts -> m*E: expert j = source expert j mod E  | column j =      |
|          |                                                             | source's j mod E|
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Callable, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from moex import config as config_lib, errors, workdir as workdir_lib
from moex.config import Config, ConfigError
from moex.model import params as params_lib
from moex.moe import routing
from moex.parallel import mesh as mesh_lib
from moex.train import init_from, loop, state as state_lib

class UpcycleError(ValueError, errors.Refusal):
  """A one-line reason the upcycling cannot proceed (not a config key: a flag or a path)."""


class DenseFFN(NamedTuple):
  """A dense SwiGLU block's weights."""

  gate_DxF: np.ndarray
  up_DxF: np.ndarray
  down_FxD: np.ndarray


class MoEFFN(NamedTuple):
  """An MoE block's routed weights: the router kernel and the experts."""

  router_DxE: np.ndarray
  gate_ExDxF: np.ndarray
  up_ExDxF: np.ndarray
  down_ExFxD: np.ndarray


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def fresh_router(d_model: int, num_experts: int, std: float,
                 rng: np.random.Generator) -> np.ndarray:
  """A newly initialized router kernel [D, E], N(0, std) (OLMoE upcycled with 0.02)."""
  return _f32(rng.normal(0.0, std, (d_model, num_experts)))


def _tile(w: np.ndarray, num_experts: int) -> np.ndarray:
  return np.repeat(_f32(w)[None], num_experts, axis=0)


def copy(dense: DenseFFN, num_experts: int, router_std: float,
         rng: np.random.Generator) -> MoEFFN:
  """Every expert an exact copy of the dense FFN; a fresh router."""
  d = dense.gate_DxF.shape[0]
  return MoEFFN(fresh_router(d, num_experts, router_std, rng),
                *(_tile(w, num_experts) for w in dense))


def noise(dense: DenseFFN, num_experts: int, router_std: float, fraction: float, std: float,
          rng: np.random.Generator) -> MoEFFN:
  """copy, then in each expert round(fraction * size) entries of each matrix, chosen without
  replacement, replaced by N(0, sigma): sigma = `std`, or when 0 that dense matrix's own
  standard deviation."""
  moe = copy(dense, num_experts, router_std, rng)
  for w_ExRxC, src in zip(moe[1:], dense):
    sigma = std or float(np.std(src))
    size = src.size
    n = round(fraction * size)
    for e in range(num_experts):
      flat = w_ExRxC[e].reshape(-1)  # a view: writes land in the expert
      flat[rng.choice(size, n, replace=False)] = rng.normal(0.0, sigma, n)
  return moe


def drop(dense: DenseFFN, num_experts: int, router_std: float, ratio: float,
         rng: np.random.Generator) -> MoEFFN:
  """Drop-Upcycling: copy, then per expert round(ratio * F) hidden units chosen without
  replacement are re-initialized, the same units in gate, up (columns) and down (rows), from
  a normal with the mean and standard deviation of that dense matrix."""
  moe = copy(dense, num_experts, router_std, rng)
  f = dense.gate_DxF.shape[1]
  n = round(ratio * f)
  stats = [(float(np.mean(w)), float(np.std(w))) for w in dense]
  for e in range(num_experts):
    units = rng.choice(f, n, replace=False)
    for w_ExRxC, (mean, std), axis in zip(moe[1:], stats, (1, 1, 0)):
      shape = list(w_ExRxC.shape[1:])
      shape[axis] = n
      fresh = rng.normal(mean, std, shape)
      if axis == 1:
        w_ExRxC[e][:, units] = fresh
      else:
        w_ExRxC[e][units, :] = fresh
  return moe


def granular(dense: DenseFFN, num_experts: int, granularity: int, router_std: float,
             scale: float, rng: np.random.Generator) -> MoEFFN:
  """Fine-grained upcycling: the dense FFN split along F into G shards of F/G units, E = G * copies
  experts, expert c*G + s a copy of shard s with its down projection times `scale`; the
  router is N(0, std) per copy c, its column repeated for the G experts of that copy (one
  virtual group: one full copy of the dense FFN, tied logits).

  SwiGLU is a sum over hidden units, so the G shards of one copy sum to the dense FFN; a
  router that picks whole virtual groups with weights summing to routed_scaling per token
  then outputs routed_scaling / G times the dense FFN, which scale = G / routed_scaling
  makes exact (`_check_granular` refuses the routers that do not).
  """
  g = granularity
  d = dense.gate_DxF.shape[0]
  copies = num_experts // g
  # One copy's G shards are I = G experts of width F = F_dense / G.
  shard = lambda x, axis: np.stack(np.split(_f32(x), g, axis=axis))
  gate_IxDxF, up_IxDxF = shard(dense.gate_DxF, 1), shard(dense.up_DxF, 1)
  down_IxFxD = shard(dense.down_FxD, 0) * np.float32(scale)
  tile = lambda x: np.tile(x, (copies, 1, 1))  # expert c*G + s = shard s
  router_DxO = fresh_router(d, copies, router_std, rng)  # one column per copy (group)
  return MoEFFN(np.repeat(router_DxO, g, axis=1), tile(gate_IxDxF), tile(up_IxDxF),
                tile(down_IxFxD))


def expand(moe: MoEFFN, num_experts: int) -> MoEFFN:
  """An MoE's E experts -> num_experts = m * E: expert j (and router column j) is the
  source's j mod E. Every expert computes a source expert; softmax router probabilities
  summed over the m copies of an expert equal the source's."""
  m = num_experts // moe.gate_ExDxF.shape[0]
  return MoEFFN(np.tile(_f32(moe.router_DxE), (1, m)),
                *(np.tile(_f32(w), (m, 1, 1)) for w in moe[1:]))


def expand_bias(bias_E: np.ndarray | None, num_experts: int) -> np.ndarray:
  """A biased router's bias for `expand`: the source's, tiled like its columns (zeros
  when the source has none)."""
  if bias_E is None:
    return np.zeros((num_experts,), np.float32)
  return np.tile(_f32(bias_E), num_experts // bias_E.shape[0])


# ---------------------------------------------------------------------------------------
# Options: the methods' settings, one flag each (moex.upcycle defines them from the fields).

def _option(default: float, help_: str, unit_interval: bool = False):
  return dataclasses.field(default=default, metadata={"help": help_,
                                                      "unit_interval": unit_interval})


@dataclasses.dataclass(frozen=True)
class Options:
  """--method and its settings (flags of the same names)."""

  method: str = "copy"
  router_std: float = _option(0.02, "New router kernels: N(0, router_std) (OLMoE's 0.02).")
  noise_fraction: float = _option(0.5, "noise: share of each expert matrix's entries "
                                  "replaced.", unit_interval=True)
  noise_std: float = _option(0.0, "noise: sigma of the replacements; 0 = the dense matrix's "
                             "own std.")
  drop_ratio: float = _option(0.5, "drop: share r of each expert's hidden units "
                              "re-initialized.", unit_interval=True)

  def check(self) -> None:
    """UpcycleError, one line naming the flag, for an unknown method or a value that is not
    finite or out of range."""
    if self.method not in METHODS:
      raise UpcycleError(f"--method={self.method}: unknown (known: {', '.join(METHODS)})")
    for f in dataclasses.fields(self):
      if "help" not in f.metadata:
        continue
      value, unit = getattr(self, f.name), f.metadata["unit_interval"]
      expected = "in [0, 1]" if unit else ">= 0"
      if not math.isfinite(value):
        raise UpcycleError(f"--{f.name}={value}: must be finite and {expected}")
      if value < 0 or (unit and value > 1):
        raise UpcycleError(f"--{f.name}={value}: out of range ({expected})")


def option_fields() -> list[dataclasses.Field]:
  """The Options fields that are a method's setting (each one a float flag)."""
  return [f for f in dataclasses.fields(Options) if "help" in f.metadata]


# ---------------------------------------------------------------------------------------
# What upcycling asks of a router: the properties the router registry declares
# (moex/moe/routing.py RouterSpec); no router is named here.

# Routers that choose whole virtual groups (granular; their weights must also sum to
# routed_scaling) and those whose expand to m*E experts with top_k * m is exact.
GRANULAR_ROUTERS = routing.names(lambda r: r.ties_chosen_together or r.consecutive)
EXPAND_EXACT = routing.names(lambda r: r.ties_chosen_together)


def _weights_sum_to_scaling(moe: config_lib.MoEConfig) -> bool:
  """Whether a token's combine weights sum to moe.routed_scaling."""
  return routing.ROUTERS[moe.router].sums_to_scaling(moe)


def _group_limited(moe: config_lib.MoEConfig) -> bool:
  """Whether routing is limited to some expert groups (num_groups > 1 on a router that uses
  them)."""
  return routing.ROUTERS[moe.router].group_limited and moe.num_groups != 1


# ---------------------------------------------------------------------------------------
# The methods.

class Method(NamedTuple):
  """One upcycling method."""

  source: str  # "dense" or "moe": the source block it turns into the target's MoE block
  # (source block: DenseFFN or MoEFFN, target config, options, G, rng) -> the routed weights
  init: Callable[..., MoEFFN]
  # (source, target, method name, where) -> the granularity G (1 unless granular); raises
  # ConfigError (one line naming the key) for a target the method cannot build.
  check: Callable[[Config, Config, str, str], int]
  # (source, target) -> None when the step-0 output equals the source's (dropless
  # evaluation), else why not.
  step0: Callable[[Config, Config], str | None]
  # (the source's router bias [E] or None, target experts) -> the target's bias [E]
  bias: Callable[[np.ndarray | None, int], np.ndarray] = (
      lambda src_E, e: np.zeros((e,), np.float32))


def _routed_only(cfg: Config, method: str) -> None:
  if cfg.moe.num_shared_experts:
    raise ConfigError(f"moe.num_shared_experts: {cfg.moe.num_shared_experts}, but --method="
                      f"{method} makes routed experts only; set it to 0")


def _check_copies(src: Config, cfg: Config, method: str, where: str) -> int:
  """copy, noise, drop: every expert the dense FFN's width."""
  _routed_only(cfg, method)
  if cfg.moe.d_expert != src.model.d_ff:
    raise ConfigError(f"moe.d_expert: {cfg.moe.d_expert}, but --method={method} copies the "
                      f"dense FFN: set it to {where}'s model.d_ff={src.model.d_ff} (or use "
                      "--method=granular for narrower experts)")
  return 1


def _check_granular(src: Config, cfg: Config, method: str, where: str) -> int:
  _routed_only(cfg, method)
  moe, f = cfg.moe, src.model.d_ff
  if f % moe.d_expert:
    raise ConfigError(f"moe.d_expert: {moe.d_expert} does not divide {where}'s model.d_ff={f} "
                      "(granular splits the dense FFN into shards of moe.d_expert units)")
  g = f // moe.d_expert
  if moe.num_experts % g:
    raise ConfigError(f"moe.num_experts: {moe.num_experts} is not a multiple of the "
                      f"granularity G={g} (model.d_ff / moe.d_expert); granular makes whole "
                      "copies of the G shards")
  if moe.top_k % g:
    raise ConfigError(f"moe.top_k: {moe.top_k} is not a multiple of the granularity G={g}; "
                      "each token must choose whole copies of the dense FFN")
  if moe.router not in GRANULAR_ROUTERS:
    raise ConfigError(f"moe.router: {moe.router!r} cannot make granular upcycling equal the "
                      f"dense model (use one of {', '.join(GRANULAR_ROUTERS)})")
  if not _weights_sum_to_scaling(moe):
    raise ConfigError(f"moe.renormalize: granular with {moe.router} needs True (without it "
                      "the chosen weights do not sum to one)")
  if _group_limited(moe):
    raise ConfigError(f"moe.num_groups: {moe.num_groups}; granular needs 1 (group-limited "
                      "routing can split a virtual group)")
  return g


def _check_expand(src: Config, cfg: Config, method: str, where: str) -> int:
  s, t = src.moe, cfg.moe
  if t.num_experts % s.num_experts:
    raise ConfigError(f"moe.num_experts: {t.num_experts} is not a multiple of {where}'s "
                      f"{s.num_experts}; expand duplicates every expert the same number of "
                      "times")
  if t.d_expert != s.d_expert:
    raise ConfigError(f"moe.d_expert: {t.d_expert} differs from {where}'s {s.d_expert}; "
                      "expand copies experts whole")
  width = lambda m: m.num_shared_experts * (m.d_shared or m.d_expert)
  if width(t) != width(s):
    raise ConfigError(f"moe.num_shared_experts: the target's shared width {width(t)} differs "
                      f"from {where}'s {width(s)}; expand copies shared experts as they are")
  if _group_limited(t):
    raise ConfigError(f"moe.num_groups: {t.num_groups}; expand needs 1 (duplicated experts "
                      "would change the expert groups)")
  return 1


def _copy_step0(src: Config, cfg: Config) -> str | None:
  moe = cfg.moe
  if _weights_sum_to_scaling(moe) and moe.routed_scaling == 1:
    return None
  return (f"the moe.router={moe.router!r} weights (renormalize={moe.renormalize}, "
          f"routed_scaling={moe.routed_scaling}) do not sum to one per token")


def _expand_step0(src: Config, cfg: Config) -> str | None:
  moe, m = cfg.moe, cfg.moe.num_experts // src.moe.num_experts
  if (moe.router == src.moe.router and moe.router in EXPAND_EXACT and
      moe.routed_scaling == src.moe.routed_scaling and moe.renormalize == src.moe.renormalize
      and moe.top_k == m * src.moe.top_k):
    return None
  return (f"expand keeps the same output only with moe.top_k={m * src.moe.top_k} (x{m}) and "
          f"the source's router ({', '.join(EXPAND_EXACT)}); with moe.top_k={moe.top_k} each "
          "token's choices include copies of the same expert")


def _by_design(method: str) -> Callable[[Config, Config], str]:
  return lambda src, cfg: f"--method={method} changes the experts by design"


METHODS: dict[str, Method] = {
    "copy": Method("dense", lambda d, cfg, o, g, rng: copy(
        d, cfg.moe.num_experts, o.router_std, rng), _check_copies, _copy_step0),
    "noise": Method("dense", lambda d, cfg, o, g, rng: noise(
        d, cfg.moe.num_experts, o.router_std, o.noise_fraction, o.noise_std, rng),
                    _check_copies, _by_design("noise")),
    "drop": Method("dense", lambda d, cfg, o, g, rng: drop(
        d, cfg.moe.num_experts, o.router_std, o.drop_ratio, rng),
                   _check_copies, _by_design("drop")),
    "granular": Method("dense", lambda d, cfg, o, g, rng: granular(
        d, cfg.moe.num_experts, g, o.router_std, g / cfg.moe.routed_scaling, rng),
                       _check_granular, lambda src, cfg: None),
    "expand": Method("moe", lambda m, cfg, o, g, rng: expand(m, cfg.moe.num_experts),
                     _check_expand, _expand_step0, expand_bias),
}


# ---------------------------------------------------------------------------------------
# Checks shared by every method.

SHAPE_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "qk_norm")


def _layer_key(model: config_lib.ModelConfig, i: int) -> str:
  """The model key (with its value) that decides whether block i is MoE."""
  if i in model.dense_layers:
    return f"model.dense_layers={list(model.dense_layers)}"
  if i < model.first_dense_layers:
    return f"model.first_dense_layers={model.first_dense_layers}"
  return f"model.first_dense_layers={model.first_dense_layers}, model.moe_every={model.moe_every}"


def _check_blocks(src: Config, cfg: Config, method: str, where: str) -> None:
  """Same shapes outside the FFN; each block's (source, target) kinds fit the method."""
  for k in SHAPE_KEYS:
    s, t = getattr(src.model, k), getattr(cfg.model, k)
    if s != t:
      raise ConfigError(f"model.{k}: the target's {t!r} differs from {where}'s {s!r}; "
                        "upcycling changes only feed-forward blocks")
  takes = METHODS[method].source
  moe_methods = [n for n, m in METHODS.items() if m.source == "moe"]
  for i in range(cfg.model.num_layers):
    src_moe, tgt_moe = src.model.is_moe_layer(i), cfg.model.is_moe_layer(i)
    if src_moe and not tgt_moe:
      raise ConfigError(f"{_layer_key(cfg.model, i)}: makes block {i} dense, which is MoE in "
                        f"{where}; upcycling never turns an MoE block dense")
    if not src_moe and not tgt_moe and src.model.d_ff != cfg.model.d_ff:
      raise ConfigError(f"model.d_ff: {cfg.model.d_ff} differs from {where}'s "
                        f"{src.model.d_ff} for dense block {i}, which is copied")
    if src_moe and takes == "dense":
      raise ConfigError(f"{where}: {_layer_key(src.model, i)} makes block {i} an MoE block; "
                        f"--method={method} upcycles dense blocks (--method="
                        f"{'/'.join(moe_methods)} adds experts to an MoE)")
    if tgt_moe and not src_moe and takes == "moe":
      raise ConfigError(f"{_layer_key(cfg.model, i)}: makes block {i} MoE, which is dense in "
                        f"{where}; --method={method} only adds experts to MoE blocks")


def check(src: Config, cfg: Config, method: str, where: str) -> int:
  """All refusals of (source, target, method), each one ConfigError line naming the key;
  returns the granularity G."""
  if not cfg.model.moe_layers:
    raise ConfigError("model.first_dense_layers: the target config has no MoE block")
  _check_blocks(src, cfg, method, where)
  return METHODS[method].check(src, cfg, method, where)


def step0_note(src: Config, cfg: Config, method: str) -> str | None:
  """Why the upcycled model's step-0 output differs from the source's, or None when it is
  the same (dropless evaluation; training dispatch may drop)."""
  return METHODS[method].step0(src, cfg)


# ---------------------------------------------------------------------------------------
# The build: the target's tree, leaf by leaf.

def _rng(seed: int, block: int) -> np.random.Generator:
  return np.random.default_rng([seed & 0xFFFFFFFF, block, zlib.crc32(b"moex.upcycle")])


def _upcycled(src: Config, cfg: Config, method: str) -> list[int]:
  """The blocks the method builds (the others are copied)."""
  takes = METHODS[method].source
  return [i for i in cfg.model.moe_layers
          if takes == "moe" or not src.model.is_moe_layer(i)]


def _source_block(flat: dict, leaves: tuple[params_lib.Leaf, ...], i: int, takes: str):
  """Block i's feed-forward weights of the source, by part: DenseFFN or MoEFFN."""
  by = lambda part: {l.path[-1]: flat[l.path] for l in leaves if l.layer == i and l.part == part}
  if takes == "dense":
    return DenseFFN(**by("dense_ffn"))
  (router_DxE,) = by("router").values()
  return MoEFFN(router_DxE, **by("routed_experts"))


def _built_leaf(out: MoEFFN, leaf: params_lib.Leaf) -> np.ndarray:
  return out.router_DxE if leaf.part == "router" else getattr(out, leaf.path[-1])


def build(src_params: dict, src_buffers: dict, src: Config, cfg: Config, opts: Options,
          g: int, abstract_buffers: dict) -> tuple[dict, dict]:
  """The target's (params, buffers) as nested dicts of numpy arrays.

  Every leaf of the target's parameter tree (moex/model/params.py) is the source's at the
  same path, except the router and routed experts of each block the method upcycles, which
  it builds. Buffers follow `abstract_buffers` (the target's): an upcycled block's (its
  router's bias) is the method's, any other the source's.
  """
  method = METHODS[opts.method]
  flat, flat_buffers = _flat(src_params), _flat(src_buffers)
  src_leaves = params_lib.tree(src)
  built = {i: method.init(_source_block(flat, src_leaves, i, method.source), cfg, opts, g,
                          _rng(cfg.seed, i))
           for i in _upcycled(src, cfg, opts.method)}
  params = {}
  for leaf in params_lib.tree(cfg):
    if leaf.layer in built and leaf.part in ("router", "routed_experts"):
      value = _built_leaf(built[leaf.layer], leaf)
    elif leaf.path in flat:
      value = flat[leaf.path]
    else:
      raise UpcycleError(f"upcycle: the target's parameter {leaf.name} has no source "
                         "(not in the source's tree, and not one the method builds)")
    _put(params, leaf.path, value)
  buffers = {}
  for path in _flat(abstract_buffers):
    if _block(path) in built:
      value = method.bias(flat_buffers.get(path), cfg.moe.num_experts)
    elif path in flat_buffers:
      value = flat_buffers[path]
    else:
      raise UpcycleError(f"upcycle: the target's buffer {'/'.join(path)} has no source")
    _put(buffers, path, value)
  return params, buffers


def _block(path: tuple[str, ...]) -> int | None:
  """The block index of a buffer's path (as params.Leaf.layer for parameters)."""
  return int(path[0][len("block_"):]) if path[0].startswith("block_") else None


def _put(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _flat(tree: dict, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _place(tree: dict, abstract: dict, what: str) -> dict:
  """numpy leaves -> arrays of the abstract leaves' dtype and sharding (shapes checked)."""
  flat, want = _flat(tree), _flat(abstract)
  if set(flat) != set(want):
    extra, missing = sorted(set(flat) - set(want)), sorted(set(want) - set(flat))
    raise UpcycleError(f"upcycle: {what} differ from the target model's (extra "
                       f"{['/'.join(k) for k in extra]}, missing {['/'.join(k) for k in missing]})")
  out = {}
  for key, a in want.items():
    x = np.asarray(flat[key])
    if x.shape != a.shape:
      raise UpcycleError(f"upcycle: {what[:-1]} {'/'.join(key)} is {x.shape}, the target "
                         f"model makes {a.shape}")
    _put(out, key, jax.device_put(x.astype(a.dtype), a.sharding))
  return out


# ---------------------------------------------------------------------------------------
# The workdir flow (python -m moex.upcycle).

def read_config(source: workdir_lib.Workdir) -> Config:
  """The validated config.json of the source workdir."""
  if not source.has_config():
    raise UpcycleError(f"--from={source.given}: no {workdir_lib.CONFIG} (not a moex workdir, "
                       "or an import or upcycle that did not finish)")
  try:
    return source.validated(check_tokenizer=False)
  except ConfigError as e:
    raise UpcycleError(f"{source.config_path}: {e}") from None


def read_params(source: workdir_lib.Workdir, src: Config) -> tuple[dict, dict, str]:
  """(params, buffers as numpy on the host, what was read) of the source workdir: params/
  or its newest readable checkpoint."""
  one = dataclasses.replace(src.mesh, data=1, fsdp=1, expert=1, tensor=1)
  mesh = mesh_lib.make_mesh(one, devices=jax.devices()[:1])
  _, abs_p, abs_b = state_lib.abstract_variables(dataclasses.replace(src, mesh=one), mesh)
  who = f"--from={source.given}"
  label = source.weights(who).label
  params, buffers = init_from.load_params(str(source.given), abs_p, abs_b, who=who)
  to_np = lambda x: np.asarray(jax.device_get(x))
  return jax.tree.map(to_np, params), jax.tree.map(to_np, buffers or {}), label


def upcycle(source: str, workdir: str, cd: ml_collections.ConfigDict,
            opts: Options) -> tuple[Config, dict]:
  """Source workdir -> WORKDIR/params/, upcycle.json, then config.json (written last: a
  WORKDIR without it is an upcycle that did not finish, and running again replaces it);
  returns the target config and the record written to upcycle.json."""
  opts.check()
  out = workdir_lib.Workdir(workdir)
  if out.has_config():
    raise UpcycleError(f"--workdir={workdir}: already holds a model or a run "
                       f"({workdir_lib.CONFIG}); pick a new directory")
  cfg, mesh = loop.config_and_mesh(cd)
  src_wd = workdir_lib.Workdir(source)
  src = read_config(src_wd)
  g = check(src, cfg, opts.method, f"{source}/{workdir_lib.CONFIG}")
  src_params, src_buffers, label = read_params(src_wd, src)
  note = step0_note(src, cfg, opts.method)
  if note:
    logging.warning("upcycle: the step-0 model will differ from %s: %s", source, note)
  _, abs_p, abs_b = state_lib.abstract_variables(cfg, mesh)
  params, buffers = build(src_params, src_buffers, src, cfg, opts, g, abs_b)
  del src_params
  placed_p, placed_b = _place(params, abs_p, "parameters"), _place(buffers, abs_b, "buffers")
  del params
  out.make()
  init_from.save_params(workdir, placed_p, placed_b)
  record = {"method": opts.method, "options": dataclasses.asdict(opts), "source": source,
            "source_read": label, "seed": cfg.seed, "granularity": g,
            "moe_layers": list(cfg.model.moe_layers), "step0_same_as_source": note is None,
            "step0_note": note}
  (out.path / workdir_lib.UPCYCLE).write_text(json.dumps(record, indent=2))
  resolved = cd.to_dict()
  resolved["model"]["vocab_size"] = cfg.model.vocab_size
  resolved["train"]["init_from"] = str(workdir)
  out.write_config(resolved)  # last: the upcycle is complete
  return cfg, record
