"""Run with 8 simulated CPU devices (tests/moe_stats_test.py does): the gather path (an
evaluation call with T*K < E) on 2 expert ranks with a bounded pair buffer goes through the
dropless exchange, so what it did not keep must be counted as ep_overflow. Prints one JSON
line per device count."""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import tiny  # noqa: E402
from moex import config as config_lib  # noqa: E402
from moex.moe import dispatch  # noqa: E402
from moex.parallel import mesh as mesh_lib, sharding  # noqa: E402
from moex.train import optimizer, state as state_lib, step as step_lib  # noqa: E402

B, L = 2, 3  # T*K = 12 < E = 16: the gather path


def make_cfg(expert: int) -> config_lib.Config:
  c = tiny.get_config()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 1, 4
  c.model.num_kv_heads, c.model.head_dim, c.model.d_ff = 2, 8, 64
  c.moe.num_experts, c.moe.top_k, c.moe.d_expert = 16, 2, 16
  c.moe.ep_buffer_factor = 0.5  # P = ceil(0.5 * 6 / 2) = 2 of each device's 6 rows per rank
  c.data.seq_len, c.data.batch_size = L, B
  c.mesh.data, c.mesh.expert = 1, expert
  return config_lib.validate(c, vocab_size=259)


def eval_stats(cfg: config_lib.Config, devices) -> dict:
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  tokens = np.random.default_rng(0).integers(0, 256, (B, L + 1), np.int32)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    tokens = jax.device_put(tokens, sharding.batch_sharding(cfg.mesh.rules, mesh))
    forward = jax.jit(lambda p, b, t: step_lib.forward(model.graphdef, p, b, t, train=False,
                                                       data=cfg.data)[3])
    return jax.tree.map(np.asarray, forward(state["params"], state["buffers"], tokens))


def main():
  for ranks in (1, 2):
    cfg = make_cfg(ranks)
    moe = eval_stats(cfg, jax.devices()[:ranks])
    print(json.dumps({
        "ranks": ranks,
        "path": dispatch.plan(cfg.moe, False, L, B * L).path,
        "load": int(moe["expert_load"].sum()),
        "kept": int(moe["expert_kept"].sum()),
        "overflow": int(moe["ep_overflow"].sum()),
    }), flush=True)


if __name__ == "__main__":
  main()
