"""Output files written whole: a temporary file next to the target, then renamed over it.

A reader (or a re-run after a kill) sees the old file or the new one, never half of one.
For the local outputs of the report, compare, sweep and scaling commands; a workdir's
config.json has its own (remote-aware) writer, moex.workdir.Workdir.write_config.
"""

from __future__ import annotations

import os


def _tmp(path: str) -> str:
  stem, ext = os.path.splitext(path)
  return f"{stem}.{os.getpid()}.tmp{ext}"  # the extension kept: savefig picks the format by it


def write_text(path: str | os.PathLike, text: str) -> str:
  """Writes `text` (UTF-8) to `path` whole, creating its folder; returns the path."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp(path)
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> str:
  """fig.savefig to `path` whole (a matplotlib Figure), creating its folder; returns it."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp(path)
  try:
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
