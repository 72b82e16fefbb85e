"""moex/compare.py: eval curves of several workdirs, table and figure."""

import json

from moex import compare


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
  curves = {"a": compare.eval_curve(str(tmp_path / "a")),
            "b": compare.eval_curve(str(tmp_path / "b"))}
  assert curves["a"] == {0: 8.0, 100: 2.5}
  md = compare.table(curves)
  assert "| 100 | 2.5000 | 2.7000 |" in md and "| 200 | – | 2.4000 |" in md
  out = tmp_path / "fig" / "c.png"
  compare.plot(curves, str(out))
  assert out.stat().st_size > 1000
