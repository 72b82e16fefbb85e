"""Preparing a corpus once: documents -> token ids -> ArrayRecord shards and a manifest.

The library of `python -m moex.data.prepare` (the command module holds only its flags);
the shard and manifest format is moex.data.records. Inputs and output go through
etils.epath (local or gs://). Documents: a plain-text file is one document; a JSON Lines
file (.jsonl, .json, .ndjson) one per line, its `text_field`; a Parquet file one per row,
its `text_field` column (pyarrow); `.gz` text and JSON Lines are read decompressed. Each
document becomes one record (records.encode) with the BOS/EOS the tokenizer has around it
(as the token cache packs them). A document goes to the held-out split when a hash of its
text falls below val_fraction, so the split depends on the text only (a duplicate lands on
the same side).

Work is planned before anything is read: the sorted input files are grouped, in order, into
units of about shard_mb MB of input (a larger file is a unit alone), and unit u writes
`train-UUUUU-of-NNNNN.arrayrecord` and `val-UUUUU-of-NNNNN.arrayrecord`. Units are tokenized
in parallel worker processes; the shards depend only on the inputs, the tokenizer and the
options, never on the worker count or timing (same inputs -> byte-identical output).

Resumable: a shard is written under a temporary name (`NAME.partial-PID`) and renamed when
complete (a GCS object appears only when whole); a unit's entry goes into manifest.json only
after both its shards exist. Re-running the same preparation skips the units whose shards
the manifest lists and the directory holds at the recorded size (so a deleted or truncated
shard is rewritten), and removes leftover partial files. manifest.json holds "complete":
true only at the end; the reader (moex.data.shards) refuses a preparation that is not
complete.

Bad data is counted, not fatal: an unreadable file, an invalid UTF-8 document, a malformed
JSON line or a missing/non-string field is skipped with a warning naming FILE:LINE and counted
in its shard's manifest entry. The run is refused (PrepareError, one line) only when errors
exceed max_error_fraction of the documents seen (documents + errors).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence

from absl import logging
from etils import epath
import numpy as np

from moex import errors
from moex.data import records
from moex.data import sources
from moex.data import tokenizer as tokenizer_lib

SPLITS = records.SPLITS
_GLOB_CHARS = frozenset("*?[")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_CHUNK_BYTES = 8 << 20  # Text per encode_batch call.
_PROGRESS_SECONDS = 10.0
_WARNINGS_PER_UNIT = 10  # Warnings a unit reports by FILE:LINE; the rest are counted.
# Test hook: "UNIT:DOCS" makes the worker of UNIT kill itself (SIGKILL) after writing DOCS
# documents, mid-shard, to test resuming after a killed run.
KILL_ENV = "MOEX_PREPARE_KILL_AT"


class PrepareError(errors.Refusal):
  """A preparation that cannot go on; the one-line message names the flag or file."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What the shards depend on besides the input files (all but --workers)."""

  tokenizer: str
  format: str = "auto"
  text_field: str = "text"
  val_fraction: float = 0.01
  shard_mb: float = 256.0
  max_error_fraction: float = 0.01


@dataclasses.dataclass(frozen=True)
class _Unit:
  """One worker task: consecutive input files -> one train and one val shard."""

  index: int
  files: tuple[str, ...]
  sizes: tuple[int, ...]  # bytes of each file, for the progress line
  names: tuple[str, str]  # train shard, val shard
  output: str
  options: Options


# ---------------------------------------------------------------------------------------
# Inputs and the plan.


def _expand(pattern: str) -> list[epath.Path]:
  """Files named by one path or glob (local: '**' recursive; remote: '*' only)."""
  pattern = os.path.expanduser(pattern)
  if _GLOB_CHARS.isdisjoint(pattern):
    path = epath.Path(pattern)
    if path.is_dir():
      raise PrepareError(f"--inputs: {path} is a directory; name files or a glob such as "
                         f"'{path}/*.jsonl'")
    if not path.exists():
      raise PrepareError(f"--inputs: file not found: {path}")
    return [path]
  if records.is_local(pattern):
    return [epath.Path(p) for p in glob.glob(pattern, recursive=True)
            if os.path.isfile(p)]
  parts = pattern.split("/")
  first = next(i for i, p in enumerate(parts) if not _GLOB_CHARS.isdisjoint(p))
  root = "/".join(parts[:first])
  try:
    return [p for p in epath.Path(root).glob("/".join(parts[first:])) if p.is_file()]
  except NotImplementedError as e:  # '**' on a remote store
    raise PrepareError(f"--inputs: {pattern}: {e}") from None


def resolve_inputs(spec: str) -> list[epath.Path]:
  """The sorted, deduplicated files named by comma-separated paths / globs."""
  files = {}
  for part in spec.split(","):
    if part.strip():
      for f in _expand(part.strip()):
        files[str(f)] = f
  if not files:
    raise PrepareError(f"--inputs: no files match {spec!r}")
  return [files[k] for k in sorted(files)]


def plan_units(sizes: Sequence[int], shard_bytes: float) -> list[list[int]]:
  """Consecutive file indices grouped into units of about `shard_bytes` (at least one file)."""
  units, unit, total = [], [], 0
  for i, size in enumerate(sizes):
    if unit and total + size > shard_bytes:
      units.append(unit)
      unit, total = [], 0
    unit.append(i)
    total += size
  if unit:
    units.append(unit)
  return units


# ---------------------------------------------------------------------------------------
# Documents of one file: (line, text or None, error or None).


def _format_of(path: str, fmt: str) -> str:
  if fmt != "auto":
    return fmt
  name = path.removesuffix(".gz")
  if name.endswith(_JSONL_SUFFIXES):
    return "jsonl"
  return "parquet" if name.endswith(".parquet") else "text"


def _raw(path: str) -> bytes:
  data = epath.Path(path).read_bytes()
  return gzip.decompress(data) if path.endswith(".gz") else data


def _text_docs(path: str, field: str) -> Iterator[tuple[int, str | None, str | None]]:
  del field
  try:
    yield 1, _raw(path).decode("utf-8"), None
  except UnicodeDecodeError as e:
    yield 1, None, f"invalid UTF-8 at byte {e.start}"


def _jsonl_doc(line: bytes, field: str) -> tuple[str | None, str | None]:
  """(text, None), (None, None) for a blank line, or (None, the reason it is skipped)."""
  if not line.strip():
    return None, None
  try:
    record = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    return None, f"invalid UTF-8 at byte {e.start} of the line"
  except ValueError as e:
    return None, f"malformed JSON: {str(e).splitlines()[0]}"
  if not isinstance(record, dict) or field not in record:
    return None, f"no field {field!r}"
  if not isinstance(record[field], str):
    return None, f"field {field!r} is {type(record[field]).__name__}, not a string"
  return record[field], None


def _jsonl_docs(path: str, field: str) -> Iterator[tuple[int, str | None, str | None]]:
  for number, line in enumerate(io.BytesIO(_raw(path)), start=1):
    text, error = _jsonl_doc(line, field)
    if text is not None or error is not None:
      yield number, text, error


def _parquet_docs(path: str, field: str) -> Iterator[tuple[int, str | None, str | None]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (only for parquet)
  with epath.Path(path).open("rb") as f:
    table = pq.ParquetFile(f)
    if field not in table.schema_arrow.names:
      yield 0, None, f"no column {field!r} (columns: {', '.join(table.schema_arrow.names)})"
      return
    row = 0
    for batch in table.iter_batches(columns=[field]):
      for value in batch.column(0).to_pylist():
        row += 1
        if isinstance(value, str):
          yield row, value, None
        else:
          yield row, None, f"column {field!r} is {type(value).__name__}, not a string"


_READERS = {"text": _text_docs, "jsonl": _jsonl_docs, "parquet": _parquet_docs}


def _checked(text: str) -> tuple[bytes | None, str | None]:
  """The UTF-8 bytes of a document, or the reason it is not valid text (lone surrogates)."""
  try:
    return text.encode("utf-8"), None
  except UnicodeEncodeError as e:
    return None, f"invalid UTF-8 (unpaired surrogate at character {e.start})"


def documents(path: str, options: Options) -> Iterator[tuple[str, bytes | None, str | None]]:
  """(where, UTF-8 text, None) per document of `path`, or (where, None, why it is skipped).

  `where` is FILE:LINE (JSON Lines), FILE:ROW (Parquet) or FILE; an unreadable file is one
  error.
  """
  fmt = _format_of(path, options.format)
  try:
    for line, text, error in _READERS[fmt](path, options.text_field):
      where = f"{path}:{line}" if line else path
      if error is None:
        data, error = _checked(text)
        if error is None:
          if data:  # empty documents carry nothing to learn: skipped, not errors
            yield where, data, None
          continue
      yield where, None, error
  except (OSError, EOFError, ValueError) as e:  # unreadable, truncated gzip, bad parquet
    yield path, None, f"unreadable: {(str(e).splitlines() or [type(e).__name__])[0]}"


def is_val(text: bytes, val_fraction: float) -> bool:
  """Whether a document is held out: a stable hash of its text below val_fraction."""
  value = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
  return value < val_fraction * 2.0**64


# ---------------------------------------------------------------------------------------
# One unit (runs in a worker process).

_counters = None  # [documents, tokens, input bytes read] shared with the main process


def _init_worker(counters) -> None:
  global _counters
  _counters = counters
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles ^C


def _count(docs: int, tokens: int, nbytes: int) -> None:
  if _counters is not None:
    with _counters.get_lock():
      _counters[0] += docs
      _counters[1] += tokens
      _counters[2] += nbytes


def _kill_point(unit: int) -> int | None:
  spec = os.environ.get(KILL_ENV, "")
  if ":" in spec and int(spec.split(":")[0]) == unit:
    return int(spec.split(":")[1])
  return None


class _ShardWriter:
  """An ArrayRecord shard written under a temporary name and published when complete."""

  def __init__(self, output: str, name: str):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.dest = epath.Path(output) / name
    self.remote = not records.is_local(output)
    tmp_dir = tempfile.mkdtemp(prefix="moex-prepare-") if self.remote else output
    self.tmp = os.path.join(tmp_dir, f"{name}.partial-{os.getpid()}")
    self.writer = array_record_module.ArrayRecordWriter(self.tmp, records.WRITER_OPTIONS)
    self.documents = self.tokens = self.text_bytes = 0

  def write(self, ids: np.ndarray, text_bytes: int) -> None:
    self.writer.write(records.encode(ids))
    self.documents += 1
    self.tokens += int(ids.size)
    self.text_bytes += text_bytes

  def publish(self) -> int:
    """Closes and renames (or uploads) the shard; returns its size in bytes."""
    self.writer.close()
    size = os.path.getsize(self.tmp)
    if self.remote:
      with open(self.tmp, "rb") as src, self.dest.open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
      shutil.rmtree(os.path.dirname(self.tmp))
    else:
      os.replace(self.tmp, self.dest)
    return size


@functools.cache
def _tokenizer(spec: str) -> tokenizer_lib.Tokenizer:
  """The tokenizer of --tokenizer, loaded once per worker process."""
  return tokenizer_lib.get_tokenizer(spec)


class _UnitRun:
  """Documents of one unit, tokenized a chunk at a time into its train and val shards."""

  def __init__(self, unit: _Unit):
    self.tok = _tokenizer(unit.options.tokenizer)
    self.bos, self.eos = sources._separators(  # pylint: disable=protected-access
        self.tok, tokenizer_lib.id_dtype(self.tok.vocab_size))
    self.writers = [_ShardWriter(unit.output, name) for name in unit.names]
    self.kill_at = _kill_point(unit.index)
    self.pending: list[tuple[bytes, int]] = []  # (text, 0 train / 1 val)
    self.pending_bytes = 0

  def add(self, text: bytes, val: bool) -> None:
    self.pending.append((text, int(val)))
    self.pending_bytes += len(text)
    if self.pending_bytes >= _CHUNK_BYTES:
      self.flush()

  def flush(self) -> None:
    texts = [t for t, _ in self.pending]
    tokens = 0
    for ids, (text, side) in zip(self.tok.encode_batch(texts), self.pending):
      ids = np.concatenate([self.bos, ids.astype(self.bos.dtype, copy=False), self.eos])
      self.writers[side].write(ids, len(text))
      tokens += ids.size
      if self.kill_at is not None and sum(w.documents for w in self.writers) >= self.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    _count(len(texts), tokens, 0)
    self.pending.clear()
    self.pending_bytes = 0


def run_unit(unit: _Unit) -> dict:
  """Tokenizes one unit's files into its two shards; returns their manifest entries.

  Skipped documents are counted on the unit's train shard (the split of a document that
  cannot be read is unknown).
  """
  run = _UnitRun(unit)
  errors, warnings = 0, []
  for path, size in zip(unit.files, unit.sizes):
    for where, text, error in documents(path, unit.options):
      if error is None:
        run.add(text, is_val(text, unit.options.val_fraction))
        continue
      errors += 1
      if len(warnings) < _WARNINGS_PER_UNIT:
        warnings.append(f"{where}: {error}")
    _count(0, 0, size)
  run.flush()
  entries = []
  for split, writer in zip(SPLITS, run.writers):
    nbytes = writer.publish()
    entries.append({"name": writer.dest.name, "split": split, "unit": unit.index,
                    "documents": writer.documents, "tokens": writer.tokens,
                    "text_bytes": writer.text_bytes, "file_bytes": nbytes,
                    "errors": errors if split == "train" else 0})
  return {"unit": unit.index, "shards": entries, "warnings": warnings,
          "unreported_warnings": errors - len(warnings)}


# ---------------------------------------------------------------------------------------
# The whole run (main process).


def _plan(files: list[epath.Path], options: Options, tok) -> dict:
  """The manifest's header: everything the shards depend on."""
  sizes = [int(f.stat().length) for f in files]
  return {"format": records.FORMAT, "tokenizer": records.tokenizer_identity(tok),
          "id_dtype": tokenizer_lib.id_dtype(tok.vocab_size).name,
          "options": {"format": options.format, "text_field": options.text_field,
                      "val_fraction": options.val_fraction, "shard_mb": options.shard_mb},
          "inputs": [[str(f), s] for f, s in zip(files, sizes)]}


def _totals(shards: Sequence[dict]) -> dict:
  keys = ("documents", "tokens", "text_bytes", "errors", "file_bytes")
  totals = {s: {k: 0 for k in keys} for s in SPLITS}
  for shard in shards:
    for k in keys:
      totals[shard["split"]][k] += shard[k]
  return totals


def _finished_shards(out: epath.Path, manifest: dict | None) -> list[dict]:
  """The entries of units whose two shards the manifest lists and the directory holds, at
  the size the manifest records."""
  entries = [s for s in (manifest or {}).get("shards", [])
             if records.shard_problem(out, s) is None]
  whole = {u for u in {s["unit"] for s in entries}
           if sum(s["unit"] == u for s in entries) == len(SPLITS)}
  return [s for s in entries if s["unit"] in whole]


def _remove_partials(output: epath.Path) -> None:
  for leftover in output.glob("*.partial-*"):
    leftover.unlink()
    logging.warning("prepare: removed %s, left by a run that did not finish", leftover)


class _Progress:
  """Logs documents, tokens, MB/s and time left every _PROGRESS_SECONDS."""

  def __init__(self, counters, total_bytes: int, done_bytes: int):
    self.counters, self.total, self.done = counters, total_bytes, done_bytes
    self.start = self.last = time.monotonic()

  def maybe_log(self, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self.last < _PROGRESS_SECONDS:
      return
    self.last = now
    docs, tokens, nbytes = list(self.counters)
    rate = nbytes / max(now - self.start, 1e-9)
    left = max(self.total - self.done - nbytes, 0) / max(rate, 1e-9)
    logging.info("prepare: %d documents, %d tokens, %.1f/%.1f MB of input, %.1f MB/s, about "
                 "%.0f s left", docs, tokens, (self.done + nbytes) / 1e6, self.total / 1e6,
                 rate / 1e6, left if nbytes else float("nan"))


def _run_units(todo: list[_Unit], workers: int, counters, on_done) -> None:
  """Runs every unit (in `workers` processes, or here when 0), calling on_done(result)."""
  if workers == 0:
    _init_worker(counters)
    try:
      for unit in todo:
        on_done(run_unit(unit))
    finally:
      _init_worker(None)
    return
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=ctx, initializer=_init_worker, initargs=(counters,)) as pool:
    pending = {pool.submit(run_unit, unit): unit.index for unit in todo}
    broken = False
    while pending and not broken:
      done, _ = concurrent.futures.wait(pending, timeout=0.5,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
      for future in sorted(done, key=pending.get):  # every finished unit is recorded first
        del pending[future]
        if isinstance(future.exception(), concurrent.futures.process.BrokenProcessPool):
          broken = True
        else:
          on_done(future.result())
      on_done(None)
    if broken:
      for future in pending:
        future.cancel()
      raise PrepareError("a worker process died (killed, or out of memory); the "
                         "finished shards are kept: re-run the same command to resume")


def _output_dir(output: str) -> epath.Path:
  """The output directory, created; a file there (or above it) is refused in one line."""
  out = epath.Path(os.path.expanduser(output))
  if out.exists() and not out.is_dir():
    raise PrepareError(f"--output={out}: is a file, not a directory")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a file above it, no permission, a read-only disk
    raise PrepareError(f"--output={out}: cannot create it: "
                       f"{e.strerror or type(e).__name__}") from None
  return out


def _load_tokenizer(spec: str) -> tokenizer_lib.Tokenizer:
  try:
    return tokenizer_lib.get_tokenizer(spec)
  except ValueError as e:  # the tokenizer's one line names data.tokenizer: here it is a flag
    raise PrepareError(str(e).replace("data.tokenizer", "--tokenizer")) from None


def prepare_shards(inputs: str, output: str, options: Options, workers: int = 0) -> dict:
  """Prepares `inputs` into `output` (see the module docstring); returns the manifest."""
  tok = _load_tokenizer(options.tokenizer)
  files = resolve_inputs(inputs)
  out = _output_dir(output)
  plan = _plan(files, options, tok)
  units = plan_units([s for _, s in plan["inputs"]], options.shard_mb * 1e6)
  old = records.read_manifest(out)
  if old is not None and {k: old.get(k) for k in plan} != plan:
    changed = sorted(k for k in plan if old.get(k) != plan[k])
    raise PrepareError(f"--output={out}: holds a preparation of other inputs or options "
                       f"({', '.join(changed)} differ); use a new directory")
  shards = _finished_shards(out, old)
  finished = {s["unit"] for s in shards}
  _remove_partials(out)
  sizes = [s for _, s in plan["inputs"]]
  todo = [_Unit(u, tuple(str(files[i]) for i in unit), tuple(sizes[i] for i in unit),
                tuple(records.shard_name(split, u, len(units)) for split in SPLITS), str(out),
                options)
          for u, unit in enumerate(units) if u not in finished]
  if finished:
    logging.info("prepare: resuming: %d of %d units already written", len(finished),
                 len(units))
  done_bytes = sum(sizes[i] for u in finished for i in units[u])
  counters = multiprocessing.get_context("spawn").Array("q", 3)
  progress = _Progress(counters, sum(sizes), done_bytes)

  def on_done(result):
    if result is not None:
      for warning in result["warnings"]:
        logging.warning("prepare: skipped %s", warning)
      if result["unreported_warnings"]:
        logging.warning("prepare: unit %d skipped %d more documents", result["unit"],
                        result["unreported_warnings"])
      shards.extend(result["shards"])
      shards.sort(key=lambda s: (s["unit"], SPLITS.index(s["split"])))
      records.write_manifest(out, {**plan, "complete": False, "shards": shards})
    progress.maybe_log()

  _run_units(todo, workers, counters, on_done)
  progress.maybe_log(force=True)
  return _finish(out, plan, shards, options)


def _finish(out: epath.Path, plan: dict, shards: list[dict], options: Options) -> dict:
  """Checks the error fraction; writes the complete manifest."""
  totals = _totals(shards)
  errors = sum(t["errors"] for t in totals.values())
  seen = errors + sum(t["documents"] for t in totals.values())
  fraction = errors / max(seen, 1)
  if seen == errors == 0:
    raise PrepareError(f"--inputs: no documents in {len(plan['inputs'])} files (all empty)")
  if fraction > options.max_error_fraction or seen == errors:
    raise PrepareError(
        f"--max_error_fraction: {errors} of {seen} documents were skipped ({fraction:.2%} > "
        f"{options.max_error_fraction:.2%}); see the warnings above (check --format and "
        f"--text_field); {out / records.MANIFEST} counts them per shard and stays incomplete")
  manifest = {**plan, "complete": True, "shards": shards, "totals": totals}
  records.write_manifest(out, manifest)
  logging.info("prepare: %s: %s", out, ", ".join(
      f"{s} {t['documents']} documents / {t['tokens']} tokens" for s, t in totals.items()) +
      f", {errors} skipped")
  return manifest
