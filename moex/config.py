"""Validation of an experiment ConfigDict into frozen, typed views.

Every module receives one of these dataclasses, never the loose ConfigDict, so a bad value
fails here, before anything is compiled, with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import pathlib
from typing import Any

import ml_collections

from moex import errors

CACHE_ENV = "MOEX_CACHE_DIR"  # moex's cache root: tokens/ (data.sources), cpu_peak.json (flops)


def cache_root() -> pathlib.Path:
  """$MOEX_CACHE_DIR, default ~/.cache/moex: the one meaning of the variable."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or "~/.cache/moex").expanduser()

DROP_POLICIES = ("position", "probability")
GROUPED_MATMULS = ("auto", "ragged_dot", "tiled", "chunked", "blocked", "megablox")
AUX_REDUCES = ("mean", "sum")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# The logical axis names the code gives tensors (parameters' out_sharding, the batch, the MoE
# layer's shard_map); the first element of each mesh.rules entry must be one of them.
LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "mlp", "norm", "expert",
                "expert_mlp")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
SCHEDULES = ("cosine", "wsd")
QK_NORMS = ("none", "head", "full")
LORA_TARGETS = ("q", "k", "v", "o", "dense", "shared", "experts")  # moex/model/lora.py
LORA_ALIASES = {"attention": ("q", "k", "v", "o"), "all": LORA_TARGETS}
LORA_SCALINGS = ("standard", "rslora")


class ConfigError(ValueError, errors.Refusal):
  """A bad config value; the message is one line that names the key."""


def capacity(capacity_factor: float, tokens_per_group: int, top_k: int, num_experts: int,
             min_capacity: int) -> int:
  """Per-expert buffer rows for one group (sequence) of S tokens: the one capacity formula.

  C = max(ceil(cf * S * K / E), min_capacity). The MoE layer, its statistics and
  moex.report (recomputing drops at other factors from moe_stats.jsonl) all call this.
  """
  c = math.ceil(capacity_factor * tokens_per_group * top_k / num_experts)
  return max(c, min_capacity)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  first_dense_layers: int
  moe_every: int
  rope_theta: float
  norm_eps: float
  init_std: float
  dtype: str
  param_dtype: str
  remat: str = "none"
  # RMSNorm on queries and keys before RoPE: "none", "head" (one scale [A] shared by the
  # heads: Qwen3) or "full" (over the whole projection, [H*A] and [J*A]: OLMoE).
  qk_norm: str = "none"
  dense_layers: tuple[int, ...] = ()  # Blocks forced dense whatever the pattern below
  # (Qwen3-MoE's mlp_only_layers).

  def is_moe_layer(self, i: int) -> bool:
    """Whether block i uses an MoE feed-forward block."""
    return (i >= self.first_dense_layers and (i - self.first_dense_layers) % self.moe_every == 0
            and i not in self.dense_layers)

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """The MoE block. The one home of its defaults: experiment configs start from these."""

  num_experts: int = 8  # Experts E per MoE layer.
  top_k: int = 2  # Experts K each token is sent to.
  d_expert: int = 256  # Hidden width of each SwiGLU expert (its own field: fine-grained MoE).
  router: str = "topk_softmax"  # Router: a key of moex/moe/routing.py ROUTERS.
  dispatch: str = "capacity"  # Training dispatch: "capacity" (fixed buffers, drops) or
  # "dropless".
  capacity_factor: float = 1.25  # Training: capacity C = ceil(cf * S * K / E) per group of S.
  eval_capacity_factor: float = 0.0  # Evaluation capacity factor; 0 = dropless evaluation.
  min_capacity: int = 4  # Lower bound on C (flaxformer's default).
  drop_policy: str = "position"  # Who wins a full buffer: "position" (earlier tokens) or
  # "probability" (batch-prioritized: higher router weight); first choices always first.
  renormalize_after_drop: bool = False  # Rescale surviving weights to the token's total.
  renormalize: bool = False  # softmax_topk: divide the k probabilities by their sum.
  jitter: float = 0.0  # Multiplicative noise U(1-j, 1+j) on the router input, training only.
  bias_update_rate: float = 1e-3  # sigmoid_bias: bias += rate * sign(mean load - load_e).
  num_groups: int = 1  # sigmoid_bias: expert groups for group-limited routing (1 = off).
  topk_groups: int = 1  # sigmoid_bias: groups each token may choose experts from.
  routed_scaling: float = 1.0  # Multiplies the routed experts' output (DeepSeek-V3: 2.5).
  allow_noncausal_routing: bool = False  # Needed for expert_choice, which sees later tokens.
  num_shared_experts: int = 0  # Always-on shared experts (DeepSeek); 0 = none.
  d_shared: int = 0  # Hidden width of each shared expert; 0 = d_expert.
  load_balance_weight: float = 1e-2  # Weight of the Switch load-balancing loss.
  seq_load_balance_weight: float = 0.0  # Weight of its per-sequence variant.
  z_loss_weight: float = 1e-3  # Weight of the router z-loss.
  aux_reduce: str = "mean"  # Combine per-layer balancing terms: "mean" or "sum" over layers.
  grouped_matmul: str = "auto"  # Dropless backend: "auto", "ragged_dot", "tiled", "chunked",
  # "megablox" (Pallas TPU kernel); auto = megablox on TPU, ragged_dot on GPU, chunked on CPU.
  ep_buffer_factor: float = 0.0  # Dropless across expert-parallel ranks: rows per device
  # pair = factor * T_local * K / ranks; 0 = T_local * K (never overflows; overflow is
  # counted in moe_stats).
  stats_max_experts: int = 64  # Above this many experts moe_stats.jsonl summarizes
  # per-expert lists (percentiles, histogram) instead of writing them whole.

  def capacity(self, tokens_per_group: int, capacity_factor: float) -> int:
    """Per-expert buffer size for a group of S tokens (module-level `capacity`)."""
    return capacity(capacity_factor, tokens_per_group, self.top_k, self.num_experts,
                    self.min_capacity)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA adapters (moex/model/lora.py). The one home of their defaults; rank 0 = off (a
  config without a lora section, e.g. a workdir written before adapters, is rank 0)."""

  rank: int = 0  # Adapter rank r; 0 = no adapters (every parameter trains).
  alpha: float = 16.0  # The update is scale * B A with scale = alpha / r ("standard") or
  scaling: str = "standard"  # alpha / sqrt(r) ("rslora", Kalajdzievski 2023).
  # Comma-separated targets: q, k, v, o (attention projections), dense (dense blocks'
  # SwiGLU), shared (shared experts), experts (every routed expert's gate, up and down, per
  # expert); "attention" = q,k,v,o; "all" = every target the model has.
  targets: str = "attention"
  train_router: bool = False  # Also train the routers' full weights (frozen by default).
  dtype: str = "float32"  # Adapter parameters' dtype (the base keeps model.param_dtype).

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.scaling == "rslora" else self.rank)

  def has(self, target: str) -> bool:
    """Whether `target` (one of LORA_TARGETS) has adapters; `validate` resolves aliases, so
    a validated config's targets are plain names."""
    return self.enabled and target in {x.strip() for x in self.targets.split(",")}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """config.data, the one view moex.data reads (fields commented in experiments/tiny.py)."""

  source: str
  tokenizer: str
  val_fraction: float
  cache_dir: str
  seq_len: int
  batch_size: int
  eval_batches: int
  # Prepared datasets (python -m moex.data.prepare): comma-separated directories, local or
  # gs://; "" = the token cache of data.source. With several, mixture_weights (comma-separated,
  # one per directory, > 0; "" = equal) are their shares of the training tokens.
  prepared: str = ""
  mixture_weights: str = ""
  # Packed batches (those carrying segment_ids; WORKSPACE.md "Document masks"): attention
  # only inside a document piece, and RoPE positions restarting per piece.
  document_mask: bool = True
  document_positions: bool = True

  @property
  def prepared_dirs(self) -> tuple[str, ...]:
    """data.prepared's directories, in order ("" -> none)."""
    return tuple(d.strip() for d in self.prepared.split(",") if d.strip())

  @property
  def weights(self) -> tuple[float, ...]:
    """data.mixture_weights as floats, normalized to sum 1 (equal when "")."""
    dirs = self.prepared_dirs
    raw = ([float(w) for w in self.mixture_weights.split(",")] if self.mixture_weights.strip()
           else [1.0] * len(dirs))
    return tuple(w / sum(raw) for w in raw)


@dataclasses.dataclass(frozen=True)
class OptConfig:
  learning_rate: float
  warmup_steps: int
  min_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float
  # Defaults, so configs written before these fields (config.json of old runs) still load.
  schedule: str = "cosine"
  decay_fraction: float = 0.2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpointing: bool
  progress_seconds: float
  grad_accum_steps: int = 1
  init_from: str = ""  # A workdir whose parameters start a fresh run; "" = random init.
  profile_steps: int = 0  # Steps traced by jax.profiler into WORKDIR/tensorboard; 0 = off.
  profile_start: int = 5  # The first traced step (after compilation and warm-up).


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int
  fsdp: int
  expert: int
  tensor: int
  rules: tuple[tuple[str, Any], ...]

  @property
  def shape(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  model: ModelConfig
  moe: MoEConfig
  data: DataConfig
  opt: OptConfig
  train: TrainConfig
  mesh: MeshConfig
  lora: LoRAConfig = LoRAConfig()


def _view(cls, section: str, cd: ml_collections.ConfigDict, **overrides):
  """Builds dataclass `cls` from ConfigDict section; unknown or missing keys are errors."""
  names = {f.name for f in dataclasses.fields(cls)}
  given = set(cd.keys()) | set(overrides)
  for k in sorted(given - names):
    raise ConfigError(f"{section}.{k}: unknown key (known: {', '.join(sorted(names))})")
  defaults = {f.name for f in dataclasses.fields(cls)
              if f.default is not dataclasses.MISSING}
  for k in sorted(names - given - defaults):
    raise ConfigError(f"{section}.{k}: missing")
  values = {k: cd[k] for k in cd.keys()}
  values.update(overrides)
  # Every float of every section, in one place: inf passes range checks such as `> 0` (and
  # nan fails them with a misleading reason), then poisons the run once it is compiled.
  for k, v in sorted(values.items()):
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
      _check(math.isfinite(v), f"{section}.{k}", f"must be finite, got {v!r}")
  return cls(**values)


def _check(cond: bool, key: str, reason: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {reason}")


def _positive(section, obj, *names) -> None:
  for n in names:
    v = getattr(obj, n)
    _check(v > 0, f"{section}.{n}", f"must be > 0, got {v!r}")


def _one_of(key, value, allowed) -> None:
  _check(value in allowed, key, f"unknown value {value!r} (known: {', '.join(allowed)})")


def _check_prepared(data: DataConfig) -> None:
  """data.prepared and data.mixture_weights (read only when data.prepared is set)."""
  for key in ("prepared", "mixture_weights"):
    _check(isinstance(getattr(data, key), str), f"data.{key}",
           f"must be a comma-separated str, got {getattr(data, key)!r}")
  dirs = data.prepared_dirs
  _check(len(set(dirs)) == len(dirs), "data.prepared", f"lists a directory twice: {dirs}")
  if not data.mixture_weights.strip():
    return
  _check(bool(dirs), "data.mixture_weights", "set without data.prepared")
  try:
    weights = [float(w) for w in data.mixture_weights.split(",")]
  except ValueError:
    raise ConfigError(f"data.mixture_weights: {data.mixture_weights!r} is not comma-separated "
                      "numbers") from None
  _check(len(weights) == len(dirs), "data.mixture_weights",
         f"{len(weights)} weights for {len(dirs)} data.prepared directories")
  _check(all(math.isfinite(w) and w > 0 for w in weights), "data.mixture_weights",
         f"must all be finite and > 0, got {data.mixture_weights!r}")


def validate(cd: ml_collections.ConfigDict, vocab_size: int | None = None) -> Config:
  """Checks `cd` and returns typed views; raises ConfigError with a one-line reason.

  `vocab_size` is the tokenizer's; it fills model.vocab_size when that is 0.
  """
  _check("seed" in cd, "seed", "missing")
  _check(isinstance(cd.seed, numbers.Integral) and not isinstance(cd.seed, bool), "seed",
         f"must be an int, got {cd.seed!r}")
  for section in ("model", "moe", "data", "opt", "train", "mesh"):
    _check(section in cd, section, "missing section")
    _check(isinstance(cd[section], ml_collections.ConfigDict), section,
           f"must be a section (ConfigDict), got {cd[section]!r}")
  model = _view(ModelConfig, "model", cd.model)
  dense = model.dense_layers
  _check(isinstance(dense, (list, tuple)) and all(
      isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in dense),
         "model.dense_layers", f"must be a list of block indices, got {dense!r}")
  model = dataclasses.replace(model, dense_layers=tuple(sorted(set(int(i) for i in dense))))
  if model.vocab_size == 0 and vocab_size is not None:
    model = dataclasses.replace(model, vocab_size=vocab_size)
  moe = _view(MoEConfig, "moe", cd.moe)
  data = _view(DataConfig, "data", cd.data)
  opt = _view(OptConfig, "opt", cd.opt)
  train = _view(TrainConfig, "train", cd.train)
  mesh = _view(MeshConfig, "mesh", cd.mesh,
               rules=tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                           for k, v in cd.mesh.rules))

  _positive("model", model, "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "d_ff", "moe_every", "rope_theta", "norm_eps", "init_std")
  _check(model.vocab_size >= 0, "model.vocab_size", "must be >= 0")
  if vocab_size is not None:
    _check(model.vocab_size >= vocab_size, "model.vocab_size",
           f"{model.vocab_size} is smaller than the tokenizer's {vocab_size}")
  _check(model.num_heads % model.num_kv_heads == 0, "model.num_kv_heads",
         f"{model.num_kv_heads} does not divide model.num_heads={model.num_heads}")
  _check(model.head_dim % 2 == 0, "model.head_dim", "must be even (rotary embeddings)")
  _check(0 <= model.first_dense_layers <= model.num_layers, "model.first_dense_layers",
         f"must be in [0, model.num_layers={model.num_layers}]")
  _one_of("model.dtype", model.dtype, DTYPES)
  _one_of("model.remat", model.remat, REMAT_POLICIES)
  _one_of("model.qk_norm", model.qk_norm, QK_NORMS)
  for i in model.dense_layers:
    _check(0 <= i < model.num_layers, "model.dense_layers",
           f"block {i} is not in [0, model.num_layers={model.num_layers})")
  _one_of("model.param_dtype", model.param_dtype, DTYPES)

  _positive("moe", moe, "num_experts", "top_k", "d_expert")
  _check(moe.top_k <= moe.num_experts, "moe.top_k",
         f"{moe.top_k} must be <= moe.num_experts={moe.num_experts}")
  # Imported here: the router and path registries import this module for MoEConfig.
  from moex.moe import dispatch, routing  # pylint: disable=g-import-not-at-top
  _one_of("moe.router", moe.router, tuple(routing.ROUTERS))
  _one_of("moe.dispatch", moe.dispatch, dispatch.names(lambda p: p.training_choice))
  _one_of("moe.grouped_matmul", moe.grouped_matmul, GROUPED_MATMULS)
  _one_of("moe.aux_reduce", moe.aux_reduce, AUX_REDUCES)
  _check(moe.capacity_factor > 0, "moe.capacity_factor",
         f"must be > 0, got {moe.capacity_factor!r}")
  _check(moe.eval_capacity_factor >= 0, "moe.eval_capacity_factor",
         f"must be >= 0 (0 = dropless), got {moe.eval_capacity_factor!r}")
  _check(moe.min_capacity >= 0, "moe.min_capacity", "must be >= 0")
  _one_of("moe.drop_policy", moe.drop_policy, DROP_POLICIES)
  _check(moe.stats_max_experts >= 1, "moe.stats_max_experts", "must be >= 1")
  _check(moe.ep_buffer_factor >= 0, "moe.ep_buffer_factor", "must be >= 0 (0 = never overflow)")
  for name in ("load_balance_weight", "seq_load_balance_weight", "z_loss_weight",
               "bias_update_rate", "num_shared_experts", "d_shared"):
    _check(getattr(moe, name) >= 0, f"moe.{name}", "must be >= 0")
  _check(0 <= moe.jitter < 1, "moe.jitter", f"must be in [0, 1), got {moe.jitter!r}")
  _check(moe.routed_scaling > 0, "moe.routed_scaling", "must be > 0")
  router = routing.ROUTERS[moe.router]
  if router.check is not None:
    router.check(moe)
  if not router.causal:
    # Its routing of a token depends on later tokens of the sequence: a causal decoder
    # would see the future through its router.
    _check(moe.allow_noncausal_routing, "moe.router",
           f"{moe.router} lets a token's routing depend on later tokens of its sequence, "
           "which leaks the future into a causal decoder; set "
           "moe.allow_noncausal_routing=True to use it anyway")

  _positive("data", data, "seq_len", "batch_size", "eval_batches")
  _check(0 < data.val_fraction < 1, "data.val_fraction",
         f"must be in (0, 1), got {data.val_fraction!r}")
  _check(bool(data.source.strip()), "data.source", "must name 'stdlib' or files")
  _check_prepared(data)
  for name in ("document_mask", "document_positions"):
    _check(isinstance(getattr(data, name), bool), f"data.{name}",
           f"must be True or False, got {getattr(data, name)!r}")

  _positive("opt", opt, "learning_rate", "eps")
  _check(opt.warmup_steps >= 0, "opt.warmup_steps", "must be >= 0")
  _check(0 <= opt.min_lr_ratio <= 1, "opt.min_lr_ratio", "must be in [0, 1]")
  _check(opt.grad_clip >= 0, "opt.grad_clip", "must be >= 0 (0 disables clipping)")
  _check(opt.weight_decay >= 0, "opt.weight_decay", f"must be >= 0, got {opt.weight_decay!r}")
  for name in ("b1", "b2"):
    v = getattr(opt, name)
    _check(0 <= v < 1, f"opt.{name}", f"must be in [0, 1), got {v!r}")
  _one_of("opt.schedule", opt.schedule, SCHEDULES)
  _check(0 < opt.decay_fraction <= 1, "opt.decay_fraction",
         f"must be in (0, 1], got {opt.decay_fraction!r}")

  _positive("train", train, "steps", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints", "progress_seconds", "grad_accum_steps")
  _check(isinstance(train.init_from, str), "train.init_from",
         f"must be a str (a workdir path or gs:// URL; '' = off), got {train.init_from!r}")
  _check(train.profile_steps >= 0, "train.profile_steps",
         f"must be >= 0 (0 = no trace), got {train.profile_steps!r}")
  _check(train.profile_start >= 1, "train.profile_start",
         f"must be >= 1 (the first traced step), got {train.profile_start!r}")
  _check(data.batch_size % train.grad_accum_steps == 0, "train.grad_accum_steps",
         f"{train.grad_accum_steps} does not divide data.batch_size={data.batch_size}")

  sizes = mesh.shape
  for a, s in sizes.items():
    _check(s == -1 or s >= 1, f"mesh.{a}", f"must be >= 1 or -1, got {s}")
  _check(sum(s == -1 for s in sizes.values()) <= 1, "mesh", "at most one axis may be -1")
  for logical, axes in mesh.rules:
    _check(logical in LOGICAL_AXES, f"mesh.rules[{logical}]",
           f"unknown logical axis {logical!r} (known: {', '.join(LOGICAL_AXES)})")
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      _check(a is None or a in MESH_AXES, f"mesh.rules[{logical}]",
             f"unknown mesh axis {a!r} (known: {', '.join(MESH_AXES)})")

  lora = _check_lora(_view(LoRAConfig, "lora", cd.lora) if "lora" in cd else LoRAConfig(),
                     model, moe)

  return Config(seed=int(cd.seed), model=model, moe=moe, data=data, opt=opt, train=train,
                mesh=mesh, lora=lora)


def _check_lora(lora: LoRAConfig, model: ModelConfig, moe: MoEConfig) -> LoRAConfig:
  """lora.*: the values, and that each target exists in this model with room for the rank;
  returns the config with its targets resolved to plain names (aliases expanded)."""
  _check(isinstance(lora.rank, numbers.Integral) and not isinstance(lora.rank, bool)
         and lora.rank >= 0, "lora.rank", f"must be an int >= 0 (0 = off), got {lora.rank!r}")
  if not lora.enabled:
    return lora
  _check(lora.alpha > 0, "lora.alpha", f"must be > 0, got {lora.alpha!r}")
  _one_of("lora.scaling", lora.scaling, LORA_SCALINGS)
  _one_of("lora.dtype", lora.dtype, DTYPES)
  _check(isinstance(lora.train_router, bool), "lora.train_router",
         f"must be True or False, got {lora.train_router!r}")
  _check(isinstance(lora.targets, str), "lora.targets",
         f"must be a comma-separated str, got {lora.targets!r}")
  names = [x.strip() for x in lora.targets.split(",") if x.strip()]
  known = LORA_TARGETS + tuple(LORA_ALIASES)
  for t in names:
    _check(t in known, "lora.targets", f"unknown target {t!r} (known: {', '.join(known)})")
  moe_layers = model.moe_layers
  has = {"q": True, "k": True, "v": True, "o": True,
         "dense": len(moe_layers) < model.num_layers, "shared": bool(
             moe_layers and moe.num_shared_experts), "experts": bool(moe_layers)}
  what = {"dense": "no dense block", "shared": "no shared experts",
          "experts": "no MoE block (routed experts)"}
  targets = set()
  for t in names:
    if t == "all":  # every target this model has
      targets.update(x for x in LORA_TARGETS if has[x])
      continue
    for x in LORA_ALIASES.get(t, (t,)):
      _check(has[x], "lora.targets", f"{x}: the model has {what.get(x)}")
      targets.add(x)
  _check(bool(targets) or lora.train_router, "lora.targets",
         "empty: name at least one target (or set lora.train_router)")
  _check(not lora.train_router or bool(moe_layers), "lora.train_router",
         "the model has no router (no MoE block)")
  # The rank of B A cannot exceed the smaller side of the weight it adapts.
  d, ha, ja = model.d_model, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
  sides = {"q": (d, ha), "k": (d, ja), "v": (d, ja), "o": (ha, d), "dense": (d, model.d_ff),
           "shared": (d, moe.num_shared_experts * (moe.d_shared or moe.d_expert)),
           "experts": (d, moe.d_expert)}
  for x in sorted(targets):
    _check(lora.rank <= min(sides[x]), "lora.rank",
           f"{lora.rank} is above the smaller side {min(sides[x])} of the {x} weights "
           f"{sides[x][0]}x{sides[x][1]}")
  return dataclasses.replace(lora, targets=",".join(x for x in LORA_TARGETS if x in targets))
