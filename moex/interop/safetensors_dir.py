"""A Hugging Face model directory's safetensors files: read one tensor (or slice) at a time,
write in shards with an index.

Reading memory-maps a file (safetensors' own `safe_open`) for each tensor asked for, copies
out only that tensor, or the rows of it that are asked for, and unmaps the file again, so
the pages read never accumulate in the process: a checkpoint is never in host memory whole.
"""

from __future__ import annotations

import json
import shutil
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


def replace_dir(tmp: epath.Path, final: epath.Path) -> None:
  """Moves a finished `tmp` directory to `final` (an old `final` is removed first)."""
  if final.exists():
    shutil.rmtree(str(final))
  tmp.rename(final)
