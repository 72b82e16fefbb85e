"""python -m moex.scaling end to end on fabricated workdirs (config.json + metrics.jsonl
written here, losses from a known law; nothing trains), and its one-line refusals."""

import json
import os
import subprocess
import sys

import pytest

from experiments import ladder
from moex import config as config_lib
from moex.model import params
from moex.scaling import commands, forms, laws, runs
from moex.scaling.runs import ScalingError
from moex.train import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per family a chinchilla law at the ladder's scale; the MoE's A is lower (a better model).
TRUE = {"dense": {"E": 1.0, "A": 40.0, "B": 300.0, "alpha": 0.35, "beta": 0.45},
        "moe": {"E": 1.0, "A": 28.0, "B": 300.0, "alpha": 0.35, "beta": 0.45}}


def write_run(path, variant: str, loss: float | None = None, tokenizer: str = "byte",
              finished: bool = True) -> str:
  """A workdir of `variant`: config.json, and metrics.jsonl with the final eval at
  train.steps (its loss from TRUE unless given; only step 0 when not `finished`)."""
  c = ladder.get_config(variant)
  c.model.vocab_size = 259
  c.data.tokenizer = tokenizer
  cfg = config_lib.validate(c)
  if loss is None:
    n = sum(x.active for x in params.counts(cfg).values())
    d = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
    loss = forms.chinchilla_loss(TRUE[variant.split("_")[0]], n, d)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(c.to_dict(), f)
  rows = [{"step": 0, "split": "eval", "loss": 5.5, "bits_per_byte": 8.0}]
  if finished:
    rows.append({"step": cfg.train.steps, "split": "eval", "loss": float(loss),
                 "bits_per_byte": float(loss) / 0.69})
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("ladder")
  for v in ladder.VARIANTS:
    write_run(root / v, v)
  (root / "moe_s0_64.upcycled").mkdir()  # not a run: no metrics.jsonl
  return str(root)


@pytest.mark.slow
def test_fit_command_predicts_the_held_out_runs(sweep_root, tmp_path):
  out = str(tmp_path / "fit")
  result = commands.fit_runs(sweep_root, out, "largest", bootstrap=3, keep=10)
  assert set(result["laws"]) == {"dense", "moe E=8 K=2", "joint"}
  assert len(result["laws"]["dense"]["runs"]) == len(ladder.VARIANTS) // 2 - 1
  for name, row in result["heldout"].items():  # the largest model at the largest budget
    assert os.path.basename(row["workdir"]).endswith(f"_s3_{max(ladder.TOKEN_STEPS)}"), name
    assert abs(row["family"]["error_pct"]) < 0.5 and abs(row["joint"]["error_pct"]) < 0.5
  dense = result["laws"]["dense"]["coef"]
  assert dense["alpha"] == pytest.approx(0.35, abs=0.02)
  m = result["multiplier"]["moe E=8 K=2"]
  assert m["family_laws"] > 1 and m["same_size"] > 1 and m["joint_law"] > 1
  for suffix in (".json", ".md", "_fit.png", "_isoflop.png"):
    assert os.path.getsize(out + suffix) > 0
  assert "Held-out runs" in open(out + ".md").read()
  text, best = commands.plan_budget(f"fitted:{out}.json", 1e13)  # the joint law
  assert "law joint" in text and "compute-optimal" in text
  assert "warning: training tokens" in text  # far beyond the ladder's budgets
  text, _ = commands.plan_budget(f"fitted:{out}.json#dense", 1e12)
  assert "law dense" in text and ", E " not in text


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "moex.scaling", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_fit_and_plan(sweep_root, tmp_path):
  out = str(tmp_path / "cli")
  r = run_cli("fit", f"--runs={sweep_root}", f"--out={out}", "--bootstrap=2", "--starts=5")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Held-out runs" in r.stdout and f"wrote {out}.json" in r.stdout
  config = str(tmp_path / "planned.py")
  r = run_cli("plan", "--flops=1e20", "--inference_tokens=1e12", "--law=ludziejewski",
              f"--write_config={config}", "--batch_size=64", "--seq_len=1024")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "inference-aware" in r.stdout and os.path.exists(config)


@pytest.mark.slow
def test_cli_refusal_is_one_line(tmp_path):
  r = run_cli("plan", "--flops=1e20", "--law=kaplan")
  assert r.returncode == 2  # a refusal (moex.cli.run)
  assert r.stderr.strip().splitlines()[-1].startswith("moex.scaling: --law: 'kaplan'")
  r = run_cli("fit", f"--runs={tmp_path}/missing")
  assert r.returncode == 2  # a refusal (moex.cli.run)
  assert r.stderr.strip().splitlines()[-1] == (f"moex.scaling: --runs={tmp_path}/missing: no "
                                               "such file or directory")


def _one_line(spec, match):
  with pytest.raises(ScalingError, match=match) as e:
    runs.read_runs(spec)
  assert "\n" not in str(e.value)


def test_refuses_no_workdir(tmp_path):
  _one_line(str(tmp_path), "no workdir \\(config.json \\+ metrics.jsonl\\) there")


def test_refuses_no_finished_run(tmp_path):
  write_run(tmp_path / "a", "dense_s0_64", finished=False)
  _one_line(str(tmp_path), "^--runs=.*: no finished run .* among 1 workdir\\(s\\), e.g. .*/a$")


def test_refuses_one_run(tmp_path):
  write_run(tmp_path / "a", "dense_s0_64")
  write_run(tmp_path / "b", "dense_s1_64", finished=False)  # skipped with a warning
  _one_line(str(tmp_path), "only one finished run \\(.*/a\\)")


def test_refuses_mixed_tokenizers(tmp_path):
  write_run(tmp_path / "a", "dense_s0_64")
  write_run(tmp_path / "b", "dense_s1_64", tokenizer=str(tmp_path / "tok.json"))
  _one_line(str(tmp_path / "*"), "mixed tokenizers/data: .*/b has '.*tok.json \\| stdlib'")


def test_glob_and_points(tmp_path):
  write_run(tmp_path / "a", "moe_s1_125", loss=2.5)
  write_run(tmp_path / "b", "dense_s1_125", loss=2.6)
  points = runs.read_runs(str(tmp_path / "*"))
  moe, dense = sorted(points, key=lambda p: -p.experts)
  assert (moe.experts, moe.top_k, moe.expansion, moe.loss) == (8, 2, 4.0, 2.5)
  assert moe.n_total > moe.n_active and dense.n_total == dense.n_active
  assert moe.tokens == dense.tokens == 125 * 16 * 128
  assert moe.flops == pytest.approx(
      flops.train_flops_per_token(config_lib.validate(
          ladder.get_config("moe_s1_125"), vocab_size=259)) * moe.tokens)


def test_cli_plan_refuses_an_infinite_budget():
  """Issue 25 #6: `plan --flops=inf` exited 0 with D = inf tokens."""
  r = run_cli("plan", "--flops=inf")
  assert r.returncode == 2, r.stdout[-2000:]
  assert "Traceback" not in r.stderr and "D inf" not in r.stdout
  assert r.stderr.strip().splitlines()[-1] == ("moex.scaling: --flops: must be a finite "
                                               "number > 0, got inf")


def test_refuses_a_run_whose_final_loss_is_not_finite_or_whose_config_is_bad(tmp_path):
  write_run(tmp_path / "a", "dense_s0_64")
  write_run(tmp_path / "b", "dense_s1_64", loss=float("nan"))
  _one_line(str(tmp_path), "^.*/b/metrics.jsonl: the final eval loss at step \\d+ is nan, not "
            "a finite number; leave the run out of --runs$")
  write_run(tmp_path / "b", "dense_s1_64")
  (tmp_path / "b" / "config.json").write_text("{not json")
  _one_line(str(tmp_path), "^.*/b/config.json: not JSON \\(")
