"""Run with 8 simulated CPU devices (tests/model_lora_test.py does): a LoRA run (adapters on
attention and every routed expert) on 1 device and on meshes (expert=8), (data=2, expert=4)
and (data=2, expert=2, tensor=2) gives the same losses and the same adapters after three
steps, on the dropless and capacity paths. Prints one JSON line per comparison."""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ep_equivalence  # noqa: E402
from moex import config as config_lib  # noqa: E402
from moex.model import lora  # noqa: E402
from moex.parallel import mesh as mesh_lib, sharding  # noqa: E402
from moex.train import optimizer, state as state_lib, step as step_lib  # noqa: E402

STEPS = 3
RUNS = (("dropless", "expert8"), ("dropless", "data2_expert4"),
        ("dropless", "data2_expert2_tensor2"), ("capacity", "expert8"))


def make_cfg(dispatch: str, mesh: dict) -> config_lib.Config:
  c = ep_equivalence.make_cfg(dispatch, mesh)
  lora_cfg = config_lib.LoRAConfig(rank=4, targets="q,k,v,o,experts", alpha=8.0)
  return c.__class__(**{**c.__dict__, "lora": lora_cfg})


def run(cfg: config_lib.Config, devices) -> tuple[list[float], dict]:
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  batch_sh = sharding.batch_sharding(cfg.mesh.rules, mesh)
  rng = np.random.default_rng(0)
  losses = []
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    step = jax.jit(step_lib.make_train_step(cfg, model.graphdef, tx)[0])
    for _ in range(STEPS):
      tokens = rng.integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), np.int32)
      state, metrics = step(state, jax.device_put(tokens, batch_sh))
      losses.append(float(metrics["scalars"]["loss"]))
  return losses, jax.device_get(lora.adapters_of(state["params"]))


def main():
  assert jax.device_count() == 8, jax.devices()
  refs = {}
  for dispatch, name in RUNS:
    if dispatch not in refs:
      refs[dispatch] = run(make_cfg(dispatch, {}), jax.devices()[:1])
    losses, adapters = run(make_cfg(dispatch, ep_equivalence.MESHES[name]), jax.devices())
    ref_losses, ref_adapters = refs[dispatch]
    print(json.dumps({
        "dispatch": dispatch, "mesh": name, "losses": losses, "one_device": ref_losses,
        "adapters": ep_equivalence.compare(adapters, ref_adapters),
        "adapters_moved": bool(any(np.any(np.asarray(x) != 0) for x in
                                   jax.tree.leaves(lora.split(adapters, lambda p: p[-1]
                                                              .startswith("b_"))[0]))),
    }), flush=True)


if __name__ == "__main__":
  main()
