"""Prepared datasets (moex.data.prepare; format: moex.data.records) for training: packed
rows, mixtures, token shares.

Letters: B = batch per process, G = global batch, L = sequence length (rows hold L + 1).

A split's shards are read through grain's ArrayRecordDataSource (local, or gs:// through
ArrayRecord's own file system), one record per document. Training: the documents of each
source are shuffled globally by seed (a new permutation every epoch), then packed by grain's
ConcatThenSplitIterDataset into rows of L + 1 tokens with "segment_ids" (1, 2, ... per
document piece in a row) and "positions" (0 at each piece's first token): documents run back
to back, a document that does not fit is split and continues at the next row's start (its
second piece starts at position 0 again), so an endless stream never pads. Rows of several
sources are then interleaved by grain's IterDataset.mix in the exact proportions of the
weights: every row is full, so the weights are the token shares. Every process builds the same
global batch and keeps its rows (as moex.data.pipeline does); `SourceTokens`, the outermost
iterator, counts the real tokens of each source in the global batches it has delivered, and
that count is part of its checkpointed state.

Opening a dataset checks its manifest against the shards (each present, at the size the
manifest records) and refuses in one line naming the first that is not; a record that cannot
be read later (damaged bytes) is refused naming its shard and its index there.

Evaluation: the val split of each source, unshuffled, packed the same way and mixed with the
same weights; the last row of a finite stream is padded (segment id 0, token 0).
"""

from __future__ import annotations

import dataclasses
import os

import grain
from grain import experimental as grain_experimental
import numpy as np
from etils import epath

from moex.data import records
from moex.data import tokenizer as tokenizer_lib

# Records are read with a few threads ahead of the packer (documents are small and many).
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)
BATCH_KEYS = ("tokens", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One prepared dataset: its directory and manifest."""

  directory: str
  manifest: dict

  def shards(self, split: str) -> list[str]:
    """Paths of the split's non-empty shards, in order."""
    return [str(epath.Path(self.directory) / s["name"]) for s in self.manifest["shards"]
            if s["split"] == split and s["documents"] > 0]

  def tokens(self, split: str) -> int:
    return sum(s["tokens"] for s in self.manifest["shards"] if s["split"] == split)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.manifest["id_dtype"])


def open_prepared(directory: str) -> Prepared:
  """Reads DIR/manifest.json and checks it and the shards; a ShardError (a ValueError) names
  data.prepared and the file in one line."""
  directory = os.path.expanduser(directory.strip())
  path = epath.Path(directory) / records.MANIFEST
  try:
    manifest = records.read_manifest(epath.Path(directory))
  except (OSError, ValueError) as e:
    raise records.ShardError(f"data.prepared: could not read {path}: {e}") from None
  if manifest is None:
    raise records.ShardError(f"data.prepared: {path} not found; make it with python -m "
                             f"moex.data.prepare --output={directory} ...")
  if manifest.get("format") != records.FORMAT:
    raise records.ShardError(f"data.prepared: {path} is format {manifest.get('format')!r}, "
                             f"not {records.FORMAT!r}")
  if not manifest.get("complete"):
    raise records.ShardError(f"data.prepared: {directory} is not finished (manifest.json has "
                             f"complete=false); re-run its moex.data.prepare command")
  records.check_shards(directory, manifest)
  return Prepared(directory, manifest)


def check_tokenizer(prepared: Prepared, tok: tokenizer_lib.Tokenizer) -> None:
  """One line when the dataset was tokenized by another tokenizer than data.tokenizer."""
  theirs, ours = prepared.manifest["tokenizer"], records.tokenizer_identity(tok)
  if theirs != ours:
    differ = ", ".join(k for k in sorted(ours) if theirs.get(k) != ours[k])
    raise ValueError(f"data.tokenizer: {tok.name} ({tok.vocab_size} ids) is not the tokenizer "
                     f"{prepared.directory} was prepared with ({theirs.get('name')}, "
                     f"{theirs.get('vocab_size')} ids; {differ} differ); set data.tokenizer "
                     f"to that one or prepare again")


class _Decode:
  """An ArrayRecord record (one document's ids) -> {"tokens": int32 [n]}."""

  def __init__(self, dtype: np.dtype):
    self.dtype = records.record_dtype(dtype)

  def __call__(self, record: bytes) -> dict[str, np.ndarray]:
    return {"tokens": records.decode(record, self.dtype)}


class _NamedShards:
  """grain's ArrayRecordDataSource over a split's shards, whose read errors name the shard
  and the record (the reader's own say only a byte offset)."""

  def __init__(self, paths: list[str], counts: list[int]):
    self.source = grain.sources.ArrayRecordDataSource(paths)
    self.paths, self.counts = paths, counts
    self.starts = np.cumsum([0] + counts)
    if self.starts[-1] != len(self.source):
      raise records.ShardError(f"data.prepared: {os.path.dirname(paths[0])}: the shards hold "
                               f"{len(self.source)} records, {records.MANIFEST} lists "
                               f"{self.starts[-1]}; re-run its moex.data.prepare command")

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> bytes:
    try:
      return self.source[index]
    except (RuntimeError, OSError, ValueError) as e:  # riegeli raises RuntimeError
      shard = int(np.searchsorted(self.starts, index, side="right")) - 1
      reason = (str(e).splitlines() or [type(e).__name__])[0]
      raise records.ShardError(
          f"data.prepared: {self.paths[shard]}: record {index - self.starts[shard]} of "
          f"{self.counts[shard]} is unreadable ({reason}); re-prepare it (delete the shard "
          f"and re-run its moex.data.prepare command)") from None

  def __repr__(self) -> str:  # grain logs its sources by repr
    return f"_NamedShards({self.paths!r})"


class _Row:
  """grain's packed names -> the batch contract's, plus the row's source index."""

  def __init__(self, source: int):
    self.source = np.int32(source)

  def __call__(self, row: dict) -> dict[str, np.ndarray]:
    return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
            "positions": row["tokens_positions"], "source": self.source}


def documents(prepared: Prepared, split: str) -> grain.MapDataset:
  """The split's documents as a MapDataset of {"tokens": int32 [n]}."""
  paths = prepared.shards(split)
  if not paths:
    raise ValueError(f"data.prepared: {prepared.directory} has no {split} documents"
                     + (" (prepared with --val_fraction=0?)" if split == "val" else ""))
  counts = [s["documents"] for s in prepared.manifest["shards"]
            if s["split"] == split and s["documents"] > 0]
  source = _NamedShards(paths, counts)
  return grain.MapDataset.source(source).map(_Decode(prepared.dtype))


def _seed(seed: int, source: int) -> int:
  """A shuffle seed per (config seed, source)."""
  return int(np.random.SeedSequence([seed, source]).generate_state(1)[0])


def packed_rows(docs: grain.MapDataset, seq_len: int, source: int = 0,
                seed: int | None = None) -> grain.IterDataset:
  """Rows of seq_len + 1 tokens with segment_ids and positions (the module docstring).

  With `seed`, the documents are shuffled and repeated without end; without, read once in
  order (the last row padded).
  """
  if seed is not None:
    docs = docs.shuffle(seed=_seed(seed, source)).repeat()
  rows = grain_experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(_READ_OPTIONS), length_struct={"tokens": seq_len + 1})
  return rows.map(_Row(source))


class SourceTokens(grain.DatasetIterator):
  """This process's rows of each global batch; counts each source's real tokens.

  `tokens()` is the count over every global batch delivered so far (inputs only, padding
  excluded), saved and restored with the iterator's position.
  """

  def __init__(self, parent: grain.DatasetIterator, names: tuple[str, ...], start: int,
               stop: int):
    super().__init__(parent)
    self.names, self.start, self.stop = names, start, stop
    self.counts = np.zeros(len(names), np.int64)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    real = (batch["segment_ids"][:, :-1] != 0).sum(axis=1)
    np.add.at(self.counts, batch["source"], real)
    return {k: batch[k][self.start:self.stop] for k in BATCH_KEYS}

  def tokens(self) -> dict[str, int]:
    return {n: int(c) for n, c in zip(self.names, self.counts)}

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "source_tokens": self.counts.tolist()}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.counts = np.asarray(state["source_tokens"], np.int64)


def _mixed(rows: list[grain.IterDataset], weights: tuple[float, ...]) -> grain.IterDataset:
  return rows[0] if len(rows) == 1 else grain.IterDataset.mix(rows, list(weights))


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"data: process_index {process_index} not in [0, {process_count})")


def train_iterator(prepared: list[Prepared], weights: tuple[float, ...], seq_len: int,
                   batch_per_process: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> SourceTokens:
  """Endless, checkpointable iterator of this process's {"tokens", "segment_ids",
  "positions"}: int32 [B, L + 1] each, the same global batches at any process count."""
  _check_process(process_index, process_count)
  rows = [packed_rows(documents(p, "train"), seq_len, i, seed) for i, p in enumerate(prepared)]
  global_batch = batch_per_process * process_count
  batches = _mixed(rows, weights).batch(global_batch, drop_remainder=True)
  start = process_index * batch_per_process
  return SourceTokens(iter(batches), tuple(p.directory for p in prepared), start,
                      start + batch_per_process)


def eval_batches(prepared: list[Prepared], weights: tuple[float, ...], seq_len: int,
                 batch_per_process: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """This process's rows of the first `num_batches` global batches of the val splits, mixed
  (fewer when the splits hold fewer)."""
  _check_process(process_index, process_count)
  rows = [packed_rows(documents(p, "val"), seq_len, i) for i, p in enumerate(prepared)]
  global_batch = batch_per_process * process_count
  start = process_index * batch_per_process
  it = iter(_mixed(rows, weights).batch(global_batch, drop_remainder=True))
  batches = []
  for batch in it:
    batches.append({k: batch[k][start:start + batch_per_process] for k in BATCH_KEYS})
    if len(batches) == num_batches:
      break
  if not batches:
    dirs = ", ".join(p.directory for p in prepared)
    raise ValueError(f"data.batch_size: {global_batch} rows per batch but the val split of "
                     f"{dirs} holds less than one batch of {seq_len + 1} tokens; prepare with "
                     f"a larger --val_fraction or lower the batch size")
  return batches
