"""moex/generation/loading.py: a workdir's model for generation, and its one-line refusals."""

import json

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
