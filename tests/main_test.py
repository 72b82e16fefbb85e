"""What the user sees when a run fails: one line, `moex: ...`, and a non-zero exit."""

import pathlib

import pytest
from absl import flags

from moex import main as main_lib
from moex.train import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_checkpoint_io_error_is_one_line_and_not_a_config_error(tmp_path, monkeypatch):
  said = ("checkpoints: could not write step 6 to /w/checkpoints (No space left on device "
          "(errno 28)); free space or fix that directory, then re-run to resume from step 3")

  def disk_full(cd, workdir):
    raise checkpoint.CheckpointError(said)

  monkeypatch.setattr(loop, "train_and_evaluate", disk_full)
  flags.FLAGS(["moex", f"--config={ROOT / 'experiments' / 'tiny.py'}",
               f"--workdir={tmp_path / 'run'}"])
  try:
    with pytest.raises(SystemExit) as e:
      main_lib.main([])
  finally:
    flags.FLAGS.unparse_flags()
  assert e.value.code == f"moex: {said}"
