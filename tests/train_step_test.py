"""moex/train/step.py: the train step compiles once and donates the state."""

import jax
import numpy as np

from moex import config as config_lib
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import optimizer, state as state_lib, step as step_lib


def test_compiles_once_and_donates(tiny_config):
  cfg = config_lib.validate(tiny_config, vocab_size=259)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  batch_sh = sharding.batch_sharding(cfg.mesh.rules, mesh)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    _, step = step_lib.make_train_step(cfg, model.graphdef, tx)
    core, _ = step_lib.make_train_step(cfg, model.graphdef, tx)
    shapes = jax.eval_shape(core, state, jax.ShapeDtypeStruct(
        (cfg.data.batch_size, cfg.data.seq_len + 1), np.int32))[1]
    acc = step_lib.zeros_like_tree(shapes)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    for i in range(4):
      tokens = jax.device_put(rng.integers(0, 256, (cfg.data.batch_size,
                                                    cfg.data.seq_len + 1), np.int32),
                              batch_sh)
      old_leaf = jax.tree.leaves(state["params"])[0]
      state, acc = jitted(state, acc, tokens)
      assert old_leaf.is_deleted(), "the state was not donated"
    assert jitted._cache_size() == 1, "the train step recompiled"
  assert int(state["step"]) == 4
  assert int(acc["scalars"]["steps"]) == 4
