"""Tests for moex/report/page.py: the Markdown page, its figures, python -m moex.report."""

import json
import pathlib
import subprocess
import sys

import pytest

from report_workdir import write_workdir

from moex import report
from moex.report import capacity, page

ROOT = pathlib.Path(__file__).parents[1]
FIGURES = ("loss.png", "load_latest.png", "load_over_time.png", "dropped.png", "needed_cf.png",
           "entropy.png")


def test_writes_every_figure_and_references_it(tmp_path):
  (tmp_path / "w").mkdir()
  page = report.write_report(write_workdir(tmp_path / "w"), str(tmp_path / "out"))
  md = open(page).read()
  for name in FIGURES:
    assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert f"]({name})" in md, name
  assert "dead experts (zero load in the latest train window): layer 1: [3]" in md
  assert "overload factor" in md
  assert "| 1 | 3 | 0.1042 | 0.1042 | per-sequence histogram | 2.00 | 2.50 | 1.25 | 1.60× |" in md


def test_dropless_run(tmp_path):
  workdir = write_workdir(tmp_path, cf=None, torn=False)
  md = open(report.write_report(workdir, str(tmp_path / "out"))).read()
  assert "**Dropless run**" in md
  assert "| 1 | 3 | 0.0000 | – | per-sequence histogram | 2.00 | 2.50 | dropless | – |" in md
  assert "training capacity factor dropless" in md


def test_records_without_histogram(tmp_path):
  workdir = write_workdir(tmp_path, hist=False)
  md = open(report.write_report(workdir, str(tmp_path / "out"))).read()
  assert "| 1 | 3 | 0.1042 | – | n/a, record predates sequence_load_hist | – | 2.50 |" in md


def test_no_moe_stats(tmp_path):
  write_workdir(tmp_path)
  (tmp_path / "moe_stats.jsonl").write_text("")
  md = open(report.write_report(str(tmp_path), str(tmp_path / "out"))).read()
  assert "No MoE statistics" in md
  assert "](loss.png)" in md and "](dropped.png)" not in md


@pytest.mark.xdist_group("many_experts_workdir")  # the session fixture, built once
@pytest.mark.slow
def test_report_of_a_run_with_many_experts(many_experts_workdir, tmp_path):
  """E=256 > moe.stats_max_experts: per-expert lists are summaries; the page still reports."""
  run = report.load_run(many_experts_workdir)
  assert len(run.moe) == 8  # 2 MoE layers x (train at steps 2, 4; eval at 0, 4)
  md = open(report.write_report(many_experts_workdir, str(tmp_path / "out"))).read()
  assert "No MoE statistics" not in md
  assert "256 experts, top_k 8" in md
  lines = [json.loads(line) for line in open(f"{many_experts_workdir}/moe_stats.jsonl")]
  dead = [r["dead_experts"]["count"] for r in lines if r["split"] == "train" and r["step"] == 4]
  assert f"layer 0: {dead[0]} of 256; layer 1: {dead[1]} of 256" in md
  for layer, row in enumerate(report.recommend(run, 0.01, 20)):
    assert row["layer"] == layer and row["windows"] == 2 and row["estimate"] == capacity.ESTIMATE
    # S * K / E = 1 and min_capacity 4: every histogram bin is one load, so the estimate at
    # the current factor is exactly the drop the layer made.
    assert abs(row["estimated_dropped"] - row["recent_dropped"]) < 1e-9, row
    assert f"| {layer} | 2 | {row['recent_dropped']:.4f} | " in md
  for name in FIGURES:
    assert (tmp_path / "out" / name).stat().st_size > 1000, name
    assert f"]({name})" in md, name


@pytest.mark.slow
def test_command_line(tmp_path):
  (tmp_path / "w").mkdir()
  workdir = write_workdir(tmp_path / "w")
  r = subprocess.run([sys.executable, "-m", "moex.report", f"--workdir={workdir}",
                      f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr
  assert f"moex.report: {tmp_path / 'out' / 'report.md'}" in r.stdout
  r = subprocess.run([sys.executable, "-c", "import moex.report; from absl import flags; "
                      "print('workdir' in flags.FLAGS)"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.stdout.strip() == "False", r.stderr  # importing the package defines no flags


def test_bad_workdir_out_or_setting_is_one_line(tmp_path):
  (tmp_path / "w").mkdir()
  workdir = write_workdir(tmp_path / "w")
  (tmp_path / "file").write_text("x")
  for kwargs, line in [
      ({"workdir": str(tmp_path / "nope")}, f"--workdir={tmp_path / 'nope'}: no such directory"),
      ({"workdir": str(tmp_path / "file")}, f"--workdir={tmp_path / 'file'}: not a directory"),
      ({"workdir": workdir, "out": str(tmp_path / "file")},
       f"--out={tmp_path / 'file'}: is a file, not a folder"),
      ({"workdir": workdir, "target_drop": float("nan")},
       "--target_drop=nan: must be a fraction in [0, 1)"),
      ({"workdir": workdir, "target_drop": 1.0}, "--target_drop=1.0: must be a fraction in [0, 1)"),
      ({"workdir": workdir, "recent": 0}, "--recent=0: must be at least 1 train window")]:
    with pytest.raises(page.ReportError) as e:
      page.write_report(**kwargs)
    assert str(e.value) == line
  assert not (tmp_path / "nope").exists()  # nothing created for a refused report


@pytest.mark.slow
def test_command_refuses_a_missing_workdir_in_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "moex.report", f"--workdir={tmp_path / 'nope'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      f"moex.report: --workdir={tmp_path / 'nope'}: no such directory")
