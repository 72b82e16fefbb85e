"""Generation throughput: an MoE against dense models of its active and of its total size.

  python -m moex.bench.generate [--batches=1,8,32] [--prompt_len=64] [--steps=32] \\
      [--json=out.json] [--figure=docs/figures/generate_decode.png]

Three decoders with the same attention, embeddings and depth, built with random weights in
one process and measured one after the other on the same machine (float32):
  moe           E=8 experts of width F, top-2, in every block
  dense_active  a dense SwiGLU of width K*F: the MoE's active parameters per token
  dense_total   a dense SwiGLU of width E*F: the MoE's total parameters
plus `moe_grouped`: the MoE at batch 1 with its decode steps forced onto the dropless
grouped matmul (which visits every expert) instead of the gather path, to measure what
gathering the K chosen experts' weights is worth.

For each batch size: prefill tokens/s (one prefill of `batch` prompts of `prompt_len`
tokens, best of --repeats) and the decode step time (median over all decode steps), against
the memory-traffic bound: the bytes of weights and cache one decode step must read (every
non-expert weight, the weights of each expert some token of the step chose, one embedding
row per sequence, and the filled part of the KV cache) divided by the machine's read
bandwidth, which the benchmark measures itself (a sum over a 512 MiB array, jax and numpy,
best of 5, the faster counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from experiments import tiny
from moex import cli, config as config_lib
from moex.generation import engine
from moex.model.decoder import Decoder
from moex.moe import dispatch
from moex.parallel import mesh as mesh_lib
from moex.train import state as state_lib

E, K = 8, 2
BANDWIDTH_BYTES = 512 << 20


def model_config(name: str, d: int, f: int, layers: int, vocab: int) -> config_lib.Config:
  """The benchmark's three decoders (same attention: H = D / 64 heads, J = H / 3)."""
  cd = tiny.get_config()
  h = d // 64
  cd.model.update(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=h,
                  num_kv_heads=max(1, h // 3), head_dim=64)
  cd.moe.update(num_experts=E, top_k=K, d_expert=f)
  if name in ("dense_active", "dense_total"):
    cd.model.first_dense_layers = layers
    cd.model.d_ff = (K if name == "dense_active" else E) * f
  return config_lib.validate(cd)


def read_bandwidth() -> dict:
  """Bytes per second the machine reads: best of 5 sums over a 512 MiB float32 array."""
  host = np.ones(BANDWIDTH_BYTES // 4, np.float32)
  dev = jnp.asarray(host)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(dev))

  def best(fn) -> float:
    times = []
    for _ in range(5):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return BANDWIDTH_BYTES / min(times)

  out = {"jax_sum": best(lambda: jax.block_until_ready(total(dev))),
         "numpy_sum": best(host.sum)}
  out["bytes_per_s"] = max(out.values())
  return out


def _params(cfg: config_lib.Config, mesh):
  graphdef, _, _ = state_lib.abstract_variables(cfg, mesh)

  def init():
    _, p, b = nnx.split(Decoder(cfg.model, cfg.moe, nnx.Rngs(0)), nnx.Param, ...)
    return nnx.to_pure_dict(p), nnx.to_pure_dict(b)

  params, buffers = jax.jit(init)()
  return graphdef, params, buffers


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def weight_bytes(cfg: config_lib.Config, params: dict) -> dict:
  """Total bytes, and what a decode step reads besides the experts: every weight but the
  routed experts' and the embedding table (one row per sequence is added per step)."""
  experts = sum(_bytes(params[f"block_{i}"]["ffn"]["experts"]) for i in cfg.model.moe_layers)
  embed = _bytes(params["embed"])
  total = _bytes(params)
  per_expert = 3 * cfg.model.d_model * cfg.moe.d_expert * jnp.dtype(cfg.model.param_dtype
                                                                    ).itemsize
  return {"total": total, "experts": experts, "embed": embed, "per_expert": per_expert,
          "always": total - experts - embed, "embed_row": embed // cfg.model.vocab_size}


@contextlib.contextmanager
def _grouped_instead_of_gather():
  """Decode steps that would gather run the dropless grouped matmul instead."""
  saved = dispatch.PATHS["gather"]
  dispatch.PATHS["gather"] = dataclasses.replace(saved, fn=dispatch.dropless_dispatch)
  try:
    yield
  finally:
    dispatch.PATHS["gather"] = saved


class Model:
  """One benchmark model: config, parameters and the byte counts of its weights."""

  def __init__(self, name: str, shape: dict, same_weights: "Model | None" = None):
    """`shape`: model_config's d, f, layers, vocab."""
    self.name = name
    if same_weights is not None:  # moe_grouped: the moe model's weights, another path
      self.cfg, self.mesh, self.wb = same_weights.cfg, same_weights.mesh, same_weights.wb
      self.graphdef, self.params = same_weights.graphdef, same_weights.params
      self.buffers = same_weights.buffers
      return
    base = "moe" if name == "moe_grouped" else name
    self.cfg = model_config(base, **shape)
    self.mesh = mesh_lib.make_mesh(self.cfg.mesh, devices=jax.devices()[:1])
    self.graphdef, self.params, self.buffers = _params(self.cfg, self.mesh)
    self.wb = weight_bytes(self.cfg, self.params)

  def generator(self, batch: int, cache_len: int, track_experts: bool = False
                ) -> engine.Generator:
    return engine.Generator(self.cfg, self.graphdef, self.params, self.buffers, self.mesh,
                              batch_size=batch, cache_len=cache_len,
                              track_experts=track_experts)

  def path(self):
    """Where the decode step's dispatch path is replaced while compiling (moe_grouped)."""
    return (_grouped_instead_of_gather() if self.name == "moe_grouped"
            else contextlib.nullcontext())

  def experts_read(self, batch: int, cache_len: int, prompts, steps: int) -> float:
    """Mean (MoE layer, expert) pairs a decode step uses, from an untimed run that copies
    the expert loads to the host at each step (the timed runs do not)."""
    if not self.cfg.model.moe_layers:
      return 0.0
    gen = self.generator(batch, cache_len, track_experts=True)
    gen.generate(prompts, steps + 1)
    return statistics.mean(gen.timing.step_experts)


def measure_batch(models: list[Model], batch: int, bandwidth: float, prompt_len: int,
                  steps: int, repeats: int) -> list[dict]:
  """Every model at one batch size, runs interleaved (model after model, `repeats` rounds)
  so that a change in the machine's load falls on all of them alike."""
  cache_len = engine.auto_cache_len([np.zeros(prompt_len)], steps + 1)
  rng = np.random.default_rng(0)
  vocab = models[0].cfg.model.vocab_size
  prompts = [rng.integers(0, vocab, prompt_len) for _ in range(batch)]
  gens, experts = {}, {}
  for m in models:
    gens[m.name] = m.generator(batch, cache_len)
    with m.path():  # compiles the prefill and the decode step
      gens[m.name].generate(prompts, 2)
      experts[m.name] = m.experts_read(batch, cache_len, prompts, steps)
    gens[m.name].timing = engine.Timing()
  prefill_s = {m.name: [] for m in models}
  for _ in range(repeats):
    for m in models:
      gen = gens[m.name]
      before = gen.timing.prefill_s
      gen.generate(prompts, steps + 1)
      prefill_s[m.name].append(gen.timing.prefill_s - before)
  rows = []
  for m in models:
    gen = gens[m.name]
    row = _row(m, gen, batch, min(prefill_s[m.name]), experts[m.name], bandwidth,
               prompt_len, steps)
    rows.append(row)
    print(_line(row), flush=True)
  return rows


def _row(m: Model, gen: engine.Generator, batch: int, prefill_s: float,
         experts_used: float, bandwidth: float, prompt_len: int, steps: int) -> dict:
  """Times and the memory-traffic bound of one model at one batch size."""
  cfg, t, wb = m.cfg, gen.timing, m.wb
  step_s = statistics.median(t.step_s)
  width = gen.prompt_width(prompt_len, steps + 1)
  kv = cfg.model.num_kv_heads * cfg.model.head_dim * jnp.dtype(cfg.model.dtype).itemsize
  cache_cols = width + (steps + 1) / 2  # mean filled columns over the decode steps
  cache_bytes = 2 * cfg.model.num_layers * batch * cache_cols * kv
  step_bytes = (wb["always"] + batch * wb["embed_row"] + experts_used * wb["per_expert"]
                + cache_bytes)
  bound_s = step_bytes / bandwidth
  path = "dense" if not cfg.model.moe_layers else dispatch.plan(cfg.moe, False, 1, batch).path
  return {"model": m.name, "weights_mb": wb["total"] / 2**20, "batch": batch,
          "path": "dropless (forced)" if m.name == "moe_grouped" else path,
          "prefill_tokens_per_s": batch * prompt_len / prefill_s,
          "decode_step_ms": step_s * 1e3, "decode_step_min_ms": min(t.step_s) * 1e3,
          "decode_tokens_per_s": batch / step_s, "experts_read_per_step": experts_used,
          "step_bytes": step_bytes, "cache_bytes": cache_bytes, "bound_ms": bound_s * 1e3,
          "vs_bound": step_s / bound_s, "compile_s": t.compile_s}


def _line(r: dict) -> str:
  return (f"{r['model']:12s} {r['weights_mb']:8.0f} MB  batch {r['batch']:3d}  "
          f"{r['path']:17s} prefill {r['prefill_tokens_per_s']:9,.0f} tok/s  decode step "
          f"{r['decode_step_ms']:7.2f} ms ({r['decode_tokens_per_s']:8,.1f} tok/s)  bound "
          f"{r['bound_ms']:6.2f} ms  x{r['vs_bound']:.2f}")


def ratios(rows: list[dict]) -> list[dict]:
  """Decode step of the MoE over each dense model, per batch size."""
  step = {(r["model"], r["batch"]): r["decode_step_ms"] for r in rows}
  out = []
  for b in sorted({r["batch"] for r in rows}):
    if ("moe", b) not in step:
      continue
    row = {"batch": b}
    for d in ("dense_active", "dense_total", "moe_grouped"):
      if (d, b) in step:
        row[f"moe_vs_{d}"] = step[("moe", b)] / step[(d, b)]
    out.append(row)
  return out


def markdown(rows: list[dict], bw: dict) -> str:
  lines = [f"read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (jax sum "
           f"{bw['jax_sum'] / 1e9:.1f}, numpy sum {bw['numpy_sum'] / 1e9:.1f})", "",
           "| model | weights | batch | decode path | prefill tok/s | decode step ms | "
           "decode tok/s | bytes read / step | bound ms | step / bound |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['weights_mb']:.0f} MB | {r['batch']} | {r['path']} | "
                 f"{r['prefill_tokens_per_s']:,.0f} | {r['decode_step_ms']:.2f} | "
                 f"{r['decode_tokens_per_s']:,.1f} | {r['step_bytes'] / 2**20:.0f} MB | "
                 f"{r['bound_ms']:.2f} | {r['vs_bound']:.2f} |")
  lines += ["", "| batch | MoE / dense_active | MoE / dense_total | MoE gather / grouped |",
            "|---:|---:|---:|---:|"]
  fmt = lambda x: "–" if x is None else f"{x:.2f}"
  for q in ratios(rows):
    lines.append(f"| {q['batch']} | {fmt(q.get('moe_vs_dense_active'))} | "
                 f"{fmt(q.get('moe_vs_dense_total'))} | {fmt(q.get('moe_vs_moe_grouped'))} |")
  return "\n".join(lines)


def figure(rows: list[dict], path: str) -> None:
  """Decode step time vs batch size per model, with each model's memory-traffic bound."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6.4, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  colors = {"moe": "C0", "dense_active": "C1", "dense_total": "C2"}
  for name, color in colors.items():
    rs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["batch"])
    if not rs:
      continue
    b = [r["batch"] for r in rs]
    ax.plot(b, [r["decode_step_ms"] for r in rs], "o-", color=color,
            label=f"{name} ({rs[0]['weights_mb']:.0f} MB)")
    ax.plot(b, [r["bound_ms"] for r in rs], "--", color=color, alpha=0.6)
  grouped = [r for r in rows if r["model"] == "moe_grouped"]
  if grouped:
    ax.plot([r["batch"] for r in grouped], [r["decode_step_ms"] for r in grouped], "x",
            color="C0", markersize=9, label="moe, grouped matmul (no gather)")
  ax.set_xscale("log", base=2)
  batches = sorted({r["batch"] for r in rows})
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.set_yscale("log")
  ax.set_xlabel("batch size (sequences)")
  ax.set_ylabel("decode step (ms)")
  ax.set_title("decode step time; dashed: memory-traffic bound")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=110)


def define_flags() -> None:
  """Flags only when run as a program (other modules define --json, --steps, --figure)."""
  flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes.")
  flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
  flags.DEFINE_integer("steps", 32, "Decode steps per run.")
  flags.DEFINE_integer("repeats", 3, "Rounds per batch size (prefill: best; decode steps: "
                       "median over all).")
  flags.DEFINE_integer("d_model", 768, "Model width D.")
  flags.DEFINE_integer("d_expert", 1536, "Expert width F.")
  flags.DEFINE_integer("num_layers", 4, "Decoder blocks.")
  flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size V.")
  flags.DEFINE_list("models", ["moe", "dense_active", "dense_total", "moe_grouped"],
                    "Models to run.")
  flags.DEFINE_string("json", None, "Also write the results here.")
  flags.DEFINE_string("figure", None, "Write the decode-step figure (PNG) here.")


def main(argv):
  del argv
  f = flags.FLAGS
  batches = [int(b) for b in f.batches]
  shape = dict(d=f.d_model, f=f.d_expert, layers=f.num_layers, vocab=f.vocab_size)
  t0 = time.perf_counter()
  bw = read_bandwidth()
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}: read bandwidth "
        f"{bw['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
  models = []
  for name in f.models:
    same = next((m for m in models if m.name == "moe"), None) if name == "moe_grouped" else None
    models.append(Model(name, shape, same))
  rows = []
  for b in batches:
    rows += measure_batch([m for m in models if m.name != "moe_grouped" or b == 1], b,
                          bw["bytes_per_s"], f.prompt_len, f.steps, f.repeats)
  print(markdown(rows, bw))
  print(f"total {time.perf_counter() - t0:.0f} s")
  if f.json:
    with open(f.json, "w") as out:
      json.dump({"device": jax.devices()[0].device_kind, "bandwidth": bw, "rows": rows,
                 "ratios": ratios(rows), "shape": shape, "prompt_len": f.prompt_len,
                 "steps": f.steps, "repeats": f.repeats}, out, indent=2)
  if f.figure:
    figure(rows, f.figure)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.bench.generate")
