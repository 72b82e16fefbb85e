"""moex/report/comparison.py: eval curves of several workdirs, table and figure."""

import json

import pytest

from moex.report import comparison


def _workdir(path, bpb_by_step):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    for step, bpb in bpb_by_step.items():
      f.write(json.dumps({"step": step, "split": "eval", "loss": 1.0,
                          "bits_per_byte": bpb}) + "\n")
      f.write(json.dumps({"step": step, "split": "train", "loss": 2.0}) + "\n")
    f.write('{"step": 9, "split": "ev')  # a torn last line is skipped


def test_table_and_plot(tmp_path):
  _workdir(tmp_path / "a", {0: 8.0, 100: 2.5})
  _workdir(tmp_path / "b", {0: 8.1, 100: 2.7, 200: 2.4})
  curves = {"a": comparison.eval_curve(str(tmp_path / "a")),
            "b": comparison.eval_curve(str(tmp_path / "b"))}
  assert curves["a"] == {0: 8.0, 100: 2.5}
  md = comparison.table(curves)
  assert "| 100 | 2.5000 | 2.7000 |" in md and "| 200 | – | 2.4000 |" in md
  out = tmp_path / "fig" / "c.png"
  comparison.plot(curves, str(out))
  assert out.stat().st_size > 1000


def test_summary_and_routing_figure_of_moe_runs(tmp_path):
  from report_workdir import write_workdir  # the hand-written workdir (E=4, K=2)

  (tmp_path / "cap").mkdir()
  (tmp_path / "free").mkdir()
  cap = write_workdir(tmp_path / "cap")
  free = write_workdir(tmp_path / "free", cf=None, torn=False)
  s = comparison.summarize(cap)
  assert s["eval_bpb"] == 3.0 and s["steps"] == 30 and s["capacity_factor"] == 1.25
  # Layer 0 keeps all 80 of its assignments, layer 1 drops 5/80 (steps 10, 20) and
  # 15/80 at step 30, where expert 3 is dead.
  assert s["dropped_fraction"] == pytest.approx((0 + (5 + 5 + 15) / 3 / 80) / 2)
  assert s["dead_experts"] == 1 and s["max_dead_experts"] == 1
  assert s["final_needed_cf"] == 2.5 and s["final_routing_churn"] is None
  assert comparison.summarize(free)["capacity_factor"] is None
  md = comparison.compare([cap, free], ["cap", "free"], str(tmp_path / "out" / "c.png"))
  assert "| cap | 3.0000 |" in md and "dead experts (end)" in md
  assert "routing churn" not in md  # no run measured it: the column is left out
  for name in ("c.png", "c_routing.png"):
    assert (tmp_path / "out" / name).stat().st_size > 1000


def test_seed_table_means_sds_and_paired_differences():
  final = {"moe": {"s0": 1.0, "s1": 2.0, "s2": 3.0},
           "dense": {"s0": 1.5, "s1": 2.0, "s2": None}}
  lines = comparison.seed_table(final).splitlines()
  assert lines[0] == "| run | s0 | s1 | s2 | mean | sd | minus moe (paired) |"
  assert lines[2] == "| moe | 1.0000 | 2.0000 | 3.0000 | 2.0000 | 1.0000 | – |"
  # dense - moe over the seeds both have: +0.5, 0.0 -> mean 0.25, sd 0.3536.
  assert lines[3] == "| dense | 1.5000 | 2.0000 | – | 1.7500 | 0.3536 | +0.2500 ± 0.3536 |"


def test_seed_figure_is_written(tmp_path):
  curves = {"a": [{0: 5.0, 10: 3.0}, {0: 5.5, 10: 3.2}], "b": [{0: 5.0, 10: 2.9}]}
  comparison.plot_seeds(curves, str(tmp_path / "s.png"))
  assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.xdist_group("many_experts_workdir")  # the session fixture, built once
@pytest.mark.slow
def test_summary_and_routing_figure_of_a_run_with_many_experts(many_experts_workdir, tmp_path):
  """E=256: expert_load is a summary and dead_experts a count; both still reach the table."""
  lines = [json.loads(line) for line in open(f"{many_experts_workdir}/moe_stats.jsonl")]
  last = [r for r in lines if r["split"] == "train" and r["step"] == 4]
  s = comparison.summarize(many_experts_workdir)
  assert s["steps"] == 4 and s["capacity_factor"] == 1.25
  assert s["dead_experts"] == sum(r["dead_experts"]["count"] for r in last)
  assert s["cf_for_1pct"] is None or s["cf_for_1pct"] >= 1.0
  md = comparison.compare([many_experts_workdir], ["e256"], str(tmp_path / "c.png"))
  assert "| e256 |" in md and "dead experts (end)" in md
  assert (tmp_path / "c_routing.png").stat().st_size > 1000


def test_a_missing_workdir_or_bad_labels_or_out_is_one_line_and_writes_nothing(tmp_path):
  _workdir(tmp_path / "a", {0: 8.0, 100: 2.5})
  a, out = str(tmp_path / "a"), str(tmp_path / "figs" / "c.png")
  (tmp_path / "file").write_text("x")
  for dirs, labels, o, line in [
      ([a, str(tmp_path / "b")], ["a", "b"], out, f"--workdirs: {tmp_path / 'b'}: no such directory"),
      ([a, str(tmp_path / "file")], ["a", "b"], out, f"--workdirs: {tmp_path / 'file'}: not a directory"),
      ([a], ["a", "b"], out, "--labels: 2 label(s) for 1 workdir(s); give one per --workdirs entry"),
      ([a], ["a"], str(tmp_path), f"--out={tmp_path}: is a folder; give the PNG file to write"),
      ([a], ["a"], str(tmp_path / "file" / "c.png"),
       f"--out={tmp_path / 'file' / 'c.png'}: {tmp_path / 'file'} is a file, not a folder")]:
    with pytest.raises(comparison.CompareError) as e:
      comparison.compare(dirs, labels, o)
    assert str(e.value) == line
  assert not (tmp_path / "figs").exists()
