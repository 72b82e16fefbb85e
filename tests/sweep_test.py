"""moex/sweep.py: skips finished variants, stops on a failed one, writes the summary."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from report_workdir import write_workdir

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = '''
import ml_collections
VARIANTS = ("a", "b")
def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict({"steps": 30})
  if arg == "broken":
    c.model = ml_collections.ConfigDict({"d_model": -1})
  return c
'''


def _sweep(tmp_path, *args):
  (tmp_path / "exp.py").write_text(CONFIG)
  return subprocess.run(
      [sys.executable, "-m", "moex.sweep", f"--config={tmp_path / 'exp.py'}",
       f"--root={tmp_path / 'root'}", "--bench_steps=0", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_finished_variants_are_summarized_not_rerun(tmp_path):
  for v in ("a", "b"):
    os.makedirs(tmp_path / "root" / v)
    write_workdir(tmp_path / "root" / v, torn=False)
  r = _sweep(tmp_path)
  assert r.returncode == 0, r.stderr
  assert "already finished" in r.stderr and "moex.main" not in r.stderr
  summary = (tmp_path / "root" / "summary.md").read_text()
  assert "| a | 3.0000 |" in summary and "| b | 3.0000 |" in summary
  for name in ("sweep.png", "sweep_routing.png"):
    assert (tmp_path / "root" / name).stat().st_size > 1000


@pytest.mark.slow
def test_failed_variant_stops_the_sweep_naming_its_log(tmp_path):
  r = _sweep(tmp_path, "--variants=broken,a")
  assert r.returncode != 0
  log = tmp_path / "root" / "broken.log"
  assert "variant 'broken' failed" in r.stderr and str(log) in r.stderr, r.stderr
  assert log.exists() and not (tmp_path / "root" / "a").exists()


@pytest.mark.slow
def test_replicate_seeds_train_in_their_own_workdirs(tmp_path):
  for v in ("a", "b"):
    os.makedirs(tmp_path / "root" / v)
    write_workdir(tmp_path / "root" / v, torn=False)
  os.makedirs(tmp_path / "root" / "seed7" / "a")
  write_workdir(tmp_path / "root" / "seed7" / "a", torn=False)
  r = _sweep(tmp_path, "--seeds=7")  # seed 7 of b is missing: its (broken) run is started
  assert r.returncode != 0
  log = tmp_path / "root" / "seed7" / "b.log"
  assert "--config.seed=7" in r.stderr and str(log) in r.stderr, r.stderr
  assert r.stderr.count("already finished") == 3, r.stderr


@pytest.mark.slow
def test_replicate_seeds_are_summarized_over_seeds(tmp_path):
  for d in ("a", "b", "seed7/a", "seed7/b"):
    os.makedirs(tmp_path / "root" / d)
    write_workdir(tmp_path / "root" / d, torn=False)
  r = _sweep(tmp_path, "--seeds=7")
  assert r.returncode == 0, r.stderr
  summary = (tmp_path / "root" / "summary.md").read_text()
  assert "| run | seed 0 | seed 7 | mean | sd | minus a (paired) |" in summary, summary
  assert "| b | 3.0000 | 3.0000 | 3.0000 | 0.0000 | +0.0000 ± 0.0000 |" in summary, summary
  assert (tmp_path / "root" / "sweep_seeds.png").stat().st_size > 1000


def test_bad_seeds_are_a_usage_error(tmp_path):
  r = _sweep(tmp_path, "--seeds=1,x")
  assert r.returncode != 0 and "--seeds" in r.stderr.splitlines()[-1], r.stderr


@pytest.mark.slow
def test_trains_times_and_summarizes_a_variant(tiny_config, tmp_path):
  tiny_config.train.steps = 2
  tiny_config.train.eval_every = 2
  (tmp_path / "tiny_exp.py").write_text(
      "import ml_collections\nVARIANTS = ('dropless',)\n"
      f"def get_config(arg=None):\n"
      f"  c = ml_collections.ConfigDict({tiny_config.to_dict()!r})\n"
      f"  c.moe.dispatch = arg\n  return c\n")
  r = subprocess.run(
      [sys.executable, "-m", "moex.sweep", f"--config={tmp_path / 'tiny_exp.py'}",
       f"--root={tmp_path / 'root'}", "--bench_steps=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = (tmp_path / "root" / "summary.md").read_text()
  assert "| dropless |" in summary and "Train step timed back to back" in summary
  assert (tmp_path / "root" / "bench.json").exists()
  assert "final validation" in (tmp_path / "root" / "dropless.log").read_text()


@pytest.mark.xdist_group("many_experts_workdir")  # the session fixture, built once
@pytest.mark.slow
def test_summarizes_a_run_with_many_experts(many_experts_workdir, tmp_path):
  """A finished E=256 variant (summarized per-expert lists) gets its row and routing figure."""
  (tmp_path / "root" / "a").mkdir(parents=True)
  for name in ("metrics.jsonl", "moe_stats.jsonl", "config.json"):
    shutil.copy(os.path.join(many_experts_workdir, name), tmp_path / "root" / "a")
  (tmp_path / "exp.py").write_text(CONFIG.replace("30", "4").replace('("a", "b")', '("a",)'))
  r = subprocess.run(
      [sys.executable, "-m", "moex.sweep", f"--config={tmp_path / 'exp.py'}",
       f"--root={tmp_path / 'root'}", "--bench_steps=0"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = (tmp_path / "root" / "summary.md").read_text()
  assert "| a |" in summary and "dead experts (end)" in summary, summary
  assert (tmp_path / "root" / "sweep_routing.png").stat().st_size > 1000


DEPENDENT = '''
import ml_collections
VARIANTS = ("a", "b")
INIT_FROM = {"b": "a"}
UPCYCLE = UPCYCLE_FLAGS
BASELINE = "b"
def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict({"steps": 30 if arg == "a" else 40})
  return c
'''


def _dependent(tmp_path, upcycle="{}", *args):
  (tmp_path / "exp.py").write_text(DEPENDENT.replace("UPCYCLE_FLAGS", upcycle))
  return subprocess.run(
      [sys.executable, "-m", "moex.sweep", f"--config={tmp_path / 'exp.py'}",
       f"--root={tmp_path / 'root'}", "--bench_steps=0", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_variant_starts_from_its_init_from_source(tmp_path):
  os.makedirs(tmp_path / "root" / "a")
  write_workdir(tmp_path / "root" / "a", torn=False)
  r = _dependent(tmp_path)
  assert r.returncode != 0 and "variant 'b' failed (exit" in r.stderr, r.stderr
  assert f"--config.train.init_from={tmp_path / 'root' / 'a'}" in r.stderr, r.stderr


@pytest.mark.slow
def test_an_upcycled_variant_is_upcycled_first_and_an_unfinished_source_stops(tmp_path):
  r = _dependent(tmp_path, '{"b": ["--method=drop"]}', "--variants=b")
  assert r.returncode != 0 and "starts from 'a', which has not finished" in r.stderr, r.stderr
  os.makedirs(tmp_path / "root" / "a")
  write_workdir(tmp_path / "root" / "a", torn=False)
  r = _dependent(tmp_path, '{"b": ["--method=drop"]}')
  root = tmp_path / "root"
  assert (f"moex.upcycle --from={root / 'a'} --workdir={root / 'b.upcycled'} "
          f"--config={tmp_path / 'exp.py'}:b --method=drop") in r.stderr, r.stderr
  assert "variant 'b' failed (upcycle)" in r.stderr, r.stderr  # a holds no parameters
  assert "moex.upcycle: " in (root / "b.log").read_text()


@pytest.mark.slow
def test_an_init_from_source_must_come_first(tmp_path):
  r = _dependent(tmp_path, "{}", "--variants=b,a")
  assert r.returncode != 0 and "INIT_FROM['b'] = 'a' must be a variant listed before 'b'" in (
      r.stderr.splitlines()[-1]), r.stderr


@pytest.mark.slow
def test_continued_variants_are_compared_at_cumulative_training_flops(tmp_path):
  """b continues a: its curve starts at a's 30 steps of model FLOPs; the paired differences
  subtract the BASELINE (b)."""
  from experiments import tiny
  from moex import config as config_lib
  from moex.train import flops

  config = tiny.get_config().to_dict()
  config["model"]["vocab_size"] = 259
  config["train"]["steps"] = 30
  for d in ("a", "b", "seed7/a", "seed7/b"):
    os.makedirs(tmp_path / "root" / d)
    write_workdir(tmp_path / "root" / d, torn=False, config=config)
  (tmp_path / "exp.py").write_text(DEPENDENT.replace("UPCYCLE_FLAGS", "{}").replace("40", "30"))
  r = subprocess.run(
      [sys.executable, "-m", "moex.sweep", f"--config={tmp_path / 'exp.py'}",
       f"--root={tmp_path / 'root'}", "--bench_steps=0", "--seeds=7"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = (tmp_path / "root" / "summary.md").read_text()
  cfg = config_lib.validate(__import__("ml_collections").ConfigDict(config))
  step = flops.train_flops_per_token(cfg) * cfg.data.batch_size * cfg.data.seq_len
  assert f"| a | {0:.3e} | {30 * step:.3e} |" in summary, summary
  assert f"| b | {30 * step:.3e} | {60 * step:.3e} |" in summary, summary
  assert "| run | seed 0 | seed 7 | mean | sd | minus b (paired) |" in summary, summary
  seeds = summary[summary.index("minus b (paired)"):]
  assert seeds.index("| b | 3.0000 | 3.0000 |") < seeds.index("| a | 3.0000 | 3.0000 |")
  assert (tmp_path / "root" / "sweep_flops.png").stat().st_size > 1000
