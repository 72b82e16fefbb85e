"""Tests for moex/report/read.py: reading workdirs, per-expert fields whole or summarized."""

import json
import logging

import pytest
from report_workdir import moe_line, write_workdir

from moex import report
from moex.report import read


@pytest.fixture
def workdir(tmp_path):
  return write_workdir(tmp_path)


def _summary(load: list[int]) -> dict:
  """A per-expert field as moex.moe.stats writes it above moe.stats_max_experts."""
  return {"summary": True, "count": len(load), "sum": sum(load),
          "percentiles": {"0": 0.0, "5": 0.0, "25": 1.0, "50": 2.0, "75": 4.0, "95": 8.0,
                          "100": 10.0},
          "histogram": {"counts": [len(load)], "edges": [0.0, 10.0]}}


def test_torn_line_skipped_with_warning(workdir, caplog):
  with caplog.at_level(logging.WARNING):
    run = report.load_run(workdir)
  assert any("moe_stats.jsonl:11" in r.getMessage() and "torn" in r.getMessage()
             for r in caplog.records), caplog.text
  assert len(run.moe) == 10 and max(r["step"] for r in run.moe) == 30


def test_dead_experts_of_listed_loads(workdir):
  run = report.load_run(workdir)
  assert report.dead_experts(run) == {1: [3]}
  assert [report.dead_count(r) for r in report.latest_train(run).values()] == [0, 1]


def test_summarized_records_are_read(tmp_path):
  """Above moe.stats_max_experts per-expert fields are summaries: load_run keeps them."""
  load = [0, 0, 1, 2, 2, 4, 4, 8, 9, 10]
  rec = moe_line(10, "train", 0, [20, 20, 20, 20], expert_load=_summary(load),
                 expert_kept=_summary(load), dead_experts={"count": 2}, num_experts=10)
  (tmp_path / "moe_stats.jsonl").write_text(json.dumps(rec) + "\n")
  run = report.load_run(str(tmp_path))
  assert len(run.moe) == 1
  assert read.load_share(rec) is None and read.dead_list(rec) is None
  assert report.dead_count(rec) == 2 and report.dead_experts(run) == {0: 2}
  pct = read.share_percentiles(rec)
  assert pct["50"] == pytest.approx(2 / 40) and pct["100"] == pytest.approx(10 / 40)


def test_share_percentiles_of_a_list():
  rec = moe_line(10, "train", 0, [40, 20, 20, 0])
  assert read.load_share(rec).tolist() == [0.5, 0.25, 0.25, 0.0]
  pct = read.share_percentiles(rec)
  assert pct["0"] == 0.0 and pct["50"] == 0.25 and pct["100"] == 0.5


def test_dead_count_prefers_the_dead_experts_field():
  assert report.dead_count(moe_line(10, "train", 0, [40, 20, 20, 0])) == 1  # from the load
  assert report.dead_count(moe_line(10, "train", 0, [40, 20, 20, 0],
                                    dead_experts=[2, 3])) == 2


def test_a_line_that_is_not_utf8_is_skipped_like_any_bad_line(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(b'{"step": 1, "split": "train", "loss": 2.0}\n'
                   b'{"step": 2, "split": "tr\xff\xfein"}\n'
                   b'{"step": 3, "split": "train", "loss": 1.0}\n')
  with caplog.at_level(logging.WARNING):
    rows = report.read_jsonl(path)
  assert [r["step"] for r in rows] == [1, 3]
  assert any("metrics.jsonl:2: skipping a bad JSON line" in r.getMessage()
             for r in caplog.records), caplog.text
