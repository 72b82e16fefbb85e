"""Checkpoints that cannot be read fall back to the one before; failed writes leave nothing
half-written and end in one line."""

import errno
import glob
import json
import logging
import os
import pathlib
import shutil

import grain
import jax
import numpy as np
import pytest
from conftest import _tiny, _write_corpus

from moex import config as config_lib
from moex.config import ConfigError
from moex.model import params as params_lib
from moex.parallel import mesh as mesh_lib
from moex.train import checkpoint, loop, optimizer, state as state_lib

# The trained source workdir (a module fixture) is built once: these tests share a worker.
pytestmark = pytest.mark.xdist_group("train_checkpoint")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 6-step run with checkpoints 3 and 6, trained once; (workdir, config factory)."""
  tmp = tmp_path_factory.mktemp("trained")
  corpus = _write_corpus(tmp / "corpus")

  def make():
    return _tiny(corpus, str(tmp / "cache"))

  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MOEX_CACHE_DIR", str(tmp / "token_cache"))
    loop.train_and_evaluate(make(), str(tmp / "workdir"))
  return str(tmp / "workdir"), make


def _copy(trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  return workdir


def _train_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


def _truncate_largest_state_file(step_dir: str) -> None:
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


def _empty_data_file(step_dir: str) -> None:
  pathlib.Path(step_dir, "data", "process_0-of-1.json").write_text("")


CORRUPTIONS = {  # name: (how, what the warning says)
    "truncated_state_file": (_truncate_largest_state_file, "state: "),
    "missing_state_metadata": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
                               "state/_METADATA is missing"),
    "missing_state_manifest": (lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
                               "state metadata: "),
    "empty_data_file": (_empty_data_file, "data/process_0-of-1.json: "),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_unreadable_latest_falls_back_to_the_one_before(trained, tmp_path, caplog, name):
  corrupt, reason = CORRUPTIONS[name]
  workdir = _copy(trained, tmp_path)
  corrupt(os.path.join(workdir, "checkpoints", "6"))
  with caplog.at_level(logging.WARNING):
    result = loop.train_and_evaluate(trained[1](), workdir)
  assert result["step"] == 6 and result["first_eval"] is None  # Resumed from 3, ran to 6.
  said = [r.getMessage() for r in caplog.records
          if r.getMessage().startswith("checkpoints:") and "is unreadable" in r.getMessage()]
  assert len(said) == 1 and "step 6 in" in said[0] and "resumed from step 3" in said[0], said
  assert reason in said[0] and "\n" not in said[0]
  assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert os.listdir(os.path.join(workdir, checkpoint.UNREADABLE)) == ["6"]  # Kept, aside.
  assert _train_steps(workdir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_another_model_still_does_not_match(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  c = trained[1]()
  c.model.d_model = 64
  with pytest.raises(ConfigError, match=r"step 6 in .* does not match this config's "
                     r"model/optimizer \(.*\(32, .*\) saved, \(64, .*\) here\)"):
    loop.train_and_evaluate(c, workdir)
  assert not os.path.exists(os.path.join(workdir, checkpoint.UNREADABLE))


@pytest.mark.slow
def test_no_readable_checkpoint_says_which_in_one_line(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  os.remove(os.path.join(workdir, "checkpoints", "6", "state", "_METADATA"))
  _empty_data_file(os.path.join(workdir, "checkpoints", "3"))
  with pytest.raises(checkpoint.CheckpointError) as e:
    loop.train_and_evaluate(trained[1](), workdir)
  message = str(e.value)
  assert "\n" not in message and not isinstance(e.value, ConfigError)
  assert "can be read (step 6: state/_METADATA is missing; step 3: data/" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]  # Untouched.


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_full_disk_during_a_save_is_one_line_and_leaves_nothing_half_written(
    trained, tmp_path, monkeypatch, caplog, async_save):
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # Resume at 3; save 6 again.
  real = grain.checkpoint.CheckpointHandler.save

  def disk_full_at_6(self, directory, item=None, args=None):
    if any(p.split(".")[0] == "6" for p in pathlib.Path(directory).parts):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, directory, item, args)

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", disk_full_at_6)
  c = trained[1]()
  c.train.async_checkpointing = async_save
  with caplog.at_level(logging.WARNING), pytest.raises(checkpoint.CheckpointError) as e:
    loop.train_and_evaluate(c, workdir)
  message = str(e.value)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert f"could not write step 6 to {checkpoints} (No space left on device (errno 28))" in (
      message) and "resume from step 3" in message and "\n" not in message
  assert not isinstance(e.value, ConfigError)
  assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
  assert sorted(os.listdir(checkpoints)) == ["3"]  # No *.orbax-checkpoint-tmp left.

  monkeypatch.undo()
  assert loop.train_and_evaluate(c, workdir)["step"] == 6
  assert sorted(os.listdir(checkpoints)) == ["3", "6"]


@pytest.mark.slow
def test_leftover_temporary_checkpoint_is_removed_at_start(trained, tmp_path):
  """A job killed mid-save leaves STEP.orbax-checkpoint-tmp; the next run clears it."""
  workdir = _copy(trained, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  shutil.rmtree(os.path.join(checkpoints, "6"))
  os.makedirs(os.path.join(checkpoints, "5.orbax-checkpoint-tmp", "state"))
  assert loop.train_and_evaluate(trained[1](), workdir)["step"] == 6
  assert sorted(os.listdir(checkpoints)) == ["3", "6"]


def test_tensorstore_os_errors_read_as_one_short_reason():
  raw = ValueError('OUT_OF_RANGE: Error writing "params.x/0.0" in OCDBT database at local file '
                   '"/w/checkpoints/3.orbax-checkpoint-tmp/state/": Failed writing: "/w/d/1": '
                   "Failed to write 309360 bytes to file 12: File too large "
                   "[os_error_code='27']")
  reason = checkpoint._reason  # pylint: disable=protected-access
  assert reason(raw) == "File too large (errno 27)"
  assert reason(OSError(errno.ENOSPC, "No space left on device")) == (
      "No space left on device (errno 28)")


def test_a_checkpoint_from_before_the_qk_norm_scales_were_renamed_resumes(tmp_path):
  cd = _tiny(str(tmp_path / "corpus"), str(tmp_path / "cache"))
  cd.model.qk_norm = "head"
  cfg = config_lib.validate(cd, vocab_size=259)
  tx, _ = optimizer.make(cfg.opt, cfg.train.steps)
  model, init_fn = state_lib.build(cfg, tx, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
  state = init_fn(0)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), cfg.train)
  data = lambda: iter(grain.MapDataset.range(8).to_iter_dataset())
  ckpt.save(3, params_lib.with_old_names(state), data())  # q/k norm scales under scale_D
  ckpt.wait()
  restored = ckpt.restore(3, model.abstract_state, data())
  ckpt.close()
  assert set(restored["params"]["block_0"]["attn"]["k_norm"]) == {"scale_A"}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
