"""Dense -> MoE upcycling, and MoE -> more experts: python -m moex.upcycle.

  python -m moex.upcycle --from=workdirs/dense --workdir=workdirs/up \
      --config=experiments/upcycling.py:copy --method=copy [--router_std=0.02] \
      [--noise_fraction=0.5 --noise_std=0] [--drop_ratio=0.5] [--config.seed=1]
  python -m moex.main --config=experiments/upcycling.py:copy --workdir=workdirs/up_run \
      --config.train.init_from=workdirs/up

reads a moex workdir (its config.json and params/ or newest checkpoint: a moex run or an
imported Llama/Mistral/MoE) and writes WORKDIR/params/ for the target --config: attention,
norms, embeddings and dense blocks copied, each block the target makes MoE built by
--method (moex/moe/upcycling.py; random draws seeded by the target's seed and the block),
the router bias (sigmoid_bias) zero or the source's. Then WORKDIR/upcycle.json (method,
options, source) and last WORKDIR/config.json (the resolved target config with
train.init_from=WORKDIR): a directory without config.json is an upcycle that did not finish
(re-running the command replaces it). WORKDIR is an init_from source (params/); the
optimizer state is always fresh. Train in another workdir: a run inside WORKDIR would start
from params/, but params/ would then shadow its checkpoints for any later init_from or
export (init_from reads params/ first).

Refusals (one line naming the key): target shapes outside the FFN differ; a block MoE in the
source but dense in the target; a dense method on an MoE block or expand on a dense one;
widths, expert counts or top-k that do not fit the method; shared experts (dense methods);
routers with which granular cannot equal the dense model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zlib

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from moex import errors
from moex import cli, config as config_lib
from moex.config import Config, ConfigError
from moex.moe import routing, upcycling
from moex.parallel import mesh as mesh_lib
from moex.train import checkpoint, init_from, loop, state as state_lib, workdir as workdir_lib

METHODS = ("copy", "noise", "drop", "granular", "expand")
DENSE_METHODS = ("copy", "noise", "drop", "granular")
SHAPE_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "qk_norm")
# Routers that choose whole virtual groups (granular; their weights must also sum to
# routed_scaling) and those whose expand to M*E experts with top_k * M is exact.
GRANULAR_ROUTERS = routing.names(lambda r: r.ties_chosen_together or r.consecutive)
EXPAND_EXACT = routing.names(lambda r: r.ties_chosen_together)
RECORD = "upcycle.json"


class UpcycleError(ValueError, errors.Refusal):
  """A one-line reason the upcycling cannot proceed (not a config key: a flag or a path)."""


@dataclasses.dataclass(frozen=True)
class Options:
  """--method and its settings (flags of the same names)."""

  method: str = "copy"
  router_std: float = 0.02  # New router kernels: N(0, router_std) (OLMoE's 0.02).
  noise_fraction: float = 0.5  # noise: share of each expert matrix's entries replaced.
  noise_std: float = 0.0  # noise: sigma of the replacements; 0 = the dense matrix's own std.
  drop_ratio: float = 0.5  # drop: share r of each expert's hidden units re-initialized.

  def check(self) -> None:
    if self.method not in METHODS:
      raise UpcycleError(f"--method={self.method}: unknown (known: {', '.join(METHODS)})")
    ranges = {"router_std": self.router_std >= 0, "noise_std": self.noise_std >= 0,
              "noise_fraction": 0 <= self.noise_fraction <= 1,
              "drop_ratio": 0 <= self.drop_ratio <= 1}
    for name, ok in ranges.items():
      if not ok:
        raise UpcycleError(f"--{name}={getattr(self, name)}: out of range "
                           f"({'>= 0' if name.endswith('std') else 'in [0, 1]'})")


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
  for i in range(cfg.model.num_layers):
    src_moe, tgt_moe = src.model.is_moe_layer(i), cfg.model.is_moe_layer(i)
    if src_moe and not tgt_moe:
      raise ConfigError(f"{_layer_key(cfg.model, i)}: makes block {i} dense, which is MoE in "
                        f"{where}; upcycling never turns an MoE block dense")
    if not src_moe and not tgt_moe and src.model.d_ff != cfg.model.d_ff:
      raise ConfigError(f"model.d_ff: {cfg.model.d_ff} differs from {where}'s "
                        f"{src.model.d_ff} for dense block {i}, which is copied")
    if src_moe and method in DENSE_METHODS:
      raise ConfigError(f"{where}: {_layer_key(src.model, i)} makes block {i} an MoE block; "
                        f"--method={method} upcycles dense blocks (--method=expand adds "
                        "experts to an MoE)")
    if tgt_moe and not src_moe and method == "expand":
      raise ConfigError(f"{_layer_key(cfg.model, i)}: makes block {i} MoE, which is dense in "
                        f"{where}; --method=expand only adds experts to MoE blocks")


def _check_dense_method(src: Config, cfg: Config, method: str, where: str) -> int:
  """The target's MoE section against a dense method; returns the granularity G (1 unless
  granular)."""
  moe, f = cfg.moe, src.model.d_ff
  if moe.num_shared_experts:
    raise ConfigError(f"moe.num_shared_experts: {moe.num_shared_experts}, but --method="
                      f"{method} makes routed experts only; set it to 0")
  if method != "granular":
    if moe.d_expert != f:
      raise ConfigError(f"moe.d_expert: {moe.d_expert}, but --method={method} copies the "
                        f"dense FFN: set it to {where}'s model.d_ff={f} (or use "
                        "--method=granular for narrower experts)")
    return 1
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
  if not routing.ROUTERS[moe.router].sums_to_scaling(moe):
    raise ConfigError(f"moe.renormalize: granular with {moe.router} needs True (without it "
                      "the chosen weights do not sum to one)")
  if routing.ROUTERS[moe.router].group_limited and moe.num_groups != 1:
    raise ConfigError(f"moe.num_groups: {moe.num_groups}; granular needs 1 (group-limited "
                      "routing can split a virtual group)")
  return g


def _check_expand(src: Config, cfg: Config, where: str) -> None:
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
  if routing.ROUTERS[t.router].group_limited and t.num_groups != 1:
    raise ConfigError(f"moe.num_groups: {t.num_groups}; expand needs 1 (duplicated experts "
                      "would change the expert groups)")


def check(src: Config, cfg: Config, method: str, where: str) -> int:
  """All refusals of (source, target, method), each one ConfigError line naming the key;
  returns the granularity G."""
  if not cfg.model.moe_layers:
    raise ConfigError("model.first_dense_layers: the target config has no MoE block")
  _check_blocks(src, cfg, method, where)
  if method == "expand":
    _check_expand(src, cfg, where)
    return 1
  return _check_dense_method(src, cfg, method, where)


def step0_note(src: Config, cfg: Config, method: str) -> str | None:
  """Why the upcycled model's step-0 output differs from the source's, or None when it is
  the same (dropless evaluation; training dispatch may drop)."""
  moe = cfg.moe
  if method in ("noise", "drop"):
    return f"--method={method} changes the experts by design"
  if method == "granular":
    return None
  if method == "copy":
    if routing.ROUTERS[moe.router].sums_to_scaling(moe) and moe.routed_scaling == 1:
      return None
    return (f"the moe.router={moe.router!r} weights (renormalize={moe.renormalize}, "
            f"routed_scaling={moe.routed_scaling}) do not sum to one per token")
  m = moe.num_experts // src.moe.num_experts
  same = (moe.router == src.moe.router and moe.router in EXPAND_EXACT and
          moe.routed_scaling == src.moe.routed_scaling and moe.renormalize == src.moe.renormalize
          and moe.top_k == m * src.moe.top_k)
  if same:
    return None
  return (f"expand keeps the same output only with moe.top_k={m * src.moe.top_k} (x{m}) and "
          f"the source's router ({', '.join(EXPAND_EXACT)}); with moe.top_k={moe.top_k} each "
          "token's choices include copies of the same expert")


def _rng(seed: int, block: int) -> np.random.Generator:
  return np.random.default_rng([seed & 0xFFFFFFFF, block, zlib.crc32(b"moex.upcycle")])


def _moe_block(src_ffn: dict, src_bias, cfg: Config, opts: Options, g: int,
               rng: np.random.Generator) -> tuple[dict, np.ndarray | None]:
  """The target's ffn parameters of one MoE block and its router bias (None if none)."""
  moe, e = cfg.moe, cfg.moe.num_experts
  has_bias = routing.ROUTERS[moe.router].has_bias
  if opts.method == "expand":
    ex = src_ffn["experts"]
    out = upcycling.expand(upcycling.MoEFFN(src_ffn["router"]["kernel_DxE"], ex["gate_ExDxF"],
                                            ex["up_ExDxF"], ex["down_ExFxD"]), e)
    bias = upcycling.expand_bias(src_bias, e) if has_bias else None
  else:
    dense = upcycling.DenseFFN(src_ffn["gate_DxF"], src_ffn["up_DxF"], src_ffn["down_FxD"])
    std = opts.router_std
    if opts.method == "copy":
      out = upcycling.copy(dense, e, std, rng)
    elif opts.method == "noise":
      out = upcycling.noise(dense, e, std, opts.noise_fraction, opts.noise_std, rng)
    elif opts.method == "drop":
      out = upcycling.drop(dense, e, std, opts.drop_ratio, rng)
    else:
      out = upcycling.granular(dense, e, g, std, g / moe.routed_scaling, rng)
    bias = np.zeros((e,), np.float32) if has_bias else None
  params = {"router": {"kernel_DxE": out.router_DxE},
            "experts": {"gate_ExDxF": out.gate_ExDxF, "up_ExDxF": out.up_ExDxF,
                        "down_ExFxD": out.down_ExFxD}}
  if "shared" in src_ffn:  # expand only (dense methods refuse shared experts)
    params["shared"] = src_ffn["shared"]
  return params, bias


def build(src_params: dict, src_buffers: dict, src: Config, cfg: Config, opts: Options,
          g: int) -> tuple[dict, dict]:
  """The target's (params, buffers) as nested dicts of numpy arrays."""
  params = {k: v for k, v in src_params.items() if not k.startswith("block_")}
  buffers = {}
  for i in range(cfg.model.num_layers):
    name = f"block_{i}"
    block = dict(src_params[name])
    if cfg.model.is_moe_layer(i) and (opts.method == "expand" or not src.model.is_moe_layer(i)):
      src_bias = src_buffers.get(name, {}).get("ffn", {}).get("router", {}).get("bias_E")
      block["ffn"], bias = _moe_block(src_params[name]["ffn"], src_bias, cfg, opts, g,
                                      _rng(cfg.seed, i))
      if bias is not None:
        buffers[name] = {"ffn": {"router": {"bias_E": bias}}}
    elif name in src_buffers:
      buffers[name] = src_buffers[name]
    params[name] = block
  return params, buffers


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
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = jax.device_put(x.astype(a.dtype), a.sharding)
  return out


def _flat(tree: dict, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def read_config(source: str) -> Config:
  """The validated config.json of workdir `source`."""
  path = workdir_lib.path(source) / "config.json"
  if not path.exists():
    raise UpcycleError(f"--from={source}: no config.json (not a moex workdir, or an import "
                       "or upcycle that did not finish)")
  try:
    cd = ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as e:
    raise UpcycleError(f"{path}: not JSON ({e})") from None
  try:
    return config_lib.validate(cd)
  except ConfigError as e:
    raise UpcycleError(f"{path}: {e}") from None


def read_params(source: str, src: Config) -> tuple[dict, dict, str]:
  """(params, buffers as numpy on the host, what was read) of workdir `source`."""
  one = dataclasses.replace(src.mesh, data=1, fsdp=1, expert=1, tensor=1)
  mesh = mesh_lib.make_mesh(one, devices=jax.devices()[:1])
  _, abs_p, abs_b = state_lib.abstract_variables(dataclasses.replace(src, mesh=one), mesh)
  label = init_from.locate(source)[1]
  params, buffers = init_from.load_params(source, abs_p, abs_b)
  to_np = lambda x: np.asarray(jax.device_get(x))
  return jax.tree.map(to_np, params), jax.tree.map(to_np, buffers or {}), label


def upcycle(source: str, workdir: str, cd: ml_collections.ConfigDict,
            opts: Options) -> tuple[Config, dict]:
  """Source workdir -> WORKDIR/params/, upcycle.json, config.json (the module docstring);
  returns the target config and the record written to upcycle.json."""
  opts.check()
  out = workdir_lib.path(workdir)
  if (out / "config.json").exists():
    raise UpcycleError(f"--workdir={workdir}: already holds a model or a run (config.json); "
                       "pick a new directory")
  cfg, mesh = loop.prepare(cd)
  where = f"{source}/config.json"
  src = read_config(source)
  g = check(src, cfg, opts.method, where)
  src_params, src_buffers, label = read_params(source, src)
  note = step0_note(src, cfg, opts.method)
  if note:
    logging.warning("upcycle: the step-0 model will differ from %s: %s", source, note)
  params, buffers = build(src_params, src_buffers, src, cfg, opts, g)
  del src_params
  _, abs_p, abs_b = state_lib.abstract_variables(cfg, mesh)
  placed_p, placed_b = _place(params, abs_p, "parameters"), _place(buffers, abs_b, "buffers")
  del params
  workdir_lib.make(workdir)
  init_from.save_params(workdir, placed_p, placed_b)
  record = {"method": opts.method, "options": dataclasses.asdict(opts), "source": source,
            "source_read": label, "seed": cfg.seed, "granularity": g,
            "moe_layers": list(cfg.model.moe_layers), "step0_same_as_source": note is None,
            "step0_note": note}
  (out / RECORD).write_text(json.dumps(record, indent=2))
  resolved = cd.to_dict()
  resolved["model"]["vocab_size"] = cfg.model.vocab_size
  resolved["train"]["init_from"] = str(workdir)
  (out / "config.json").write_text(json.dumps(resolved, indent=2, default=str))  # last
  return cfg, record


def _define_flags():
  """Flags only when run as a program (importing the module defines none); returns the
  --config holder."""
  flags.DEFINE_string("from", None, "The source workdir (dense for copy, noise, drop, "
                      "granular; MoE for expand).")
  flags.DEFINE_string("workdir", None, "The new directory: WORKDIR/params/ etc.")
  config = config_flags.DEFINE_config_file("config", None, "The target (MoE) config.",
                                           lock_config=False)
  flags.DEFINE_enum("method", "copy", METHODS, "How experts are initialized.")
  flags.DEFINE_float("router_std", Options.router_std, "New router kernel std.")
  flags.DEFINE_float("noise_fraction", Options.noise_fraction,
                     "noise: share of each expert matrix's entries replaced.")
  flags.DEFINE_float("noise_std", Options.noise_std,
                     "noise: replacement std; 0 = the dense matrix's own.")
  flags.DEFINE_float("drop_ratio", Options.drop_ratio,
                     "drop: share of each expert's hidden units re-initialized.")
  flags.mark_flags_as_required(["from", "workdir", "config"])
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  source, workdir = f["from"].value, f.workdir
  opts = Options(f.method, f.router_std, f.noise_fraction, f.noise_std, f.drop_ratio)
  try:
    cfg, record = upcycle(source, workdir, f.config, opts)
  except (UpcycleError, ConfigError, workdir_lib.WorkdirError,
          checkpoint.CheckpointError) as e:
    sys.exit(f"moex.upcycle: {e}")
  same = "equal to the source" if record["step0_same_as_source"] else record["step0_note"]
  print(f"moex.upcycle: {opts.method}: {source} -> {workdir} "
        f"({len(cfg.model.moe_layers)} MoE blocks of {cfg.model.num_layers}, "
        f"{cfg.moe.num_experts} experts, top-{cfg.moe.top_k}; step 0: {same}); continue with "
        f"python -m moex.main --config=... --workdir=RUN --config.train.init_from={workdir}",
        flush=True)


if __name__ == "__main__":
  _config = _define_flags()
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _config))
