"""Packed next-token windows, grain iterators, and their checkpoint args.

With config data.prepared the data come from prepared shards instead (moex/data/shards.py:
documents packed with segment ids and positions, mixtures); `build` chooses.

Letters: B = batch per process, L = sequence length (windows hold L + 1 tokens,
the extra one being the last target).

How the trainer checkpoints the train iterator next to its state, in one orbax
manager (the grain handler is found through the args types, so `item_handlers`
is optional; passing it makes restoring without a prior save explicit):

  mngr = ocp.CheckpointManager(
      workdir, options=ocp.CheckpointManagerOptions(...),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": pipeline.data_checkpoint_handler()})
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=pipeline.data_save_args(data.train_iter)))
  ...
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=pipeline.data_restore_args(data.train_iter)))
  # data.train_iter now continues from the saved position (it is restored in
  # place; restored["data"] is the same object).

The iterator position is read synchronously inside `mngr.save`, so it is safe to
keep calling next() while an async save is in flight. Each process writes its
own `data/process_{i}-of-{n}.json`; restoring needs the same process count.
"""

import dataclasses

from absl import logging
import grain
import numpy as np

from moex import config as config_lib
from moex.data import shards
from moex.data import sources
from moex.data import tokenizer as tokenizer_lib

# Tokens live in memory (mmap), so a couple of threads and a short buffer keep
# the host ahead of the device without holding hundreds of batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


class PackedWindows:
  """Random-access source of overlapping-by-one windows over a token stream.

  Window i is tokens[i*L : i*L + L + 1]: inputs are [:-1], targets [1:].
  Documents are packed back to back; BOS/EOS mark their boundaries.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int):
    if tokens.ndim != 1:
      raise ValueError(f"PackedWindows: tokens must be 1-D, got {tokens.shape}")
    if seq_len < 1:
      raise ValueError(f"PackedWindows: seq_len must be >= 1, got {seq_len}")
    self.tokens = tokens
    self.seq_len = seq_len

  def __len__(self) -> int:
    return max(0, (self.tokens.shape[0] - 1) // self.seq_len)

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"PackedWindows: index {index} out of range {len(self)}")
    start = index * self.seq_len
    return np.asarray(self.tokens[start : start + self.seq_len + 1], np.int32)

  def __repr__(self) -> str:
    return f"PackedWindows(tokens={self.tokens.shape[0]}, seq_len={self.seq_len})"


def _as_example(tokens_BxL1: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": tokens_BxL1}


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"data: process_index {process_index} not in [0, {process_count})"
    )


class _ProcessRows:
  """This process's rows of a global batch (module-level: grain may pickle it)."""

  def __init__(self, process_index: int, batch_per_process: int):
    self.start = process_index * batch_per_process
    self.stop = self.start + batch_per_process

  def __call__(self, global_batch: np.ndarray) -> np.ndarray:
    return global_batch[self.start : self.stop]


def train_iterator(
    tokens: np.ndarray,
    seq_len: int,
    batch_per_process: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
  """Endless, checkpointable iterator of {"tokens": int32 [B, L + 1]}.

  Every process walks the same shuffled sequence of global batches and keeps its own
  rows, so the global batch at each step is the same whatever the process count (a
  2-process run sees exactly the data of a 1-process run).
  """
  _check_process(process_index, process_count)
  windows = grain.MapDataset.source(PackedWindows(tokens, seq_len))
  global_batch = batch_per_process * process_count
  if len(windows) < global_batch:
    raise ValueError(
        f"data.batch_size: {global_batch} sequences per batch but the train split"
        f" holds only {len(windows)} windows of {seq_len + 1} tokens"
        f" ({tokens.shape[0]} tokens)"
    )
  # shuffle before repeat: repeat reseeds the shuffle each epoch. The other
  # order shuffles indices of an infinite range and is not a per-epoch
  # permutation.
  ds = (
      windows.shuffle(seed=seed)
      .repeat()
      .batch(global_batch, drop_remainder=True)
      .map(_ProcessRows(process_index, batch_per_process))
      .map(_as_example)
  )
  return iter(ds.to_iter_dataset(_READ_OPTIONS))


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_per_process: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """This process's rows of the first `num_batches` unshuffled global batches."""
  _check_process(process_index, process_count)
  windows = PackedWindows(tokens, seq_len)
  global_batch = batch_per_process * process_count
  available = len(windows) // global_batch
  if available < 1:
    raise ValueError(
        f"data.batch_size: {global_batch} sequences per batch but the"
        f" validation split holds only {len(windows)} windows of {seq_len + 1}"
        f" tokens; raise data.val_fraction or lower the batch size"
    )
  if num_batches > available:
    logging.warning(
        "data.eval_batches: %d requested, validation holds %d; using %d",
        num_batches, available, available,
    )
    num_batches = available
  rows = _ProcessRows(process_index, batch_per_process)
  batches = []
  for b in range(num_batches):
    first = b * global_batch + rows.start
    batches.append(_as_example(np.stack(
        [windows[i] for i in range(first, first + batch_per_process)])))
  return batches


@dataclasses.dataclass
class Data:
  """Everything the trainer needs from the data side."""

  train_iter: grain.DatasetIterator
  eval_batches: list[dict[str, np.ndarray]]
  tokenizer: tokenizer_lib.Tokenizer
  train_tokens: int
  val_tokens: int

  def log_fields(self) -> dict:
    """For a train line: each prepared source's tokens delivered so far and their shares."""
    if not isinstance(self.train_iter, shards.SourceTokens):
      return {}
    tokens = self.train_iter.tokens()
    total = max(sum(tokens.values()), 1)
    return {"source_tokens": tokens,
            "source_token_share": {k: v / total for k, v in tokens.items()}}


def build(
    cfg: config_lib.DataConfig,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Data:
  """Resolves, splits, tokenizes (cached) and wraps config.data for training.

  `cfg` is validated (moex.config.validate) and its batch divides over the processes
  (moex.parallel.mesh.check_layout); what is left to fail here are facts of the data.
  """
  batch_per_process = cfg.batch_size // process_count
  tok = tokenizer_lib.get_tokenizer(cfg.tokenizer)
  if cfg.prepared_dirs:
    return _build_prepared(cfg, tok, seed, process_index, process_count)
  files = sources.resolve_files(cfg.source)
  train_files, val_files = sources.split_files(files, cfg.val_fraction)
  logging.info(
      "data: %d files from %r -> %d train, %d validation",
      len(files), cfg.source, len(train_files), len(val_files),
  )
  train_tokens = sources.tokenized_array(train_files, tok, cfg.cache_dir, "train")
  val_tokens = sources.tokenized_array(val_files, tok, cfg.cache_dir, "val")
  return Data(
      train_iter=train_iterator(
          train_tokens, cfg.seq_len, batch_per_process, seed,
          process_index, process_count,
      ),
      eval_batches=eval_batches(
          val_tokens, cfg.seq_len, batch_per_process, cfg.eval_batches,
          process_index, process_count,
      ),
      tokenizer=tok,
      train_tokens=int(train_tokens.shape[0]),
      val_tokens=int(val_tokens.shape[0]),
  )


def _build_prepared(cfg: config_lib.DataConfig, tok: tokenizer_lib.Tokenizer, seed: int,
                    process_index: int, process_count: int) -> Data:
  """Data from prepared shards (config data.prepared), checked against data.tokenizer."""
  prepared = [shards.open_prepared(d) for d in cfg.prepared_dirs]
  for p in prepared:
    shards.check_tokenizer(p, tok)
  batch_per_process = cfg.batch_size // process_count
  logging.info("data: prepared %s", ", ".join(
      f"{p.directory} ({p.tokens('train')} train / {p.tokens('val')} val tokens, weight "
      f"{w:.3g})" for p, w in zip(prepared, cfg.weights)))
  evals = shards.eval_batches(prepared, cfg.weights, cfg.seq_len, batch_per_process,
                              cfg.eval_batches, process_index, process_count)
  if len(evals) < cfg.eval_batches:
    logging.warning("data.eval_batches: %d requested, the prepared validation splits hold %d; "
                    "using %d", cfg.eval_batches, len(evals), len(evals))
  return Data(
      train_iter=shards.train_iterator(prepared, cfg.weights, cfg.seq_len, batch_per_process,
                                       seed, process_index, process_count),
      eval_batches=evals, tokenizer=tok,
      train_tokens=sum(p.tokens("train") for p in prepared),
      val_tokens=sum(p.tokens("val") for p in prepared))


def data_checkpoint_handler() -> grain.checkpoint.CheckpointHandler:
  """The orbax item handler for the "data" item (see the module docstring)."""
  return grain.checkpoint.CheckpointHandler()


def data_save_args(
    iterator: grain.DatasetIterator,
) -> grain.checkpoint.CheckpointSave:
  """Orbax save args for a grain iterator, for use in ocp.args.Composite."""
  return grain.checkpoint.CheckpointSave(iterator)


def data_restore_args(
    iterator: grain.DatasetIterator,
) -> grain.checkpoint.CheckpointRestore:
  """Orbax restore args that set `iterator`'s position in place."""
  return grain.checkpoint.CheckpointRestore(iterator)
