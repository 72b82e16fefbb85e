"""moex/moe/parallel.py: expert parallelism changes nothing but where the work runs.

The comparisons run in a subprocess with 8 simulated CPU devices
(tests/multidevice/ep_equivalence.py): the same tiny model on 1 device and on meshes
(data=2, expert=4), (expert=8), (data=2, expert=2, tensor=2), capacity and dropless paths,
three train steps each; and the dropless path with a bounded pair buffer on (expert=8).
"""

import pathlib

import pytest

import multidevice_run

# Every test here reads one 8-device script's results (5 minutes on 2 cores): slow, and one
# worker, so the fixture runs once per session.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("moe_parallel")]

SCRIPT = pathlib.Path(__file__).parent / "multidevice" / "ep_equivalence.py"


@pytest.fixture(scope="module")
def comparisons():
  stdout, rows = multidevice_run.run(SCRIPT.name)
  assert len(rows) == 2 * 3 * 3 + 3, stdout
  return rows


def _equivalence(rows):
  return [r for r in rows if not r.get("bounded")]


def test_loss_balancing_terms_stats_and_grads_match_one_device(comparisons):
  for row in _equivalence(comparisons):
    where = f"{row['dispatch']} on {row['mesh']}, step {row['step']}"
    assert row["scalars"] <= 1, f"loss/balancing terms differ: {where}"
    assert row["moe_float"] <= 1, f"router entropy/balancing stats differ: {where}"
    assert row["counts_equal"], f"expert load/kept counts differ: {where}"
    assert row["grads"] <= 1, f"gradients differ: {where}"


def test_compiled_step_has_all_to_alls_and_no_expert_weight_all_gather(comparisons):
  for row in _equivalence(comparisons):
    if row["step"] == 0:
      assert row["all_to_all"] > 0, row
      assert not row["expert_weight_all_gather"], row


def test_bounded_dropless_buffer_counts_its_overflow(comparisons):
  """moe.ep_buffer_factor=0.5 on 8 expert ranks: rows past each pair buffer are dropped and
  counted (kept + overflow = load); one device never overflows."""
  rows = [r for r in comparisons if r.get("bounded")]
  assert len(rows) == 3
  for row in rows:
    assert row["overflow"] > 0, row
    assert row["one_device_overflow"] == 0, row
    assert row["kept_plus_overflow_is_load"], row
    assert row["loss_finite"], row
  # Same weights and inputs before the first update: the first MoE layer routes the same.
  assert rows[0]["first_layer_load_equal"], rows[0]
