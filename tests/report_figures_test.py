"""Tests for moex/report/figures.py: every figure from listed and from summarized loads."""

import pytest
from report_workdir import write_workdir

from moex import report
from moex.report import figures

NAMES = ("loss.png", "load_latest.png", "load_over_time.png", "dropped.png", "needed_cf.png",
         "entropy.png")


def _draw_all(workdir, out):
  out.mkdir()
  run = report.load_run(workdir)
  return [plot(run, str(out)) for plot, _ in figures.FIGURES]


def test_every_figure_from_listed_loads(tmp_path):
  (tmp_path / "w").mkdir()
  names = _draw_all(write_workdir(tmp_path / "w"), tmp_path / "out")
  assert tuple(names) == NAMES
  for name in names:
    assert (tmp_path / "out" / name).stat().st_size > 1000, name


@pytest.mark.xdist_group("many_experts_workdir")  # the session fixture, built once
@pytest.mark.slow
def test_every_figure_from_summarized_loads(many_experts_workdir, tmp_path):
  """E=256: load share percentiles over experts instead of per-expert heatmaps."""
  names = _draw_all(many_experts_workdir, tmp_path / "out")
  assert tuple(names) == NAMES
  for name in names:
    assert (tmp_path / "out" / name).stat().st_size > 1000, name


@pytest.mark.parametrize("plot", [p for p, _ in figures.FIGURES])
def test_no_data_no_figure(plot, tmp_path):
  assert plot(report.Run(metrics=[], moe=[], config={}), str(tmp_path)) is None
