"""moex/files.py: outputs written whole (a temporary file renamed over the target)."""

import os

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moex import files


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "out" / "summary.md"
  assert files.write_text(path, "old") == str(path)
  files.write_text(path, "new ✓")
  assert path.read_text(encoding="utf-8") == "new ✓"
  assert os.listdir(tmp_path / "out") == ["summary.md"]


def test_a_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "a.json"
  files.write_text(path, "old")

  def fail(src, dst):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    files.write_text(path, "new")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_save_figure_keeps_the_format_of_the_name(tmp_path):
  fig = Figure()
  FigureCanvasAgg(fig)
  fig.subplots().plot([0, 1], [1, 0])
  path = files.save_figure(fig, tmp_path / "f" / "c.png")
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path / "f") == ["c.png"]
