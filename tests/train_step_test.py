"""moex/train/step.py: the train step compiles once, donates the state, and gives the same
result with gradient accumulation, rematerialization and bf16 compute; one step of a fixed
config gives pinned (golden) loss and gradient norm."""

import jax
import numpy as np
import pytest
from data_text import stdlib_text

from moex import config as config_lib
from moex.data import pipeline, tokenizer as tokenizer_lib
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import optimizer, state as state_lib, step as step_lib


@pytest.mark.slow
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


def _one_step(cd, tokens):
  cfg = config_lib.validate(cd, vocab_size=259)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    core, _ = step_lib.make_train_step(cfg, model.graphdef, tx)
    new_state, metrics = jax.jit(core)(state, tokens)
  return new_state, metrics


def _tokens(cd, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (cd.data.batch_size, cd.data.seq_len + 1), np.int32)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_same_step(tiny_config):
  # Balancing losses are per micro-batch (products of batch means), so compare without
  # the Switch loss; cross-entropy and z-loss are means over tokens and accumulate exactly.
  tiny_config.moe.load_balance_weight = 0.0
  tokens = _tokens(tiny_config)
  full, m_full = _one_step(tiny_config, tokens)
  tiny_config.train.grad_accum_steps = 2
  accum, m_accum = _one_step(tiny_config, tokens)
  _assert_trees_close(accum["params"], full["params"])
  for k in ("loss", "cross_entropy", "z_loss", "grad_norm"):
    np.testing.assert_allclose(m_accum["scalars"][k], m_full["scalars"][k], rtol=1e-5)
  for k in ("expert_load", "expert_kept"):
    np.testing.assert_array_equal(m_accum["moe"][k], m_full["moe"][k])


@pytest.mark.slow
def test_remat_changes_memory_not_results(tiny_config):
  tokens = _tokens(tiny_config)
  plain, _ = _one_step(tiny_config, tokens)
  for policy in ("full", "dots_saveable"):
    tiny_config.model.remat = policy
    remat, _ = _one_step(tiny_config, tokens)
    _assert_trees_close(remat["params"], plain["params"])


@pytest.mark.slow
def test_bfloat16_compute_trains(tiny_config):
  tiny_config.model.dtype = "bfloat16"
  state, metrics = _one_step(tiny_config, _tokens(tiny_config))
  assert np.isfinite(float(metrics["scalars"]["loss"]))
  assert jax.tree.leaves(state["params"])[0].dtype == np.float32  # params stay float32


def test_probe_returns_first_choices(tiny_config):
  cfg = config_lib.validate(tiny_config, vocab_size=259)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  tokens = _tokens(tiny_config)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    probe = jax.jit(step_lib.make_probe_step(model.graphdef))
    first = np.asarray(probe(state["params"], state["buffers"], tokens))
    assert first.shape == (len(cfg.model.moe_layers), cfg.data.batch_size, cfg.data.seq_len)
    assert first.min() >= 0 and first.max() < cfg.moe.num_experts
    assert len(np.unique(first)) > 1  # a random router spreads its first choices
    np.testing.assert_array_equal(
        np.asarray(probe(state["params"], state["buffers"], tokens)), first)  # deterministic
    # A zero router ties every expert: top-k then picks expert 0 for every token.
    zero_router = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if "router" in jax.tree_util.keystr(path) else x,
        state["params"])
    np.testing.assert_array_equal(
        np.asarray(probe(zero_router, state["buffers"], tokens)), 0)


@pytest.mark.slow
def test_eval_bytes_are_the_bytes_of_the_text_with_a_bpe_tokenizer(tiny_config, bpe_dir):
  """Bits per byte divide by the real bytes: on a stdlib snippet (accented letters included)
  the eval step's target bytes are the UTF-8 bytes of the decoded targets, the text's."""
  tok = tokenizer_lib.get_tokenizer(str(bpe_dir))
  seq_len = tiny_config.data.seq_len
  lines = stdlib_text("shlex.py").splitlines(keepends=True)
  assert any(ord(c) > 127 for c in "".join(lines[:42]))
  # The shortest prefix past those lines whose [EOS] + ids + [EOS] fills whole windows, so
  # the targets of all windows are exactly ids + [EOS].
  n = next(n for n in range(42, len(lines))
           if (len(tok.encode("".join(lines[:n]))) + 1) % seq_len == 0)
  text = "".join(lines[:n])
  tokens = np.concatenate([[tok.eos_id], tok.encode(text), [tok.eos_id]])
  windows = pipeline.PackedWindows(tokens, seq_len)
  batch = np.stack([windows[i] for i in range(len(windows))])
  assert tok.decode(batch[:, 1:]) == text.encode("utf-8")

  cfg = config_lib.validate(tiny_config, vocab_size=tok.vocab_size)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  state = init_fn(0)
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    core, _ = step_lib.make_eval_step(cfg, model.graphdef, tok.token_bytes)
    scalars = jax.jit(core)(state["params"], state["buffers"], batch)["scalars"]
  assert int(scalars["bytes"]) == len(text.encode("utf-8"))
  assert int(scalars["tokens"]) == batch[:, 1:].size < len(text.encode("utf-8"))


# One step of the tiny_config fixture (D=32, 2 layers, E=4, K=2, S=32, B=4, float32, seed 0)
# on fixed tokens: (loss, grad_norm) to 6 significant digits, per training dispatch path.
GOLDEN = {
    "capacity": ("5.56962", "0.749393"),
    "dropless": ("5.56963", "0.749408"),
}
GOLDEN_MESSAGE = (
    "The loss/grad norm of one step of a fixed config changed. Update these numbers only "
    "for an intended change of the model's math, init or data order -- never for a "
    "refactor, which must keep them -- and say why in the commit.")


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", sorted(GOLDEN))
def test_one_step_golden_loss_and_grad_norm(tiny_config, dispatch):
  tiny_config.seed = 0
  tiny_config.model.dtype = tiny_config.model.param_dtype = "float32"
  tiny_config.moe.dispatch = dispatch
  tiny_config.moe.grouped_matmul = "chunked"  # "auto" on CPU, named: the pin must not follow it
  b, s = tiny_config.data.batch_size, tiny_config.data.seq_len
  assert (tiny_config.model.d_model, tiny_config.model.num_layers, tiny_config.moe.num_experts,
          tiny_config.moe.top_k, s, b) == (32, 2, 4, 2, 32, 4)
  # Synthetic tokens, independent of the data pipeline and of any random generator.
  tokens = ((np.arange(b * (s + 1)) ** 2 * 7 + 3) % 256).astype(np.int32).reshape(b, s + 1)
  _, metrics = _one_step(tiny_config, tokens)
  got = tuple(f"{float(metrics['scalars'][k]):.6g}" for k in ("loss", "grad_norm"))
  assert got == GOLDEN[dispatch], f"{GOLDEN_MESSAGE} Got {got}, pinned {GOLDEN[dispatch]}."
