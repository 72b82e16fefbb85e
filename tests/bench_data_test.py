"""moex.bench.data: the pipeline's rate on a prepared corpus (the measurement, not a claim)."""

import json

from data_text import write_jsonl_corpus
from experiments import tiny
from moex import config as config_lib
from moex.bench import data as bench_data
from moex.data import preparing


def test_pipeline_rate_counts_delivered_tokens(tmp_path):
  preparing.prepare_shards(write_jsonl_corpus(tmp_path / "in", files=1, docs=200),
                           str(tmp_path / "p"), preparing.Options(tokenizer="byte"))
  cfg = config_lib.validate(tiny.get_config(), vocab_size=259)
  r = bench_data.pipeline_rate([str(tmp_path / "p")], cfg.data, 0, seconds=0.2)
  assert r["batches"] > 0
  assert r["tokens_per_sec"] == r["batches"] * 16 * 256 / r["seconds"]


def test_stdlib_blocks_are_json_lines(tmp_path):
  n = bench_data.write_stdlib_blocks(tmp_path / "b.jsonl")
  lines = (tmp_path / "b.jsonl").read_text().splitlines()
  assert len(lines) == n > 10_000
  assert all(json.loads(l)["text"].count("\n") <= 12 for l in lines[:1000])
