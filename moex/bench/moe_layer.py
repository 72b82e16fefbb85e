"""Benchmark of one MoE layer against the dense SwiGLU block with the same active FLOPs.

  python -m moex.bench.moe_layer [--json=out.json] [--repeats=5] [--shapes=...] [--paths=...]

For T=4096 tokens (16 sequences of 256), D=512, float32: the standard shape (E=8, K=2,
F=1024) and two fine-grained ones (E=64, K=8, F=128 and E=256, K=8, F=64). Every path is
measured in the same process: forward and forward+backward milliseconds (medians after a
warm-up), the ratio to the dense block (hidden K*F), the share of the matmul peak, and the
executed-FLOP ratio: XLA's cost analysis of the compiled forward divided by the analytic
work that must be done (6*T*K*D*F for the experts plus 2*T*D*E for the router), which
exposes a path that quietly computes densely. XLA counts a loop body once, so for the
"chunked" backend the loop bodies are multiplied by the trip counts the routing produced
(gmm.chunked_executed_rows).

The peak is a float32 matmul probe (moex.train.flops.measure_matmul_peak) taken in this
process before and after the timed runs; "% peak" divides the analytic forward+backward
FLOPs (3x the forward's) per second by the better of the two, and both probes are printed:
if they differ much, another job shared the cores and the table is not to be trusted.

Where the dropless path's time goes (--breakdown, on by default) is measured by nested
ablation of the same routing, sort, gathers, experts and combine as
dispatch.dropless_dispatch, forward and forward+backward (backward = the difference):
the whole layer; the experts replaced by the identity; then no sort or gathers either (each
token's K copies combined directly); then the router alone. Each part is the time one
removal saves (experts, permutation, combine, router), so the parts add up to the layer.
Parts timed alone do not add up: XLA fuses a gather's backward with its neighbours.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from moex import cli, config as config_lib
from moex.model.layers import SwiGLU
from moex.train import flops
from moex.moe import balancing, dispatch, gmm, parallel, routing
from moex.moe.layer import MoEBlock

nnx.use_eager_sharding(False)

REPEATS = 5  # timed runs per measurement (median); --repeats sets it


def define_flags() -> None:
  """Flags only when run as a program (cli.run calls it)."""
  flags.DEFINE_string("json", None, "Also write the results here as JSON.")
  flags.DEFINE_integer("repeats", REPEATS, "Timed runs per measurement (median).")
  flags.DEFINE_list("shapes", ["standard", "fine_grained", "fine_grained_256"],
                    "Shapes to run.")
  flags.DEFINE_list("paths", None, "Paths to run (default: all of PATHS; none: the "
                    "breakdown only).")
  flags.DEFINE_bool("breakdown", True, "Time the dropless path's parts.")

SHAPES = {
    "standard": dict(num_experts=8, top_k=2, d_expert=1024),
    "fine_grained": dict(num_experts=64, top_k=8, d_expert=128),
    "fine_grained_256": dict(num_experts=256, top_k=8, d_expert=64),
}
SEQUENCES, SEQ_LEN, D_MODEL = 16, 256, 512
PATHS = (("capacity_1.25", dict(dispatch="capacity", capacity_factor=1.25)),
         ("capacity_2.0", dict(dispatch="capacity", capacity_factor=2.0)),
         ("dropless_chunked", dict(dispatch="dropless", grouped_matmul="chunked")),
         ("dropless_blocked", dict(dispatch="dropless", grouped_matmul="blocked")),
         ("dropless_tiled", dict(dispatch="dropless", grouped_matmul="tiled")),
         ("dropless_ragged_dot", dict(dispatch="dropless", grouped_matmul="ragged_dot")))


def _configs(shape: dict, path: dict):
  model = config_lib.ModelConfig(
      vocab_size=256, d_model=D_MODEL, num_layers=1, num_heads=8, num_kv_heads=8,
      head_dim=64, d_ff=shape["top_k"] * shape["d_expert"], first_dense_layers=0, moe_every=1,
      rope_theta=1e4, norm_eps=1e-6, init_std=0.02, dtype="float32", param_dtype="float32")
  moe = config_lib.MoEConfig(min_capacity=0, **shape, **path)
  return model, moe


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # warm-up (and compile)
  times = []
  for _ in range(flags.FLAGS.repeats if "repeats" in flags.FLAGS else REPEATS):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def _fwd_bwd_ms(fn, *args) -> tuple[float, float]:
  """(forward ms, forward+backward ms) of fn(*args) -> array, differentiated in every
  floating-point argument. Every argument is passed to the jitted function (a closed-over
  index array would be a constant, and XLA would fold the sorts at compile time)."""
  is_float = [jnp.issubdtype(jax.tree.leaves(a)[0].dtype, jnp.floating) for a in args]

  def loss(floats, others):
    floats, others = iter(floats), iter(others)
    return jnp.sum(fn(*(next(floats) if f else next(others) for f in is_float)) ** 2)

  grad = jax.jit(jax.grad(loss))
  floats = tuple(a for a, f in zip(args, is_float) if f)
  others = tuple(a for a, f in zip(args, is_float) if not f)
  return _time(jax.jit(fn), *args), _time(grad, floats, others)


def _measure(module: nnx.Module, apply, x) -> dict:
  """fwd / fwd+bwd ms and executed forward FLOPs of `apply(module, x)`."""
  graphdef, params = nnx.split(module)

  def fwd(p, x):
    return apply(nnx.merge(graphdef, p), x)

  flops = jax.jit(fwd).lower(params, x).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
  fwd_ms, fwd_bwd_ms = _fwd_bwd_ms(fwd, params, x)
  return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "executed_gflops": flops / 1e9}


def _loop_correction(block: MoEBlock, x, d: int, f: int, backend: str) -> float:
  """XLA's cost analysis counts a loop body once; add the chunks the loops really ran (the
  "chunked" backend's, and the overflow loops of "blocked")."""
  logits = block.router(x)
  r = routing.ROUTERS[block.cfg.router](logits, block.cfg, routing.Context(train=True))
  e = block.cfg.num_experts
  sizes_E = balancing.expert_counts(r.expert_index_GxSxK, e).sum(0)
  m = int(sizes_E.sum())
  chunk = gmm.default_chunk(m, e)
  if backend == "blocked":
    sizes_E = jnp.maximum(sizes_E - gmm.BlockedLayout(sizes_E, m).capacity, 0)
  rows = int(gmm.chunked_executed_rows(sizes_E, chunk))
  return 3 * (rows - chunk) * 2 * d * f


def breakdown(name: str, x) -> list[dict]:
  """The dropless path's parts by nested ablation (see the module docstring)."""
  shape = SHAPES[name]
  model_cfg, moe_cfg = _configs(shape, dict(dispatch="dropless", grouped_matmul="auto"))
  block = MoEBlock(model_cfg, moe_cfg, nnx.Rngs(0))
  g, s, d = x.shape
  k = moe_cfg.top_k
  router_DxE = block.router.kernel_DxE[...]
  w = block.experts.weights()
  plan = block.plan(True, s)
  identity = dispatch.Experts(buffered=None,
                              grouped=lambda rows, sizes: (rows, jnp.ones(rows.shape[0], bool)))

  def route(kernel, x):
    return routing.ROUTERS[moe_cfg.router](jnp.einsum("gsd,de->gse", x, kernel), moe_cfg,
                                           routing.Context(train=True))

  def layer(kernel, w, x):  # router, sort and gathers, experts, combine
    return dispatch.PATHS["dropless"](x, route(kernel, x), plan,
                                      parallel.experts(w, parallel.Axes(), "auto", 0))[0]

  def without_experts(kernel, w, x):  # the experts replaced by the identity
    return dispatch.PATHS["dropless"](x, route(kernel, x), plan, identity)[0]

  def without_permutation(kernel, w, x):  # and no sort or gathers: each token's K copies
    weight_GxSxK = route(kernel, x).combine_weight_GxSxK
    return jnp.einsum("gskd,gsk->gsd", jnp.broadcast_to(x[:, :, None], (g, s, k, d)),
                      weight_GxSxK)

  def router_only(kernel, w, x):  # and no combine: the routing's weights
    return route(kernel, x).combine_weight_GxSxK

  variants = [layer, without_experts, without_permutation, router_only]
  ms = [_fwd_bwd_ms(v, router_DxE, w, x) for v in variants]
  ms.append((0.0, 0.0))
  (whole_f, whole_fb) = ms[0]
  rows = []
  for part, (a, b) in zip(("experts", "permutation", "combine", "router"),
                          zip(ms[:-1], ms[1:])):
    f_ms, fb_ms = a[0] - b[0], a[1] - b[1]
    rows.append({"shape": name, "part": part, "fwd_ms": f_ms, "bwd_ms": fb_ms - f_ms,
                 "fwd_share": f_ms / whole_f, "bwd_share": (fb_ms - f_ms) / (whole_fb - whole_f)})
  rows.append({"shape": name, "part": "layer", "fwd_ms": whole_f, "bwd_ms": whole_fb - whole_f,
               "fwd_share": 1.0, "bwd_share": 1.0})
  return rows


def run_shape(name: str, peak: float) -> list[dict]:
  shape = SHAPES[name]
  e, k, f = shape["num_experts"], shape["top_k"], shape["d_expert"]
  t, d = SEQUENCES * SEQ_LEN, D_MODEL
  x = jax.random.normal(jax.random.key(0), (SEQUENCES, SEQ_LEN, d), jnp.float32)
  analytic_moe = 6 * t * k * d * f + 2 * t * d * e
  model_cfg, _ = _configs(shape, {})
  dense = SwiGLU(d, k * f, model_cfg, nnx.Rngs(0))
  base = _measure(dense, lambda m, x: m(x), x)
  of_peak = lambda fwd_flops, ms: 3 * fwd_flops / (ms / 1e3) / peak
  rows = [{"shape": name, "path": "dense_swiglu", **base, "ratio_fwd_bwd": 1.0,
           "flop_ratio": base["executed_gflops"] * 1e9 / (6 * t * k * d * f),
           "of_peak": of_peak(6 * t * k * d * f, base["fwd_bwd_ms"])}]
  for path_name, path in PATHS:
    if flags.FLAGS.paths and path_name not in flags.FLAGS.paths:  # --paths=none: only the breakdown
      continue
    model_cfg, moe_cfg = _configs(shape, path)
    block = MoEBlock(model_cfg, moe_cfg, nnx.Rngs(0))
    r = _measure(block, lambda m, x: m(x, train=True)[0], x)
    if path.get("grouped_matmul") in ("chunked", "blocked"):
      r["executed_gflops"] += _loop_correction(block, x, d, f, path["grouped_matmul"]) / 1e9
    rows.append({"shape": name, "path": path_name, **r,
                 "ratio_fwd_bwd": r["fwd_bwd_ms"] / base["fwd_bwd_ms"],
                 "flop_ratio": r["executed_gflops"] * 1e9 / analytic_moe,
                 "of_peak": of_peak(analytic_moe, r["fwd_bwd_ms"])})
  return rows


def _probe(when: str) -> flops.Probe:
  p = flops.measure_matmul_peak()
  print(f"matmul peak {when}: {p.best / 1e9:.1f} GFLOP/s (float32 2048^3, median "
        f"{p.median / 1e9:.1f}, spread {p.spread:.0%})", flush=True)
  return p


def main(argv):
  del argv
  rows, parts = [], []
  print(f"MoE layer, T={SEQUENCES * SEQ_LEN} ({SEQUENCES}x{SEQ_LEN}), D={D_MODEL}, float32, "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}")
  before = _probe("before")
  header = f"{'shape':16s} {'path':20s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} " \
           f"{'vs dense':>8s} {'% peak':>7s} {'exec/analytic FLOPs':>20s}"
  print(header)
  for name in flags.FLAGS.shapes:
    for r in run_shape(name, before.best) if flags.FLAGS.paths != ["none"] else []:
      rows.append(r)
      print(f"{r['shape']:16s} {r['path']:20s} {r['fwd_ms']:8.1f} {r['fwd_bwd_ms']:11.1f} "
            f"{r['ratio_fwd_bwd']:8.2f} {r['of_peak']:7.1%} {r['flop_ratio']:20.3f}", flush=True)
  if flags.FLAGS.breakdown:
    print(f"\n{'shape':16s} {'dropless part':14s} {'fwd ms':>8s} {'share':>6s} "
          f"{'bwd ms':>8s} {'share':>6s}")
    for name in flags.FLAGS.shapes:
      x = jax.random.normal(jax.random.key(0), (SEQUENCES, SEQ_LEN, D_MODEL), jnp.float32)
      for r in breakdown(name, x):
        parts.append(r)
        print(f"{r['shape']:16s} {r['part']:14s} {r['fwd_ms']:8.1f} {r['fwd_share']:6.0%} "
              f"{r['bwd_ms']:8.1f} {r['bwd_share']:6.0%}", flush=True)
  after = _probe("after")
  peak = max(before.best, after.best)
  if peak > before.best:  # rescale "% peak" to the better probe
    for r in rows:
      r["of_peak"] *= before.best / peak
  print(f"% peak is against {before.best / 1e9:.1f} GFLOP/s (the probe before); the better "
        f"probe is {peak / 1e9:.1f}" + (" (JSON uses it)" if peak > before.best else ""))
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "peak_before": before._asdict(),
                 "peak_after": after._asdict(), "peak": peak, "rows": rows,
                 "breakdown": parts}, f, indent=2)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.bench.moe_layer")
