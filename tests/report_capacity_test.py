"""Tests for moex/report/capacity.py: drop at any capacity factor, the recommendation."""

import numpy as np
import pytest
from report_workdir import E, K, S, load_hist, moe_line, write_workdir

from moex import config as config_lib
from moex import report
from moex.report import capacity


def _record(load, s=S, k=K, e=E, min_capacity=0):
  """A one-sequence window with the given per-expert loads."""
  return {"top_k": k, "num_experts": e, "tokens_per_group": s, "min_capacity": min_capacity,
          "sequence_load_hist": load_hist(load, unit=s * k / e)}


def _smallest_cf(windows, target):
  return capacity.smallest_cf(
      np.stack([capacity.drop(r, capacity.CF_GRID, {}) for r in windows], -1), target)


def test_histogram_drop_by_hand():
  # (sequence, expert) loads 40, 20, 20, 0 with S * K / E = 20: factors 2, 1, 1, 0.
  hist = {"bin_width": 0.05, "counts": [1] + [0] * 19 + [2] + [0] * 19 + [1],
          "load_sums": [0] + [0] * 19 + [40] + [0] * 19 + [40]}
  cap_G = capacity.capacities(np.array([1.0, 1.5, 2.0]), S, K, E, 0)
  assert cap_G.tolist() == [20, 30, 40]
  np.testing.assert_allclose(capacity.histogram_drop(hist, cap_G), [20 / 80, 10 / 80, 0.0])
  # min_capacity raises C: at cf 1.0 with min_capacity 40 nothing drops.
  cap_G = capacity.capacities(np.array([1.0]), S, K, E, 40)
  assert capacity.histogram_drop(hist, cap_G)[0] == 0.0


def test_capacities_are_the_config_formula():
  for cf in capacity.CF_GRID:
    assert capacity.capacities(np.array([cf]), 32, 8, 256, 4)[0] == config_lib.capacity(
        float(cf), 32, 8, 256, 4)


@pytest.mark.parametrize("target, expected", [
    (0.0, 2.0),  # loads [40, 20, 20, 0], 20 at cf 1: expert 0 needs cf 2
    (0.01, 2.0),  # 1.95 drops (40 - 39) / 80 = 1.25% > 1%
    (0.05, 1.8),  # (40 - 36) / 80 = 5%
])
def test_smallest_cf_by_hand(target, expected):
  assert _smallest_cf([_record([40, 20, 20, 0])], target) == expected


def test_smallest_cf_needs_95_percent_of_windows():
  even, skewed = _record([20, 20, 20, 20]), _record([40, 20, 20, 0])
  assert _smallest_cf([even] * 19 + [skewed], 0.01) == 1.0  # 19/20 = 95%
  assert _smallest_cf([even] * 18 + [skewed] * 2, 0.01) == 2.0
  assert _smallest_cf([_record([80, 0, 0, 0])], 0.0) == 4.0  # one expert takes all
  assert _smallest_cf([_record([10] + [0] * 9, s=10, k=1, e=10)], 0.0) is None  # needs 10


def test_min_capacity_of_the_record_is_used():
  # S * K / E = 1: C = max(ceil(cf), 4) is 4 up to cf 4, so loads of 4 never drop; without
  # the floor C = ceil(cf) first reaches 4 at cf 3.05.
  assert _smallest_cf([_record([4, 4, 0, 0], s=4, k=2, e=8, min_capacity=4)], 0.0) == 1.0
  assert _smallest_cf([_record([4, 4, 0, 0], s=4, k=2, e=8, min_capacity=0)], 0.0) == 3.05


def test_recommendation_rows(tmp_path):
  rows = report.recommend(report.load_run(write_workdir(tmp_path)), target=0.01, recent=2)
  by_layer = {r["layer"]: r for r in rows}
  # Layer 1's last two windows: [30, 20, 20, 10] (needs 1.5) and [40, 20, 20, 0] (needs 2.0).
  assert by_layer[1]["recommended_cf"] == 2.0
  assert by_layer[1]["cost"] == pytest.approx(2.0 / 1.25)
  assert by_layer[0]["recommended_cf"] == 1.0
  assert by_layer[1]["max_needed_cf"] == 2.5
  # At the current factor (C = 25) the estimate is the actual drop: 5/80 and 15/80.
  assert by_layer[1]["estimated_dropped"] == pytest.approx(by_layer[1]["recent_dropped"])
  assert by_layer[1]["estimated_dropped"] == pytest.approx(10 / 80)
  assert {r["estimate"] for r in rows} == {capacity.ESTIMATE}


def test_records_shape_wins_over_config_json(tmp_path):
  """New records carry tokens_per_group and min_capacity: config.json is not read for them."""
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  expected = report.recommend(report.load_run(write_workdir(tmp_path / "a")), 0.01, 2)
  bogus = {"moe": {"capacity_factor": 1.25, "min_capacity": 1000}, "data": {"seq_len": 4000}}
  got = report.recommend(report.load_run(write_workdir(tmp_path / "b", config=bogus)), 0.01, 2)
  assert got == expected


def test_old_records_fall_back_to_config_json(tmp_path):
  (tmp_path / "new").mkdir()
  (tmp_path / "old").mkdir()
  (tmp_path / "bare").mkdir()
  expected = report.recommend(report.load_run(write_workdir(tmp_path / "new")), 0.01, 2)
  old = report.load_run(write_workdir(tmp_path / "old", legacy=True))
  assert "tokens_per_group" not in old.moe[0]
  assert report.recommend(old, 0.01, 2) == expected
  bare = write_workdir(tmp_path / "bare", legacy=True, config={"moe": {}})
  row = report.recommend(report.load_run(bare), 0.01, 2)[0]
  assert row["recommended_cf"] is None and row["estimate"].startswith("n/a, tokens per")


def test_records_without_histogram_get_no_estimate(tmp_path):
  rows = report.recommend(report.load_run(write_workdir(tmp_path, hist=False)), 0.01, 2)
  for r in rows:
    assert r["estimate"] == "n/a, record predates sequence_load_hist"
    assert r["recommended_cf"] is None and r["estimated_dropped"] is None
    assert r["max_needed_cf"] == 2.5


def test_expert_choice_records_get_no_estimate():
  rec = moe_line(10, "train", 0, [20, 20, 20, 20], dispatch="expert_choice")
  assert capacity.no_estimate(rec, {}) == "expert choice drops no assignments"
  assert capacity.no_estimate(moe_line(10, "train", 0, [20, 20, 20, 20]), {}) is None
