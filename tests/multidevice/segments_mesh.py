"""Run with 8 simulated CPU devices (tests/model_segments_test.py does): packed rows with
document masks on expert-parallel meshes give the one-device logits, loss and MoE counts,
for the capacity path (training, a capacity that drops nothing) and the dropless one
(evaluation). Prints one JSON line per (path, mesh)."""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import tiny  # noqa: E402
from moex import config as config_lib  # noqa: E402
from moex.parallel import mesh as mesh_lib, sharding  # noqa: E402
from moex.train import optimizer, state as state_lib, step as step_lib  # noqa: E402

MESHES = {"expert8": dict(expert=8), "data2_expert4": dict(data=2, expert=4)}
PATHS = {"capacity": (dict(dispatch="capacity", capacity_factor=4.0), True),
         "dropless": (dict(dispatch="dropless"), False)}
B, L = 8, 32


def make_cfg(moe: dict, mesh: dict) -> config_lib.Config:
  c = tiny.get_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, d_ff=48, init_std=0.3)
  c.moe.update(num_experts=8, d_expert=16, seq_load_balance_weight=0.01, **moe)
  c.data.seq_len, c.data.batch_size = L, B
  for a in ("data", "fsdp", "expert", "tensor"):
    c.mesh[a] = mesh.get(a, 1)
  return config_lib.validate(c)


def packed_batch(seed: int = 0) -> dict:
  """B rows of [L + 1]: random documents of 3-14 tokens, then padding (segment 0)."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((B, L + 1), np.int32)
  seg, pos = np.zeros_like(tokens), np.zeros_like(tokens)
  for b in range(B):
    at, k = 0, 1
    while True:
      n = int(rng.integers(3, 15))
      if at + n > L - b:  # rows end in different amounts of padding
        break
      tokens[b, at:at + n] = rng.integers(1, 64, n)
      seg[b, at:at + n], pos[b, at:at + n] = k, np.arange(n)
      at, k = at + n, k + 1
  return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def run(cfg: config_lib.Config, devices, batch: dict, train: bool) -> dict:
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  batch_sh = sharding.batch_sharding(cfg.mesh.rules, mesh)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    fwd = jax.jit(lambda p, bf, bt: step_lib.forward(
        model.graphdef, p, bf, bt, train=train, rng=jax.random.PRNGKey(1), data=cfg.data))
    logits, _, _, moe, _ = fwd(state["params"], state["buffers"], batch)
    # The training loss (weighted cross-entropy and balancing terms, psummed over the mesh).
    loss = jax.jit(lambda p, bf, bt: step_lib.loss_fn(
        p, bf, bt, jax.random.PRNGKey(1), graphdef=model.graphdef, cfg=cfg)[0])(
            state["params"], state["buffers"], batch)
  return {"logits": np.asarray(logits), "moe": jax.device_get(moe), "loss": float(loss)}


def main():
  assert jax.device_count() == 8, jax.devices()
  batch = packed_batch()
  real = batch["segment_ids"][:, :-1] != 0
  for path, (moe, train) in PATHS.items():
    ref = run(make_cfg(moe, {}), jax.devices()[:1], batch, train)
    for name, mesh in MESHES.items():
      got = run(make_cfg(moe, mesh), jax.devices(), batch, train)
      load = np.asarray(got["moe"]["expert_load"])
      print(json.dumps({
          "path": path, "mesh": name,
          "logits": float(np.max(np.abs(got["logits"][real] - ref["logits"][real]))),
          "logit_scale": float(np.max(np.abs(ref["logits"][real]))),
          "loss": abs(got["loss"] - ref["loss"]),
          "counts_equal": all(np.array_equal(got["moe"][k], ref["moe"][k])
                              for k in ("expert_load", "expert_kept", "max_group_load")),
          "real_tokens_only": bool(np.all(load.sum(-1) == 2 * real.sum())),
      }), flush=True)


if __name__ == "__main__":
  main()
