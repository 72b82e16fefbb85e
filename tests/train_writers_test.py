"""Tests for moex/train/writers.py: resumed logs hold every step once, every line whole."""

import json

from moex.train import writers


def test_truncate_after_drops_later_and_torn_lines(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n" for s in (1, 2))
                  + '{"step": 3, "spl')
  writers.truncate_after(path, 2)
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
  assert path.read_text().endswith("\n")
  assert "0 lines after step 2 and 1 torn lines" in caplog.text


def test_fresh_start_drops_lines_of_an_attempt_without_checkpoint(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "eval"}) + "\n")
  w = writers.Writer(tmp_path)
  w.metrics({"step": 0, "split": "eval", "loss": 1.0})
  w.close()
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
