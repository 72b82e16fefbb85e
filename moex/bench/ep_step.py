"""Train-step time of one config on 1 device vs an expert-parallel mesh, in one process.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m moex.bench.ep_step --config=experiments/tiny.py --mesh=expert=8 [--json=out.json]

Also counts the all-to-alls one MoE layer compiles to (forward, and forward+backward).
On simulated CPU devices all "devices" share the same cores, so the mesh run measures the
overhead of the partitioned program, not a speed-up.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from moex import cli, config as config_lib, workdir as workdir_lib
from moex.moe.layer import MoEBlock
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import optimizer, state as state_lib, step as step_lib

def define_flags() -> flags.FlagHolder:
  """Flags only when run as a program (cli.run calls it)."""
  holder = config_flags.DEFINE_config_file("config", None, "Experiment config.")
  flags.DEFINE_string("mesh", "expert=8", "Mesh to compare with 1 device, a=n,b=m.")
  flags.DEFINE_integer("steps", 5, "Timed steps (median).")
  flags.DEFINE_string("json", None, "Also write results here.")
  flags.mark_flags_as_required(["config"])
  return holder


def _cfg(cd, mesh: dict) -> config_lib.Config:
  cd = cd.copy_and_resolve_references()
  for a in config_lib.MESH_AXES:
    cd.mesh[a] = mesh.get(a, 1)
  return workdir_lib.validate(cd)


def _a2a(hlo: str) -> int:
  """Number of all-to-all instructions in compiled HLO text."""
  return len(re.findall(r"[)}\]] all-to-all\(", hlo))


def measure(cfg: config_lib.Config, devices) -> dict:
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  mesh_lib.check_layout(cfg, mesh)
  tx, _ = optimizer.make(cfg.opt, 100)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  batch_sh = sharding.batch_sharding(cfg.mesh.rules, mesh)
  tokens = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), np.int32), batch_sh)
  # Abstract NNX modules are built outside the mesh context (their logical axis names are
  # not mesh axes).
  block = nnx.eval_shape(lambda: MoEBlock(cfg.model, cfg.moe, nnx.Rngs(0)))
  graphdef, params = nnx.split(block)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    core, _ = step_lib.make_train_step(cfg, model.graphdef, tx)
    step = jax.jit(core, donate_argnums=0)
    state, m = step(state, tokens)
    jax.block_until_ready(m)
    times = []
    for _ in range(flags.FLAGS.steps):
      t = time.perf_counter()
      state, m = step(state, tokens)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    # One MoE layer alone: how many all-to-alls it compiles to.
    x = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model),
                             jnp.float32, sharding=sharding.batch_sharding(
                                 cfg.mesh.rules, mesh, ndim=3))
    fwd = lambda p, x: nnx.merge(graphdef, p)(x, train=True)[0]
    fwd_hlo = jax.jit(fwd).lower(params, x).compile().as_text()
    bwd_hlo = jax.jit(jax.grad(lambda p, x: jnp.sum(fwd(p, x)))).lower(params, x).compile(
    ).as_text()
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  ms = statistics.median(times) * 1e3
  return {"devices": len(devices), "mesh": dict(mesh.shape), "step_ms": ms,
          "tokens_per_sec": tokens_per_step / ms * 1e3,
          "moe_layer_all_to_all_fwd": _a2a(fwd_hlo),
          "moe_layer_all_to_all_fwd_bwd": _a2a(bwd_hlo)}


def main(argv):
  del argv
  mesh = {k: int(v) for k, v in (kv.split("=") for kv in flags.FLAGS.mesh.split(","))}
  rows = []
  for name, m, devices in (("1 device", {}, jax.devices()[:1]),
                           (flags.FLAGS.mesh, mesh, jax.devices())):
    cfg = _cfg(flags.FLAGS.config, m)
    for path in ("capacity", "dropless"):
      c = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=path))
      r = {"layout": name, "dispatch": path, **measure(c, devices)}
      rows.append(r)
      print(f"{name:12s} {path:9s} step {r['step_ms']:8.1f} ms  {r['tokens_per_sec']:8.0f} "
            f"tok/s  all-to-alls per MoE layer: fwd {r['moe_layer_all_to_all_fwd']}, "
            f"fwd+bwd {r['moe_layer_all_to_all_fwd_bwd']}", flush=True)
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.bench.ep_step")
