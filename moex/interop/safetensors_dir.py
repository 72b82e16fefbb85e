"""A Hugging Face model directory's safetensors files: read one tensor (or slice) at a time,
write in shards with an index.

Reading memory-maps a file (safetensors' own `safe_open`) for each tensor asked for, copies
out only that tensor, or the rows of it that are asked for, and unmaps the file again, so
the pages read never accumulate in the process: a checkpoint is never in host memory whole.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import numpy as np
from absl import logging
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save_file

from moex import errors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class FormatError(ValueError, errors.Refusal):
  """A missing or malformed file or tensor; the message is one line naming it."""


class Reader:
  """The tensors of a model directory, by name, across its shard files."""

  def __init__(self, directory: str):
    self.directory = epath.Path(directory)
    index = self.directory / INDEX
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in self.directory.glob("*.safetensors"))
      if not files:
        raise FormatError(f"{self.directory}: no {SINGLE}, *.safetensors or {INDEX}")
      weight_map = None
    self._where: dict[str, str] = {}
    self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype)
    for name in files:
      path = self.directory / name
      if not path.exists():
        raise FormatError(f"{path}: listed in {INDEX} but missing")
      with self._open(name) as handle:
        for key in handle.keys():
          s = handle.get_slice(key)
          self._where[key] = name
          self._meta[key] = (tuple(s.get_shape()), s.get_dtype())
    if weight_map is not None:
      for key, name in weight_map.items():
        if self._where.get(key) != name:
          raise FormatError(f"{self.directory / name}: has no tensor {key} (listed in {INDEX})")

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def keys(self) -> list[str]:
    return sorted(self._where)

  def file_of(self, name: str) -> epath.Path:
    return self.directory / self._where[name]

  def _open(self, file: str):
    path = self.directory / file
    try:
      return safe_open(str(path), framework="numpy")
    except Exception as e:  # pylint: disable=broad-except  (safetensors' own error types)
      raise FormatError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None

  def _known(self, name: str) -> None:
    if name not in self._where:
      raise FormatError(f"{self.directory}: no tensor {name}")

  def shape(self, name: str) -> tuple[int, ...]:
    self._known(name)
    return self._meta[name][0]

  def dtype(self, name: str) -> str:
    self._known(name)
    return self._meta[name][1]

  def get(self, name: str, shape: tuple[int, ...] | None = None,
          rows: slice | None = None) -> np.ndarray:
    """Tensor `name` (only `rows` of its first axis if given), checked against `shape`."""
    if shape is not None and self.shape(name) != tuple(shape):
      raise FormatError(f"{self.file_of(name)}: tensor {name} has shape {self.shape(name)}, "
                        f"config.json implies {tuple(shape)}")
    self._known(name)
    with self._open(self._where[name]) as handle:  # unmapped again on exit
      s = handle.get_slice(name)
      return np.array(s[rows] if rows is not None else s[:])  # a copy, not a view of the map


def write(directory: str, tensors: Iterable[tuple[str, tuple[int, ...], str, Callable]],
          max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes safetensors shards (+ index when more than one) into `directory`.

  `tensors` yields (name, shape, dtype name, fetch) with fetch() -> np.ndarray; shards are
  planned from the shapes first, then each shard's tensors are fetched, written and
  released, so host memory holds one shard at a time. Returns the file names.
  """
  plan: list[list[tuple[str, Callable]]] = [[]]
  size = 0
  for name, shape, dtype, fetch in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append((name, fetch))
    size += nbytes
  out = epath.Path(directory)
  n = len(plan)
  names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  weight_map, total = {}, 0
  for file, shard in zip(names, plan):
    arrays = {name: np.ascontiguousarray(fetch()) for name, fetch in shard}
    total += sum(a.nbytes for a in arrays.values())
    save_file(arrays, str(out / file), metadata={"format": "pt"})
    logging.info("export: wrote %s (%.2f GB so far)", file, total / 1e9)
    weight_map.update({name: file for name in arrays})
    del arrays
  if n > 1:
    (out / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2))
  return names


# ---------------------------------------------------------------------------------------
# The export directory: written as OUT.partial, swapped in by renames, recognised by MARKER.

MARKER = "moex_export.json"  # Written last into every export: OUT is moex's to replace.
PARTIAL = ".partial"  # OUT.partial: the new copy being written.
PREVIOUS = ".moex-previous"  # OUT.moex-previous: the old copy, moved aside during the swap.


class TargetError(ValueError, errors.Refusal):
  """An export target moex will not replace; the message is one line naming it."""


def sibling(out: epath.Path, suffix: str) -> epath.Path:
  return out.parent / (out.name + suffix)


def _move(src: epath.Path, dst: epath.Path) -> None:
  """One rename of the swap (a seam for the tests' injected kills)."""
  src.rename(dst)


def _absolute(p) -> str:
  s = os.fspath(p)
  return s if "://" in s else os.fspath(epath.Path(s).resolve())


def is_export(directory: epath.Path) -> bool:
  return (directory / MARKER).exists()


def check_target(out: epath.Path, *, overwrite: bool = False, flag: str = "--to_hf",
                 keep: tuple[epath.Path, ...] = ()) -> None:
  """Finishes or undoes a swap an earlier export left half done, then refuses an `out` that
  is not moex's to replace: a file, a directory holding anything but a previous export
  (unless `overwrite`), or one holding a path of `keep` (the workdir, the current directory).
  """
  prev = sibling(out, PREVIOUS)
  if prev.exists():
    if out.exists():  # the new copy was moved in; only removing the old one was left
      logging.warning("export: removing %s (left by an interrupted export)", prev)
      prev.rmtree()
    else:  # killed between the renames: the old copy is put back
      logging.warning("export: restoring %s from %s (an interrupted export)", out, prev)
      _move(prev, out)
  if not out.exists():
    return
  if not out.is_dir():
    raise TargetError(f"{flag}={out}: is a file, not a directory; pick a new directory")
  whole = _absolute(out).rstrip("/")
  for k in keep:
    if _absolute(k) == whole or _absolute(k).startswith(whole + "/"):
      raise TargetError(f"{flag}={out}: holds {k}; moex never replaces it, even with "
                        "--overwrite; pick a new directory")
  if not overwrite and not is_export(out) and any(out.iterdir()):
    raise TargetError(f"{flag}={out}: holds files that are not a moex export (no {MARKER}); "
                      "pick a new or empty directory, or pass --overwrite to replace it")


def write_marker(directory: epath.Path, info: dict) -> None:
  """MARKER, last: the files of the finished export (name -> bytes) and what made it."""
  files = {p.name: p.stat().length for p in sorted(directory.iterdir()) if p.name != MARKER}
  (directory / MARKER).write_text(json.dumps({**info, "files": files}, indent=2))


def replace_dir(tmp: epath.Path, final: epath.Path) -> None:
  """Moves a finished `tmp` directory to `final`: an old `final` is moved aside, the new one
  moved in, the old one removed last. Locally each rename is atomic, so a kill leaves either
  the old copy (at `final` or aside at FINAL.moex-previous) or the new one; check_target on
  the next run puts an old copy aside back, or removes it once the new one is in."""
  prev = sibling(final, PREVIOUS)
  if final.exists():
    if prev.exists():
      prev.rmtree()
    _move(final, prev)
  _move(tmp, final)
  if prev.exists():
    prev.rmtree()
