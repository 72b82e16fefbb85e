"""Benchmark of one MoE layer against the dense SwiGLU block with the same active FLOPs.

  python -m moex.bench.moe_layer [--json=out.json] [--repeats=5]

For T=4096 tokens (16 sequences of 256), D=512, float32: the standard shape (E=8, K=2,
F=1024) and a fine-grained one (E=64, K=8, F=128). Every path is measured in the same
process: forward and forward+backward milliseconds (medians after a warm-up), the ratio to
the dense block (hidden K*F), and the executed-FLOP ratio: XLA's cost analysis of the
compiled forward divided by the analytic work that must be done (6*T*K*D*F for the experts
plus 2*T*D*E for the router), which exposes a path that quietly computes densely. XLA
counts a loop body once, so for the "chunked" backend the loop bodies are multiplied by
the trip counts the routing produced (gmm.chunked_executed_rows).
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from moex import config as config_lib
from moex.model.layers import SwiGLU
from moex.moe import balancing, gmm, routing
from moex.moe.layer import MoEBlock

nnx.use_eager_sharding(False)

_JSON = flags.DEFINE_string("json", None, "Also write the results here as JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median).")
_SHAPES = flags.DEFINE_list("shapes", ["standard", "fine_grained"], "Shapes to run.")

SHAPES = {
    "standard": dict(num_experts=8, top_k=2, d_expert=1024),
    "fine_grained": dict(num_experts=64, top_k=8, d_expert=128),
}
SEQUENCES, SEQ_LEN, D_MODEL = 16, 256, 512
PATHS = (("capacity_1.25", dict(dispatch="capacity", capacity_factor=1.25)),
         ("capacity_2.0", dict(dispatch="capacity", capacity_factor=2.0)),
         ("dropless_chunked", dict(dispatch="dropless", grouped_matmul="chunked")),
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
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def _measure(module: nnx.Module, apply, x) -> dict:
  """fwd / fwd+bwd ms and executed forward FLOPs of `apply(module, x)`."""
  graphdef, params = nnx.split(module)

  def fwd(p, x):
    return apply(nnx.merge(graphdef, p), x)

  def loss(p, x):
    return jnp.sum(fwd(p, x) ** 2)

  fwd_jit = jax.jit(fwd)
  grad_jit = jax.jit(jax.grad(loss, argnums=(0, 1)))
  flops = fwd_jit.lower(params, x).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
  return {"fwd_ms": _time(fwd_jit, params, x), "fwd_bwd_ms": _time(grad_jit, params, x),
          "executed_gflops": flops / 1e9}


def _chunked_loop_correction(block: MoEBlock, x, d: int, f: int) -> float:
  """XLA's cost analysis counts a loop body once; add the chunks the loops really ran."""
  logits = block.router(x)
  r = routing.ROUTERS[block.cfg.router](logits, block.cfg, routing.Context(train=True))
  sizes_E = balancing.expert_counts(r.expert_index_GxSxK, block.cfg.num_experts).sum(0)
  m = int(sizes_E.sum())
  chunk = gmm.default_chunk(m, block.cfg.num_experts)
  rows = int(gmm.chunked_executed_rows(sizes_E, chunk))
  return 3 * (rows - chunk) * 2 * d * f


def run_shape(name: str) -> list[dict]:
  shape = SHAPES[name]
  e, k, f = shape["num_experts"], shape["top_k"], shape["d_expert"]
  t, d = SEQUENCES * SEQ_LEN, D_MODEL
  x = jax.random.normal(jax.random.key(0), (SEQUENCES, SEQ_LEN, d), jnp.float32)
  analytic_moe = 6 * t * k * d * f + 2 * t * d * e
  model_cfg, _ = _configs(shape, {})
  dense = SwiGLU(d, k * f, model_cfg, nnx.Rngs(0))
  base = _measure(dense, lambda m, x: m(x), x)
  rows = [{"shape": name, "path": "dense_swiglu", **base, "ratio_fwd_bwd": 1.0,
           "flop_ratio": base["executed_gflops"] * 1e9 / (6 * t * k * d * f)}]
  for path_name, path in PATHS:
    model_cfg, moe_cfg = _configs(shape, path)
    block = MoEBlock(model_cfg, moe_cfg, nnx.Rngs(0))
    r = _measure(block, lambda m, x: m(x, train=True)[0], x)
    if path.get("grouped_matmul") == "chunked":
      r["executed_gflops"] += _chunked_loop_correction(block, x, d, f) / 1e9
    rows.append({"shape": name, "path": path_name, **r,
                 "ratio_fwd_bwd": r["fwd_bwd_ms"] / base["fwd_bwd_ms"],
                 "flop_ratio": r["executed_gflops"] * 1e9 / analytic_moe})
  return rows


def main(argv):
  del argv
  rows = []
  print(f"MoE layer, T={SEQUENCES * SEQ_LEN} ({SEQUENCES}x{SEQ_LEN}), D={D_MODEL}, float32, "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}")
  header = f"{'shape':13s} {'path':20s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} " \
           f"{'vs dense':>8s} {'exec/analytic FLOPs':>20s}"
  print(header)
  for name in _SHAPES.value:
    for r in run_shape(name):
      rows.append(r)
      print(f"{r['shape']:13s} {r['path']:20s} {r['fwd_ms']:8.1f} {r['fwd_bwd_ms']:11.1f} "
            f"{r['ratio_fwd_bwd']:8.2f} {r['flop_ratio']:20.3f}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
