"""moex/generation/loading.py: a workdir's model for generation, and its one-line refusals."""

import json
import logging
import pathlib
import shutil

import jax
import numpy as np
import pytest

from experiments import tiny
from moex import config as config_lib
from moex.generation import engine, loading


def test_refusals_name_the_reason(tmp_path):
  with pytest.raises(engine.GenerateError, match="^--workdir=.*: no checkpoint"):
    (tmp_path / "config.json").write_text(json.dumps(tiny.get_config().to_dict()))
    loading.load(str(tmp_path))
  with pytest.raises(engine.GenerateError, match="config.json: missing"):
    loading.load(str(tmp_path / "nothing"))
  cfg = config_lib.validate(tiny.get_config())
  with pytest.raises(engine.GenerateError, match="^--mesh=expert: expected"):
    loading.parse_mesh("expert", cfg.mesh)


def _truncate_state_files(step_dir: pathlib.Path) -> None:
  """Every array data file cut in half (which file holds the parameters, rather than the
  optimizer state generation never reads, depends on the write)."""
  for p in (step_dir / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


CORRUPTIONS = {
    "missing_state_metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "truncated_state_files": _truncate_state_files,
}


@pytest.mark.xdist_group("many_experts_workdir")  # the session fixture, built once
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_an_unreadable_newest_checkpoint_falls_back_with_one_warning(
    many_experts_workdir, tmp_path, caplog, name):
  """issue 25 #7: generation stopped at an unreadable newest checkpoint (training falls
  back); now it uses the newest readable one, says so once, and moves nothing."""
  workdir = tmp_path / "run"
  shutil.copytree(many_experts_workdir, workdir)
  ckpts = workdir / "checkpoints"
  (old,) = [d.name for d in ckpts.iterdir() if d.name.isdigit()]
  newer = ckpts / str(int(old) + 4)
  shutil.copytree(ckpts / old, newer)
  CORRUPTIONS[name](newer)
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  with caplog.at_level(logging.WARNING):
    got = loading.load(str(workdir))
  said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
          and r.getMessage().startswith(f"--workdir={workdir}: ")]  # moex's (orbax logs too)
  assert len(said) == 1 and f"unreadable: step {newer.name}" in said[0], said
  assert f"step {old}" in said[0] and "\n" not in said[0], said
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
  want = loading.load(many_experts_workdir)
  for a, b in zip(jax.tree.leaves(got[4]), jax.tree.leaves(want[4])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
