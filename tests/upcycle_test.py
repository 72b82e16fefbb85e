"""moex/upcycle.py, the command: a dense run -> python -m moex.upcycle -> a run from it that
checkpoints, resumes and reports; its refusals are one line with exit status 2."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import _tiny

from moex import report
from moex.moe import upcycling as upcycle_lib
from moex.train import loop

ROOT = pathlib.Path(__file__).parents[1]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "moex.upcycle", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_command_then_a_run_that_checkpoints_resumes_and_reports(tmp_path, corpus):  # ~30 s
  """A dense moex run -> python -m moex.upcycle -> moex training from it (step 0 = the dense
  model's last eval), stopped, resumed, reported."""
  dense_cd = _tiny(corpus, str(tmp_path / "cache"))
  dense_cd.model.first_dense_layers = dense_cd.model.num_layers
  dense_cd.train.steps = 2
  dense_cd.train.eval_every = dense_cd.train.checkpoint_every = 2
  src = loop.train_and_evaluate(dense_cd, str(tmp_path / "dense"))
  target = _tiny(corpus, str(tmp_path / "cache"))
  target.moe.dispatch, target.moe.d_expert = "dropless", target.model.d_ff
  target.train.steps, target.train.checkpoint_every = 4, 2
  exp = tmp_path / "exp.py"
  exp.write_text("import ml_collections\ndef get_config(arg=None):\n"
                 f"  return ml_collections.ConfigDict({target.to_dict()!r})\n")
  up = tmp_path / "up"
  r = _run(f"--from={tmp_path / 'dense'}", f"--workdir={up}", f"--config={exp}",
           "--method=copy")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith("moex.upcycle: copy: ") and "step 0: equal to the source" in r.stdout
  assert json.loads((up / "config.json").read_text())["train"]["init_from"] == str(up)
  with pytest.raises(upcycle_lib.UpcycleError, match=r"already holds a model or a run"):
    upcycle_lib.upcycle(str(tmp_path / "dense"), str(up), target, upcycle_lib.Options())

  target.train.init_from = str(up)
  run = tmp_path / "run"
  first = loop.train_and_evaluate(target, str(run), max_steps=2)
  assert first["stopped"] and first["step"] == 2
  assert first["first_eval"]["loss"] == pytest.approx(src["final_eval"]["loss"], rel=1e-5)
  second = loop.train_and_evaluate(target, str(run))
  assert second["step"] == 4 and second["first_eval"] is None and not second["stopped"]
  steps = [r["step"] for r in report.read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
  assert steps == [1, 2, 3, 4]
  page = report.write_report(str(run))
  assert "Routing health" in open(page).read()


@pytest.mark.slow
def test_command_errors_are_one_line(tmp_path):
  exp = tmp_path / "exp.py"
  exp.write_text("from experiments import tiny\ndef get_config(arg=None):\n"
                 "  return tiny.get_config()\n")
  r = _run(f"--from={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'up'}", f"--config={exp}")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      f"moex.upcycle: --from={tmp_path / 'nowhere'}: no config.json (not a moex workdir, or "
      "an import or upcycle that did not finish)"), r.stderr[-2000:]
  r = _run(f"--from={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'up'}", f"--config={exp}",
           "--router_std=inf")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "moex.upcycle: --router_std=inf: must be finite and >= 0"], r.stderr[-2000:]
