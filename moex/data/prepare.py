"""Prepare a corpus once: documents -> token ids -> ArrayRecord shards and a manifest.

  python -m moex.data.prepare --inputs=GLOB[,GLOB] --tokenizer=byte|PATH --output=DIR \
      [--format=auto|text|jsonl|parquet] [--text_field=text] [--val_fraction=0.01] \
      [--shard_mb=256] [--workers=N] [--max_error_fraction=0.01]

The work is moex.data.preparing.prepare_shards (formats, the plan of units, workers,
resuming, bad data); the files it writes are described in moex.data.records. Same inputs
and options give byte-identical output whatever --workers is. Interrupted (killed, ^C, a
worker gone): the finished shards are kept and re-running the same command resumes. Every
refusal (a bad flag, no inputs, --output a file or another preparation, too many bad
documents) is one line `moex.data.prepare: ...` with exit status 2.
"""

from __future__ import annotations

import math
import os

from absl import app, flags

from moex import cli
from moex.data import preparing


def define_flags() -> None:
  """The command's flags; defined only when run as a program."""
  flags.DEFINE_string("inputs", None, "Comma-separated files or globs (local or gs://).")
  flags.DEFINE_string("tokenizer", "byte", "As config data.tokenizer: byte or a path.")
  flags.DEFINE_string("output", None, "The prepared dataset's directory (local or gs://).")
  flags.DEFINE_enum("format", "auto", ["auto", "text", "jsonl", "parquet"],
                    "auto: by file name (.jsonl/.json/.ndjson, .parquet, else text).")
  flags.DEFINE_string("text_field", "text", "JSON Lines field / Parquet column of the text.")
  flags.DEFINE_float("val_fraction", 0.01, "Share of documents held out (by text hash).")
  flags.DEFINE_float("shard_mb", 256.0, "Input MB per unit (one train + one val shard).")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes (0 = in this one).")
  flags.DEFINE_float("max_error_fraction", 0.01, "Fail above this share of skipped documents.")


def options(f) -> preparing.Options:
  """The checked flags (a comparison with nan is false, so nan is refused with the range)."""
  if not f.inputs or not f.output:
    raise preparing.PrepareError("give --inputs and --output")
  if not 0 <= f.val_fraction < 1:
    raise preparing.PrepareError(f"--val_fraction: must be in [0, 1), got {f.val_fraction}")
  if not (f.shard_mb > 0 and math.isfinite(f.shard_mb)):
    raise preparing.PrepareError(f"--shard_mb: must be a finite number > 0, got {f.shard_mb}")
  if f.workers < 0:
    raise preparing.PrepareError(f"--workers: must be >= 0, got {f.workers}")
  if not 0 <= f.max_error_fraction <= 1:
    raise preparing.PrepareError(
        f"--max_error_fraction: must be in [0, 1], got {f.max_error_fraction}")
  return preparing.Options(tokenizer=f.tokenizer, format=f.format, text_field=f.text_field,
                           val_fraction=f.val_fraction, shard_mb=f.shard_mb,
                           max_error_fraction=f.max_error_fraction)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  preparing.prepare_shards(f.inputs, f.output, options(f), f.workers)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.data.prepare")
