"""The data pipeline alone against the train step it feeds: tokens per second of each.

  python -m moex.bench.data [--config=experiments/tiny.py] [--prepared=DIR[,DIR]] \
      [--seconds=10] [--workers=2] [--json=out.json]

Without --prepared, prepares the Python standard library twice into a temporary directory
(python -m moex.data.prepare with the config's tokenizer): once a document per file (the
default experiment's corpus, about 2,000 documents of 15 KB) and once as JSON Lines of
12-line blocks (about 70,000 documents of 400 bytes, which costs the packer more per token).
Then, for each, times `shards.train_iterator` (ArrayRecord reads, global shuffle, packing into
[B, L + 1] rows with segment ids and positions, batching) at the config's seq_len and
batch_size for --seconds after a warm-up, and the config's jitted train step
(moex.bench.train_step) on the same machine, and prints both rates and their ratio.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import tempfile
import time

from absl import flags, logging
from ml_collections import config_flags

from moex import cli, config as config_lib, workdir as workdir_lib
from moex.bench import train_step
from moex.data import preparing, shards, sources

_BLOCK_LINES = 12


def define_flags() -> flags.FlagHolder:
  """Flags only when run as a program (cli.run calls it)."""
  holder = config_flags.DEFINE_config_file("config", "experiments/tiny.py", "Experiment config.")
  flags.DEFINE_string("prepared", "", "Prepared directories to read (default: the stdlib, "
                      "prepared here).")
  flags.DEFINE_float("seconds", 10.0, "Seconds of pipeline timing per dataset.")
  flags.DEFINE_integer("workers", 2, "Prepare worker processes.")
  flags.DEFINE_integer("steps", 10, "Timed train steps.")
  flags.DEFINE_string("json", None, "Also write the results here as JSON.")
  return holder


def write_stdlib_blocks(path: pathlib.Path) -> int:
  """The stdlib as JSON Lines of _BLOCK_LINES-line blocks; returns the number of documents."""
  count = 0
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as out:
    for f in sources.resolve_files("stdlib"):
      lines = f.read_text("utf-8", errors="replace").splitlines(keepends=True)
      for i in range(0, len(lines), _BLOCK_LINES):
        out.write(json.dumps({"text": "".join(lines[i:i + _BLOCK_LINES])}) + "\n")
        count += 1
  return count


def _prepare_stdlib(root: pathlib.Path, tokenizer: str, workers: int) -> dict[str, dict]:
  """Prepares the stdlib as files and as blocks; returns {name: {dir, prepare_s, ...}}."""
  files = ",".join(str(f) for f in sources.resolve_files("stdlib"))
  blocks = root / "blocks.jsonl"
  write_stdlib_blocks(blocks)
  out = {}
  for name, inputs, fmt in (("stdlib files", files, "text"),
                            ("stdlib 12-line blocks", str(blocks), "jsonl")):
    t = time.perf_counter()
    manifest = preparing.prepare_shards(
        inputs, str(root / name.replace(" ", "_")),
        preparing.Options(tokenizer=tokenizer, format=fmt, val_fraction=0.01, shard_mb=8),
        workers)
    seconds = time.perf_counter() - t
    text = sum(s["text_bytes"] for s in manifest["shards"])
    out[name] = {"dir": str(root / name.replace(" ", "_")), "prepare_s": seconds,
                 "prepare_mb_per_s": text / 1e6 / seconds,
                 "documents": sum(s["documents"] for s in manifest["shards"]),
                 "tokens": sum(s["tokens"] for s in manifest["shards"])}
  return out


def pipeline_rate(dirs: list[str], cfg: config_lib.DataConfig, seed: int,
                  seconds: float) -> dict:
  """Tokens per second the packed, batched train iterator delivers (after 5 batches)."""
  prepared = [shards.open_prepared(d) for d in dirs]
  weights = tuple(1 / len(dirs) for _ in dirs)
  it = shards.train_iterator(prepared, weights, cfg.seq_len, cfg.batch_size, seed)
  for _ in range(5):
    next(it)
  batches, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds:
    next(it)
    batches += 1
  elapsed = time.perf_counter() - t
  return {"batches": batches, "seconds": elapsed,
          "tokens_per_sec": batches * cfg.batch_size * cfg.seq_len / elapsed}


def main(argv):
  del argv
  f = flags.FLAGS
  cd = f.config
  cfg = workdir_lib.validate(cd)
  results = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})",
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size, "pipeline": {}}
  with tempfile.TemporaryDirectory(prefix="moex-bench-data-") as tmp:
    datasets = ({d: {"dir": d} for d in f.prepared.split(",")} if f.prepared
                else _prepare_stdlib(pathlib.Path(tmp), cd.data.tokenizer, f.workers))
    for name, info in datasets.items():
      info.update(pipeline_rate([info["dir"]], cfg.data, cfg.seed, f.seconds))
      results["pipeline"][name] = info
      logging.info("pipeline %s: %.0f tokens/s", name, info["tokens_per_sec"])
  step = train_step.bench(cd, f.steps, warmup=2)
  results["train_step_tokens_per_sec"] = step["tokens_per_sec"]
  for name, info in results["pipeline"].items():
    info["ratio_to_train_step"] = info["tokens_per_sec"] / step["tokens_per_sec"]
    print(f"{name}: pipeline {info['tokens_per_sec']:,.0f} tokens/s = "
          f"{info['ratio_to_train_step']:.1f}x the train step's {step['tokens_per_sec']:,.0f}"
          + (f" (prepared at {info['prepare_mb_per_s']:.1f} MB/s, {info['documents']} "
             f"documents)" if "prepare_mb_per_s" in info else ""))
  if f.json:
    pathlib.Path(f.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.bench.data")
