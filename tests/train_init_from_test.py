"""moex/train/init_from.py and train.init_from: a fresh run starts from another workdir's
parameters (its params/ or newest checkpoint), on any mesh and dtype; a resume ignores it."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import _tiny, _write_corpus
from orbax.checkpoint._src.path import atomicity

from moex import config as config_lib
from moex.model import params as params_lib
from moex.parallel import mesh as mesh_lib
from moex.train import init_from, loop, optimizer, state as state_lib

# The trained source workdir (a module fixture) is built once: these tests share a worker.
pytestmark = pytest.mark.xdist_group("train_init_from")

SCRIPT = pathlib.Path(__file__).parent / "multidevice" / "init_from_mesh.py"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """Workdir A: a 6-step run (checkpoints 3 and 6), trained once; (workdir, config factory,
  its result)."""
  tmp = tmp_path_factory.mktemp("source")
  corpus = _write_corpus(tmp / "corpus")

  def make():
    return _tiny(corpus, str(tmp / "cache"))

  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MOEX_CACHE_DIR", str(tmp / "token_cache"))
    result = loop.train_and_evaluate(make(), str(tmp / "A"))
  return str(tmp / "A"), make, result


def _abstract(cd):
  """The abstract params and buffers (with shardings) of config `cd` on one device."""
  cfg = config_lib.validate(cd, vocab_size=259)
  tx, _ = optimizer.make(cfg.opt, cfg.train.steps)
  model, init_fn = state_lib.build(cfg, tx, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
  return model.abstract_state["params"], model.abstract_state["buffers"], init_fn


def _train_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


def _init_lines(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("init_from: ")]


@pytest.mark.slow
def test_fine_tune_starts_at_step_0_from_the_source_then_resumes_its_own(source, tmp_path,
                                                                        caplog):
  a_dir, make, a_result = source
  c = make()
  c.train.init_from = a_dir
  b_dir = str(tmp_path / "B")
  with caplog.at_level(logging.INFO, logger="absl"):
    b = loop.train_and_evaluate(c, b_dir)
  assert b["first_eval"]["step"] == 0 and b["step"] == 6
  assert b["first_eval"]["loss"] == pytest.approx(a_result["final_eval"]["loss"], rel=1e-6)
  assert b["final_eval"]["loss"] < b["first_eval"]["loss"]  # it trains on from there
  assert _train_steps(b_dir) == [1, 2, 3, 4, 5, 6]
  n = sum(x.size for x in jax.tree.leaves(_abstract(make())[0]))
  assert _init_lines(caplog) == [f"init_from: {n} parameters from {a_dir} (checkpoint step 6)"]

  caplog.clear()
  c.train.steps, c.train.init_from = 8, str(tmp_path / "nowhere")  # would fail if read
  with caplog.at_level(logging.INFO, logger="absl"):
    again = loop.train_and_evaluate(c, b_dir)
  assert again["step"] == 8 and again["first_eval"] is None  # resumed from B's step 6
  assert _train_steps(b_dir) == [1, 2, 3, 4, 5, 6, 7, 8]
  assert not _init_lines(caplog)


@pytest.mark.slow
def test_fine_tune_on_another_mesh(source, tmp_path):
  """The source was trained on 1 device; the run reads it onto (fsdp=2, expert=2)."""
  a_dir, make, a_result = source
  c = make()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(SCRIPT), c.data.source, c.data.cache_dir, a_dir,
                      str(tmp_path / "B4")], capture_output=True, text=True, timeout=600,
                     env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  (row,) = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
  assert row["devices"] == 4 and row["step"] == 1
  assert row["first_eval"]["step"] == 0
  assert row["first_eval"]["loss"] == pytest.approx(a_result["final_eval"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_save_and_load_params_round_trip_cast_to_the_run_dtype(source, tmp_path, caplog):
  a_dir, make, _ = source
  abs_p, abs_b, _ = _abstract(make())
  params, buffers = init_from.load_params(a_dir, abs_p, abs_b)
  imported = str(tmp_path / "imported")
  init_from.save_params(imported, params, buffers)
  assert os.listdir(imported) == ["params"]  # no temporary directory left

  cd = make()
  cd.model.param_dtype = "bfloat16"
  abs_p16, abs_b16, _ = _abstract(cd)
  with caplog.at_level(logging.INFO, logger="absl"):
    got, got_buffers = init_from.load_params(imported, abs_p16, abs_b16)
  assert _init_lines(caplog)[-1].endswith(f"from {imported} (params/)")
  assert got_buffers == {} and buffers == {}  # topk_softmax keeps no buffers
  for want, x, a in zip(jax.tree.leaves(params), jax.tree.leaves(got), jax.tree.leaves(abs_p16)):
    assert x.dtype == a.dtype and x.sharding == a.sharding
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want).astype(a.dtype))
  assert {x.dtype.name for x in jax.tree.leaves(got)} == {"bfloat16", "float32"}  # router f32


@pytest.mark.slow
def test_params_dir_wins_over_checkpoints_and_buffers_come_along(source, tmp_path, caplog):
  """An aux-loss-free router's bias is a buffer: it travels with the parameters."""
  cd = source[1]()
  cd.moe.router = "sigmoid_bias"
  abs_p, abs_b, init_fn = _abstract(cd)
  state = init_fn(0)
  bias = jax.tree.map(lambda b: b + np.arange(b.shape[0], dtype=b.dtype), state["buffers"])
  workdir = tmp_path / "both"
  # The source's checkpoints have no router bias: read instead of params/, they would not match.
  shutil.copytree(os.path.join(source[0], "checkpoints"), workdir / "checkpoints")
  init_from.save_params(str(workdir), state["params"], bias)
  with caplog.at_level(logging.INFO, logger="absl"):
    params, buffers = init_from.load_params(str(workdir), abs_p, abs_b)
  assert "(params/)" in _init_lines(caplog)[-1]
  assert jax.tree.structure(buffers) == jax.tree.structure(abs_b)
  for want, got in zip(jax.tree.leaves(bias), jax.tree.leaves(buffers)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for want, got in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("change,message", [
    ({"d_model": 64}, "parameter block_0/attn/k_DxJxA has shape (32, 1, 16) in {where}, the "
                      "config makes (64, 1, 16)"),
    ({"num_layers": 3}, "parameter block_2/attn/k_DxJxA is not in {where}; the config makes "
                        "it (32, 1, 16)"),
    ({"num_layers": 1}, "parameter block_1/attn/k_DxJxA (32, 1, 16) in {where} is not in the "
                        "config's model"),
])
@pytest.mark.slow
def test_another_shape_names_the_parameter_in_one_line(source, change, message):
  a_dir, make, _ = source
  cd = make()
  for k, v in change.items():
    cd.model[k] = v
  abs_p, abs_b, _ = _abstract(cd)
  where = os.path.join(a_dir, "checkpoints", "6", "state")
  with pytest.raises(config_lib.ConfigError) as e:
    init_from.load_params(a_dir, abs_p, abs_b)
  assert str(e.value) == "train.init_from: " + message.format(where=where)


@pytest.mark.slow
def test_missing_source_is_one_line_and_the_run_stops_before_training(source, tmp_path):
  _, make, _ = source
  c = make()
  nowhere = str(tmp_path / "nowhere")
  c.train.init_from = nowhere
  with pytest.raises(config_lib.ConfigError) as e:
    loop.train_and_evaluate(c, str(tmp_path / "B"))
  assert str(e.value) == f"train.init_from: {nowhere} has neither params/ nor a checkpoint"
  assert not os.path.exists(tmp_path / "B" / "metrics.jsonl")


@pytest.mark.slow
def test_a_write_that_dies_before_its_rename_is_never_read(source, tmp_path, monkeypatch):
  a_dir, make, _ = source
  abs_p, abs_b, _ = _abstract(make())
  params, buffers = init_from.load_params(a_dir, abs_p, abs_b)

  async def killed(self, *args, **kwargs):
    raise OSError("killed before the rename")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
  target = tmp_path / "imported"
  with pytest.raises(Exception, match="killed before the rename"):
    init_from.save_params(str(target), params, buffers)
  assert [p.name.split(".")[0] for p in target.iterdir()] == ["params"]  # the tmp dir only
  assert not (target / "params").exists()
  with pytest.raises(config_lib.ConfigError, match="has neither params/ nor a checkpoint"):
    init_from.load_params(str(target), abs_p, abs_b)

  monkeypatch.undo()
  init_from.save_params(str(target), params, buffers)  # the leftover is cleared first
  assert os.listdir(target) == ["params"]
  got, _ = init_from.load_params(str(target), abs_p, abs_b)
  for want, x in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want))


@pytest.mark.slow
def test_only_params_and_buffers_are_read_from_a_checkpoint(source, monkeypatch):
  """The source's optimizer state, step and RNG stay on disk (orbax partial restore)."""
  a_dir, make, _ = source
  abs_p, abs_b, _ = _abstract(make())
  read = []
  for handler in (ocp.type_handlers.ArrayHandler, ocp.type_handlers.NumpyHandler,
                  ocp.type_handlers.ScalarHandler):
    def spy(self, infos, args=None, real=handler.deserialize):
      read.extend(i.name for i in infos)
      return real(self, infos, args)
    monkeypatch.setattr(handler, "deserialize", spy)
  params, _ = init_from.load_params(a_dir, abs_p, abs_b)
  assert len(read) == len(jax.tree.leaves(params))
  assert {name.split(".")[0] for name in read} == {"params"}, read


def test_params_written_before_the_qk_norm_scales_were_renamed_still_load(tmp_path):
  cd = _tiny(str(tmp_path / "corpus"), str(tmp_path / "cache"))
  cd.model.qk_norm = "full"
  abs_p, abs_b, init_fn = _abstract(cd)
  state = init_fn(0)
  old = params_lib.with_old_names(state["params"])  # q/k norm scales under scale_D
  assert set(old["block_0"]["attn"]["q_norm"]) == {"scale_D"}
  init_from.save_params(str(tmp_path / "old"), old, state["buffers"])
  loaded, _ = init_from.load_params(str(tmp_path / "old"), abs_p, abs_b)
  assert set(loaded["block_0"]["attn"]["q_norm"]) == {"scale_HA"}
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
