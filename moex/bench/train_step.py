"""Times the jitted train step of a config: step time, tokens/s, model TFLOP/s, MFU.

  python -m moex.bench.train_step --config=experiments/tiny.py [--steps=10] [--json=out.json]

Compiles (AOT), warms up, then times `--steps` steps on a fixed random batch (data loading
is not part of the step). Model FLOPs follow moex/train/flops.py (active parameters only,
never capacity padding); MFU divides by the peak of the devices. On CPU the peak is a
float32 matmul probe taken in this process before and after the timed steps (the better of
the two; both printed, so a run that shared its cores shows as two different probes); on
an accelerator, the data-sheet peak. Also prints XLA's own count of the compiled step's
FLOPs, for comparison.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from moex import cli, workdir as workdir_lib
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import flops, optimizer, state as state_lib, step as step_lib


def define_flags() -> flags.FlagHolder:
  """Flags only when run as a program: `bench` is also imported (moex.sweep)."""
  holder = config_flags.DEFINE_config_file("config", None, "Experiment config.")
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
  flags.DEFINE_string("json", None, "Also write the results here as JSON.")
  flags.mark_flags_as_required(["config"])
  return holder


def bench(cd, steps: int, warmup: int) -> dict:
  cfg = workdir_lib.validate(cd)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  mesh_lib.check_layout(cfg, mesh)
  tx, _ = optimizer.make(cfg.opt, cfg.train.steps)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(cfg.seed)
  on_cpu = jax.devices()[0].platform == "cpu"
  before = flops.measure_matmul_peak() if on_cpu else None
  batch_sh = sharding.batch_sharding(cfg.mesh.rules, mesh)
  tokens = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), np.int32), batch_sh)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    core, _ = step_lib.make_train_step(cfg, model.graphdef, tx)
    t = time.perf_counter()
    compiled = jax.jit(core, in_shardings=(model.state_shardings, batch_sh),
                       out_shardings=(model.state_shardings, sharding.replicated(mesh)),
                       donate_argnums=0).lower(model.abstract_state, tokens).compile()
    compile_s = time.perf_counter() - t
    for _ in range(warmup):
      state, m = compiled(state, tokens)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = compiled(state, tokens)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  after = flops.measure_matmul_peak() if on_cpu else None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  step_s = statistics.median(times)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  tps = tokens_per_step / step_s
  probes, peak = {}, None
  if on_cpu:  # the in-run peak, shared by the simulated devices as in device_peak_flops
    peak = max(before.best, after.best) / max(len(jax.local_devices()), 1)
    probes = {"peak_before_gflops": before.best / 1e9, "peak_after_gflops": after.best / 1e9,
              "peak_spread": max(before.spread, after.spread)}
  mfu = flops.MFU(cfg, mesh.devices.size, peak=peak)
  return {**probes, "device": jax.devices()[0].device_kind, "devices": mesh.devices.size,
          "compile_s": compile_s, "step_ms": step_s * 1e3, "tokens_per_sec": tps,
          "model_flops_per_token": mfu.flops_per_token,
          "xla_flops_per_step": float(cost.get("flops", 0.0)),
          "peak_tflops_per_device": None if mfu.peak is None else mfu.peak / 1e12, **mfu(tps)}


def main(argv):
  del argv
  f = flags.FLAGS
  r = bench(f.config, f.steps, f.warmup)
  model_flops_step = r["model_flops_per_token"] * r["tokens_per_sec"] * r["step_ms"] / 1e3
  print(f"{r['device']} x{r['devices']}: compile {r['compile_s']:.1f}s, step "
        f"{r['step_ms']:.1f} ms, {r['tokens_per_sec']:.0f} tok/s, "
        f"{r['model_tflops_per_sec_per_device'] * 1e3:.1f} model GFLOP/s per device, MFU "
        f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} (peak "
        f"{r['peak_tflops_per_device']:.3f} TFLOP/s per device); XLA counts "
        f"{r['xla_flops_per_step'] / max(model_flops_step, 1):.2f}x the model FLOPs")
  if "peak_before_gflops" in r:
    print(f"matmul peak in this run: {r['peak_before_gflops']:.1f} GFLOP/s before, "
          f"{r['peak_after_gflops']:.1f} after (spread within a probe up to "
          f"{r['peak_spread']:.0%})")
  if f.json:
    with open(f.json, "w") as out:
      json.dump(r, out, indent=2)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.bench.train_step")
