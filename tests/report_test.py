"""Tests for moex/report.py on a hand-written workdir (2 MoE layers, E=4, K=2)."""

import json
import logging

import numpy as np
import pytest

from moex import report

E, K = 4, 2
TRAIN_STEPS = (10, 20, 30)
EVAL_STEPS = (0, 30)
FIGURES = ("loss.png", "load_latest.png", "load_over_time.png", "dropped.png", "needed_cf.png",
           "entropy.png")


def _moe_line(step, split, layer, load, cf=1.25, **extra):
  kept = [min(n, 25) for n in load] if cf else list(load)
  rec = {
      "step": step, "split": split, "layer": layer, "tokens": sum(load) // K, "num_experts": E,
      "top_k": K, "dispatch": "capacity" if cf else "dropless", "capacity": 25 if cf else None,
      "capacity_factor": cf, "expert_load": load, "expert_kept": kept,
      "dropped_fraction": 1 - sum(kept) / sum(load), "needed_capacity_factor": 2.5,
      "router_entropy": 1.2, "load_balance_loss": 1.1, "z_loss": 0.5,
      "seq_load_balance_loss": 1.1, "train_capacity": 25, "train_capacity_factor": 1.25,
      "train_capacity_dropped_fraction": 0.05,
  }
  rec.update(extra)
  return rec


def _write_workdir(path, cf=1.25, torn=True):
  """metrics.jsonl, moe_stats.jsonl (torn last line), config.json; layer 1 ends dead."""
  metrics = [{"step": s, "split": "train", "loss": 3.0 - 0.1 * s / 10, "cross_entropy": 2.9,
              "learning_rate": 1e-3, "grad_norm": 1.0} for s in TRAIN_STEPS]
  metrics += [{"step": s, "split": "eval", "loss": 3.0, "bits_per_byte": 4.0 - s / 30,
               "grad_norm": None} for s in EVAL_STEPS]
  moe = []
  for s in TRAIN_STEPS:
    moe.append(_moe_line(s, "train", 0, [20, 20, 20, 20], cf, topk_margin=0.3))
    moe.append(_moe_line(s, "train", 1, [40, 20, 20, 0] if s == 30 else [30, 20, 20, 10], cf,
                         topk_margin=0.2, overload_factor=1.5))
  for s in EVAL_STEPS:
    for layer in (0, 1):
      moe.append(_moe_line(s, "eval", layer, [25, 25, 15, 15], None))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
  text = "".join(json.dumps(r) + "\n" for r in moe)
  if torn:
    text += json.dumps(_moe_line(40, "train", 0, [20, 20, 20, 20], cf))[:50]
  (path / "moe_stats.jsonl").write_text(text)
  (path / "config.json").write_text(json.dumps(
      {"moe": {"num_experts": E, "top_k": K, "capacity_factor": cf or 1.25,
               "dispatch": "capacity" if cf else "dropless"}}))
  return str(path)


@pytest.fixture
def workdir(tmp_path):
  return _write_workdir(tmp_path)


def test_writes_every_figure_and_references_it(workdir, tmp_path):
  page = report.write_report(workdir, str(tmp_path / "out"))
  md = open(page).read()
  for name in FIGURES:
    assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert f"]({name})" in md, name
  assert "dead experts (zero load in the latest train window): layer 1: [3]" in md
  assert "overload factor" in md


def test_torn_line_skipped_with_warning(workdir, caplog):
  with caplog.at_level(logging.WARNING):
    run = report.load_run(workdir)
  assert any("moe_stats.jsonl:11" in r.getMessage() and "torn" in r.getMessage()
             for r in caplog.records), caplog.text
  assert len(run.moe) == 10 and max(r["step"] for r in run.moe) == 30


@pytest.mark.parametrize("target, expected", [
    (0.0, 2.0),  # loads [40, 20, 20, 0]: mean 20, expert 0 needs 2 x mean
    (0.01, 2.0),  # 1.95 drops (40 - 39) / 80 = 1.25% > 1%
    (0.05, 1.8),  # (40 - 36) / 80 = 5%
])
def test_smallest_cf_by_hand(target, expected):
  assert report.smallest_cf(np.array([[40, 20, 20, 0]]), target) == expected


def test_pooled_drop_by_hand():
  drop = report.pooled_drop(np.array([[40, 20, 20, 0]]), np.array([1.0, 1.5, 2.0]))
  np.testing.assert_allclose(drop[:, 0], [20 / 80, 10 / 80, 0.0])


def test_smallest_cf_needs_95_percent_of_windows():
  even, skewed = [20, 20, 20, 20], [40, 20, 20, 0]
  assert report.smallest_cf(np.array([even] * 19 + [skewed]), 0.01) == 1.0  # 19/20 = 95%
  assert report.smallest_cf(np.array([even] * 18 + [skewed] * 2), 0.01) == 2.0
  assert report.smallest_cf(np.array([[100, 0, 0, 0]]), 0.0) == 4.0  # one expert takes all
  assert report.smallest_cf(np.array([[100] + [0] * 9]), 0.0) is None  # needs 10 > 8.0


def test_recommendation_rows(workdir):
  rows = report.recommend(report.load_run(workdir), target=0.01, recent=2)
  by_layer = {r["layer"]: r for r in rows}
  # Layer 1's last two windows: [30, 20, 20, 10] (needs 1.5) and [40, 20, 20, 0] (needs 2.0).
  assert by_layer[1]["recommended_cf"] == 2.0
  assert by_layer[1]["cost"] == pytest.approx(2.0 / 1.25)
  assert by_layer[0]["recommended_cf"] == 1.0
  assert by_layer[1]["max_needed_cf"] == 2.5
  assert report.dead_experts(report.load_run(workdir)) == {1: [3]}


def test_dropless_run(tmp_path):
  workdir = _write_workdir(tmp_path, cf=None, torn=False)
  md = open(report.write_report(workdir, str(tmp_path / "out"))).read()
  assert "**Dropless run**" in md
  assert "| 1 | 3 | 0.0000 | – | pooled (optimistic) | 2.00 | 2.50 | dropless | – |" in md
  assert "training capacity factor dropless" in md


def test_no_moe_stats(tmp_path):
  _write_workdir(tmp_path)
  (tmp_path / "moe_stats.jsonl").write_text("")
  md = open(report.write_report(str(tmp_path), str(tmp_path / "out"))).read()
  assert "No MoE statistics" in md
  assert "](loss.png)" in md and "](dropped.png)" not in md


def test_histogram_drop_by_hand():
  # (sequence, expert) loads 40, 20, 20, 0 with unit L*K/E = 20: factors 2, 1, 1, 0.
  hist = {"bin_width": 0.05, "counts": [1] + [0] * 19 + [2] + [0] * 19 + [1],
          "load_sums": [0] + [0] * 19 + [40] + [0] * 19 + [40]}
  drop = report.histogram_drop([hist], np.array([1.0, 1.5, 2.0]), unit=20.0)[:, 0]
  np.testing.assert_allclose(drop, [20 / 80, 10 / 80, 0.0])
  # min_capacity raises C: at cf 1.0 with min_capacity 40 nothing drops.
  assert report.histogram_drop([hist], np.array([1.0]), 20.0, min_capacity=40)[0, 0] == 0.0
