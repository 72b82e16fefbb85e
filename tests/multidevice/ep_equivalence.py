"""Run with 8 simulated CPU devices (tests/moe_parallel_test.py does): the same tiny model on
1 device and on several meshes gives the same loss, balancing terms, statistics and
gradients, for the capacity and the dropless paths. Prints one JSON line per comparison."""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import tiny  # noqa: E402
from moex import config as config_lib  # noqa: E402
from moex.parallel import mesh as mesh_lib, sharding  # noqa: E402
from moex.train import optimizer, state as state_lib, step as step_lib  # noqa: E402

MESHES = {"data2_expert4": dict(data=2, expert=4), "expert8": dict(expert=8),
          "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2)}
STEPS = 3


def make_cfg(dispatch: str, mesh: dict, ep_buffer_factor: float = 0.0) -> config_lib.Config:
  c = tiny.get_config()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 2, 4
  c.model.num_kv_heads, c.model.head_dim, c.model.d_ff = 2, 8, 64
  c.moe.num_experts, c.moe.d_expert, c.moe.dispatch = 8, 32, dispatch
  c.moe.capacity_factor = 1.0  # drops happen, and must match too
  c.moe.seq_load_balance_weight = 0.01
  c.moe.ep_buffer_factor = ep_buffer_factor
  c.data.seq_len, c.data.batch_size = 16, 8
  for a in ("data", "fsdp", "expert", "tensor"):
    c.mesh[a] = mesh.get(a, 1)
  return config_lib.validate(c, vocab_size=259)


def run(cfg: config_lib.Config, devices) -> list[dict]:
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  batch_sh = sharding.batch_sharding(cfg.mesh.rules, mesh)
  rng = np.random.default_rng(0)
  out = []
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    core, _ = step_lib.make_train_step(cfg, model.graphdef, tx)
    step = jax.jit(core)
    grad = jax.jit(jax.grad(lambda p, b, t, r: step_lib.loss_fn(
        p, b, t, r, graphdef=model.graphdef, cfg=cfg)[0]))
    for i in range(STEPS):
      tokens = rng.integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), np.int32)
      tokens = jax.device_put(tokens, batch_sh)
      g = grad(state["params"], state["buffers"], tokens,
               jax.random.fold_in(state["rng"], state["step"]))
      state, metrics = step(state, tokens)
      hlo = step.lower(state, tokens).compile().as_text() if i == 0 else ""
      out.append({"metrics": jax.device_get(metrics), "grads": jax.device_get(g),
                  "all_to_all": hlo.count("all-to-all"), "hlo": hlo})
  return out


def compare(a, b, rtol=2e-4, atol=2e-5):
  """Largest mismatch between two pytrees, as a relative error."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    err = np.max(np.abs(x - y) / (atol + rtol * np.abs(y))) if x.size else 0.0
    worst = max(worst, float(err))
  return worst  # <= 1 means within tolerance


def main():
  assert jax.device_count() == 8, jax.devices()
  for dispatch in ("capacity", "dropless"):
    ref = run(make_cfg(dispatch, {}), jax.devices()[:1])
    for name, mesh in MESHES.items():
      got = run(make_cfg(dispatch, mesh), jax.devices())
      for i, (r, g) in enumerate(zip(ref, got)):
        exact = {k: (np.array_equal(r["metrics"]["moe"][k], g["metrics"]["moe"][k]))
                 for k in ("expert_load", "expert_kept", "max_group_load", "steps")}
        print(json.dumps({
            "dispatch": dispatch, "mesh": name, "step": i,
            "scalars": compare(g["metrics"]["scalars"], r["metrics"]["scalars"]),
            "moe_float": compare({k: v for k, v in g["metrics"]["moe"].items()
                                  if k not in exact},
                                 {k: v for k, v in r["metrics"]["moe"].items()
                                  if k not in exact}),
            "counts_equal": all(exact.values()),
            "grads": compare(g["grads"], r["grads"]),
            "all_to_all": g["all_to_all"] if i == 0 else None,
            "expert_weight_all_gather": ("all-gather" in g["hlo"] and any(
                "all-gather" in l and "f32[8,32,32]" in l for l in g["hlo"].splitlines()))
            if i == 0 else None,
        }), flush=True)


def bounded():
  """The dropless path with a bounded pair buffer: overflow is counted, never silent."""
  ref = run(make_cfg("dropless", {}, ep_buffer_factor=0.5), jax.devices()[:1])
  got = run(make_cfg("dropless", MESHES["expert8"], ep_buffer_factor=0.5), jax.devices())
  for i, (r, g) in enumerate(zip(ref, got)):
    moe = jax.tree.map(np.asarray, g["metrics"]["moe"])
    print(json.dumps({
        "bounded": True, "step": i,
        "overflow": int(moe["ep_overflow"].sum()),
        "one_device_overflow": int(np.asarray(r["metrics"]["moe"]["ep_overflow"]).sum()),
        "kept_plus_overflow_is_load": bool(np.array_equal(
            moe["expert_kept"] + moe["ep_overflow"], moe["expert_load"])),
        # The first MoE layer routes the same inputs (later ones see the drops' effect).
        "first_layer_load_equal": bool(np.array_equal(
            moe["expert_load"][0], np.asarray(r["metrics"]["moe"]["expert_load"])[0])),
        "loss_finite": bool(np.isfinite(g["metrics"]["scalars"]["loss"])),
    }), flush=True)


if __name__ == "__main__":
  main()
  bounded()
