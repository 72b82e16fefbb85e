"""Text sources: which files, how they split, and their cached token arrays."""

import glob
import hashlib
import json
import os
import pathlib
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence

from absl import logging
import numpy as np

from moex import config as config_lib
from moex.data import tokenizer as tokenizer_lib

_GLOB_CHARS = frozenset("*?[")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})
_CRC_BUCKETS = 10_000
# Tokenize this much text per encode_batch call; log progress this often.
_CHUNK_BYTES = 8 << 20
_CHUNK_FILES = 2048
_PROGRESS_SECONDS = 10.0


def _stdlib_files() -> list[pathlib.Path]:
  """Every *.py file of the running Python's standard library."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = []
  for path in root.rglob("*.py"):
    # Installed packages live under the stdlib dir too; they are not stdlib.
    if _EXCLUDED_DIRS.isdisjoint(path.relative_to(root).parts) and path.is_file():
      files.append(path)
  return sorted(files)


def _expand(pattern: str) -> list[pathlib.Path]:
  """Files named by one path or glob pattern."""
  pattern = os.path.expanduser(pattern)
  if _GLOB_CHARS.isdisjoint(pattern):
    path = pathlib.Path(pattern)
    if path.is_dir():
      raise FileNotFoundError(
          f"data.source: {path} is a directory; name files or a glob such as"
          f" '{path}/**/*.py'"
      )
    if not path.is_file():
      raise FileNotFoundError(f"data.source: file not found: {path}")
    return [path]
  return [pathlib.Path(p) for p in glob.glob(pattern, recursive=True)
          if os.path.isfile(p)]


def resolve_files(spec: str) -> list[pathlib.Path]:
  """Returns the sorted, deduplicated absolute files named by `spec`.

  `spec` is "stdlib" or comma-separated paths / glob patterns ("~" and "**" ok).
  """
  if spec.strip() == "stdlib":
    files = _stdlib_files()
  else:
    files = []
    for part in spec.split(","):
      if part.strip():
        files.extend(_expand(part.strip()))
  files = sorted({f.absolute() for f in files})
  if not files:
    raise FileNotFoundError(f"data.source: no files match {spec!r}")
  return files


def _crc(path: pathlib.Path, root: pathlib.Path) -> int:
  return zlib.crc32(path.relative_to(root).as_posix().encode("utf-8"))


def split_files(
    files: Sequence[pathlib.Path], val_fraction: float
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """Splits files into (train, validation) by a hash of their relative path.

  A file's side depends only on its path relative to the files' common root,
  so adding files never moves others, unlike a seeded random split. `val_fraction` is
  checked by moex.config.validate; whatever it is, both sides keep at least one file.
  """
  files = sorted(pathlib.Path(f).absolute() for f in files)
  if len(files) < 2:
    raise ValueError(
        "data.source: need at least 2 files to split into train and validation"
    )
  root = pathlib.Path(os.path.commonpath([f.parent for f in files]))
  crcs = {f: _crc(f, root) % _CRC_BUCKETS for f in files}
  threshold = val_fraction * _CRC_BUCKETS
  train = [f for f in files if crcs[f] >= threshold]
  val = [f for f in files if crcs[f] < threshold]
  # Keep both sides usable, moving the file closest to the threshold.
  if not val:
    moved = min(train, key=lambda f: (crcs[f], f))
    train.remove(moved)
    val.append(moved)
  elif not train:
    moved = max(val, key=lambda f: (crcs[f], f))
    val.remove(moved)
    train.append(moved)
  return train, val


def default_cache_dir() -> pathlib.Path:
  """$MOEX_CACHE_DIR/tokens (moex.config.cache_root: the cache root, as for cpu_peak.json)."""
  return config_lib.cache_root() / "tokens"


def _cache_key(
    files: Sequence[pathlib.Path], tokenizer: tokenizer_lib.Tokenizer
) -> str:
  """A short hash of everything the token array depends on."""
  stats = [os.stat(f) for f in files]
  desc = {
      "tokenizer": tokenizer.name,
      "vocab_size": tokenizer.vocab_size,
      # From the tokenizer's config files (not in its name): they mark the documents.
      "bos_id": tokenizer.bos_id,
      "eos_id": tokenizer.eos_id,
      "files": [[str(f), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)],
  }
  blob = json.dumps(desc, sort_keys=True).encode("utf-8")
  return hashlib.sha256(blob).hexdigest()[:16]


def _chunks(files: Sequence[pathlib.Path]) -> Iterator[list[pathlib.Path]]:
  """Consecutive runs of files of about _CHUNK_BYTES together, for batched encoding."""
  chunk, size = [], 0
  for f in files:
    chunk.append(f)
    size += os.stat(f).st_size
    if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_FILES:
      yield chunk
      chunk, size = [], 0
  if chunk:
    yield chunk


def _separators(tokenizer: tokenizer_lib.Tokenizer, dtype) -> tuple[np.ndarray, np.ndarray]:
  """([BOS] or [], [EOS] or []): the ids around each document (-1 = the tokenizer has none)."""
  if tokenizer.bos_id < 0 and tokenizer.eos_id < 0:
    logging.warning("data.tokenizer: %s has neither BOS nor EOS; documents are packed with "
                    "nothing between them", tokenizer.name)
  one = lambda i: np.array([i] if i >= 0 else [], dtype)
  return one(tokenizer.bos_id), one(tokenizer.eos_id)


class _Progress:
  """Logs files, MB and time left every _PROGRESS_SECONDS of a long tokenization."""

  def __init__(self, files: Sequence[pathlib.Path]):
    self.total_files, self.total_bytes = len(files), sum(os.stat(f).st_size for f in files)
    self.files = self.bytes = 0
    self.start = self.last = time.monotonic()

  def update(self, files: int, nbytes: int) -> None:
    self.files, self.bytes = self.files + files, self.bytes + nbytes
    now = time.monotonic()
    if now - self.last < _PROGRESS_SECONDS or not self.bytes:
      return
    self.last = now
    left = (now - self.start) * max(self.total_bytes - self.bytes, 0) / self.bytes
    logging.info("tokenizing: %d/%d files, %.1f/%.1f MB, about %.0f s left", self.files,
                 self.total_files, self.bytes / 1e6, self.total_bytes / 1e6, left)


def _tokenize(
    files: Sequence[pathlib.Path], tokenizer: tokenizer_lib.Tokenizer
) -> np.ndarray:
  """[BOS] + encode(file) + [EOS] for each file (an absent BOS/EOS left out), concatenated.

  Files are encoded in batches of about _CHUNK_BYTES (the libraries parallelize a batch).
  """
  dtype = tokenizer_lib.id_dtype(tokenizer.vocab_size)
  bos, eos = _separators(tokenizer, dtype)
  progress = _Progress(files)
  pieces = [np.zeros([0], dtype)]
  for chunk in _chunks(files):
    docs = [f.read_bytes() for f in chunk]
    for ids in tokenizer.encode_batch(docs):
      pieces += [bos, ids.astype(dtype, copy=False), eos]
    progress.update(len(chunk), sum(len(d) for d in docs))
  return np.concatenate(pieces)


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes `array` to `path` so that readers never see a partial file."""
  # A unique temp name per writer: several processes may fill one cache.
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def tokenized_array(
    files: Sequence[pathlib.Path],
    tokenizer: tokenizer_lib.Tokenizer,
    cache_dir: str,
    name: str,
) -> np.ndarray:
  """Returns the 1-D tokens of `files`, memory-mapped from a cache.

  Their dtype is tokenizer.id_dtype(vocab_size): uint16, or uint32 above 65536 ids.
  """
  dtype = tokenizer_lib.id_dtype(tokenizer.vocab_size)
  files = [pathlib.Path(f) for f in files]
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  cache.mkdir(parents=True, exist_ok=True)
  path = cache / f"{name}-{_cache_key(files, tokenizer)}.npy"
  if path.exists():
    cached = _load_cached(path, dtype)
    if cached is not None:
      logging.info("reusing cached tokens %s", path)
      return cached
  tokens = _tokenize(files, tokenizer)
  _save_atomic(path, tokens)
  logging.info(
      "tokenized %d files (%d tokens) -> %s", len(files), tokens.size, path
  )
  return np.load(path, mmap_mode="r")


def _load_cached(path: pathlib.Path, dtype: np.dtype) -> np.ndarray | None:
  """The cached 1-D `dtype` tokens at `path`, or None (with a warning) if it is damaged."""
  # The cache is derived data: a file cut short (full disk, killed copy, a writer older than
  # _save_atomic) or overwritten is rebuilt rather than ending the run.
  try:
    tokens = np.load(path, mmap_mode="r")
    if tokens.dtype != dtype or tokens.ndim != 1:
      raise ValueError(f"holds {tokens.dtype} of shape {tokens.shape}, not 1-D {dtype}")
  except (ValueError, EOFError) as e:
    logging.warning("token cache %s is damaged (%s); tokenizing again", path,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
    return None
  return tokens
