"""python -m moex.data.prepare: readers, shards, manifest, determinism, resume, bad data."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest
from etils import epath

from data_text import write_jsonl_corpus
from moex.data import prepare, shards, tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _options(**kw):
  return prepare.Options(tokenizer=kw.pop("tokenizer", "byte"), **kw)


def _records(directory, split):
  """Every record of a split's shards as bytes-level lists of ids, in shard order."""
  p = shards.open_prepared(str(directory))
  if not p.shards(split):
    return []
  return [d["tokens"].tolist() for d in shards.documents(p, split)]


def _byte_doc(text: str) -> list[int]:
  tok = tokenizer_lib.ByteTokenizer()
  return [tok.bos_id, *text.encode("utf-8"), tok.eos_id]


def _files(directory) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(directory).iterdir())}


def test_readers_text_jsonl_parquet_gz(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  src = tmp_path / "in"
  src.mkdir()
  (src / "a.txt").write_text("plain text é\n")
  (src / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
  (src / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
  pq.write_table(pa.table({"text": ["row one", "row two"], "n": [1, 2]}), src / "d.parquet")
  manifest = prepare.prepare(str(src / "*"), str(tmp_path / "out"), _options(val_fraction=0.0))
  texts = ["plain text é\n", "one", "two", "zipped", "row one", "row two"]
  assert _records(tmp_path / "out", "train") == [_byte_doc(t) for t in texts]
  assert manifest["complete"] and manifest["totals"]["train"]["documents"] == 6
  assert manifest["totals"]["train"]["text_bytes"] == sum(len(t.encode()) for t in texts)
  assert manifest["totals"]["train"]["tokens"] == sum(len(t.encode()) + 2 for t in texts)
  assert manifest["tokenizer"] == prepare.tokenizer_identity(tokenizer_lib.ByteTokenizer())
  assert manifest["id_dtype"] == "uint16"


def test_val_split_by_text_hash(tmp_path, bpe_dir):
  glob = write_jsonl_corpus(tmp_path / "in", files=3, docs=600)
  out = tmp_path / "out"
  manifest = prepare.prepare(glob, str(out), _options(tokenizer=str(bpe_dir), val_fraction=0.2,
                                                      shard_mb=0.05))
  tok = tokenizer_lib.get_tokenizer(str(bpe_dir))
  texts = [json.loads(line)["text"] for f in sorted((tmp_path / "in").iterdir())
           for line in f.read_text().splitlines()]
  val = [t for t in texts if prepare.is_val(t.encode(), 0.2)]
  assert 0.1 < len(val) / len(texts) < 0.3
  got = _records(out, "val")
  assert got == [[*tok.encode(t).tolist(), tok.eos_id] for t in val]  # GPT-2 style: EOS only
  assert len(_records(out, "train")) == len(texts) - len(val)
  units = {s["unit"] for s in manifest["shards"]}
  assert units == {0, 1, 2}  # each file is larger than shard_mb: a unit alone


@pytest.mark.slow
def test_killed_worker_resumes_to_identical_output(tmp_path):
  """A worker SIGKILLed mid-shard: the run fails in one line and leaves no finished-looking
  shard; re-running completes it, byte-identical to an uninterrupted in-process run."""
  glob = write_jsonl_corpus(tmp_path / "in", files=6, docs=1200)
  reference = tmp_path / "reference"
  prepare.prepare(glob, str(reference), _options(val_fraction=0.1, shard_mb=0.1))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "moex.data.prepare", f"--inputs={glob}", f"--output={out}",
         "--val_fraction=0.1", "--shard_mb=0.1", "--workers=1"]
  env = {**os.environ, prepare.KILL_ENV: "2:5", "PYTHONPATH": str(ROOT)}
  killed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert killed.returncode == 1
  assert killed.stderr.strip().splitlines()[-1].startswith("prepare: a worker process died")
  manifest = json.loads((out / prepare.MANIFEST).read_text())
  assert not manifest["complete"]
  assert sorted({s["unit"] for s in manifest["shards"]}) == [0, 1]
  assert list(out.glob("train-00002-*.partial-*"))  # the killed unit's shard, not renamed
  assert not list(out.glob("train-00002-*.arrayrecord"))
  env.pop(prepare.KILL_ENV)
  resumed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming: 2 of" in resumed.stderr
  assert _files(out) == _files(reference)


def test_bad_data_counted_then_fatal_above_threshold(tmp_path, caplog):
  src = tmp_path / "in"
  src.mkdir()
  good = [json.dumps({"text": f"document {i}"}) for i in range(20)]
  bad = ['{"text": broken', json.dumps({"body": "x"}), json.dumps({"text": 3}),
         json.dumps({"text": "\ud800"})]
  lines = ("\n".join(good[:10] + bad) + "\n").encode() + b'{"text": "\xff"}\n'
  (src / "a.jsonl").write_bytes(lines)
  (src / "b.jsonl").write_text("\n".join(good[10:]) + "\n")
  (src / "c.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
  (src / "d.jsonl.gz").write_bytes(b"not gzip at all")
  out = tmp_path / "out"
  with caplog.at_level("WARNING"):
    manifest = prepare.prepare(str(src / "*"), str(out), _options(max_error_fraction=0.5))
  assert manifest["totals"]["train"]["documents"] + manifest["totals"]["val"]["documents"] == 20
  assert sum(t["errors"] for t in manifest["totals"].values()) == 7
  log = caplog.text
  for where in ("a.jsonl:11: malformed JSON", "a.jsonl:12: no field 'text'",
                "a.jsonl:13: field 'text' is int", "a.jsonl:14: invalid UTF-8",
                "a.jsonl:15: invalid UTF-8", "c.txt:1: invalid UTF-8", "d.jsonl.gz: unreadable"):
    assert where in log, where
  strict = tmp_path / "strict"
  with pytest.raises(prepare.PrepareError, match=r"^--max_error_fraction: 7 of 27 documents"):
    prepare.prepare(str(src / "*"), str(strict), _options(max_error_fraction=0.1))
  assert not json.loads((strict / prepare.MANIFEST).read_text())["complete"]
  with pytest.raises(ValueError, match="is not finished"):
    shards.open_prepared(str(strict))


def test_other_options_refused_and_finished_run_skipped(tmp_path, caplog):
  glob = write_jsonl_corpus(tmp_path / "in", files=2, docs=100)
  out = str(tmp_path / "out")
  prepare.prepare(glob, out, _options())
  before = _files(out)
  with caplog.at_level("INFO"):
    prepare.prepare(glob, out, _options())
  assert "resuming: 1 of 1 units" in caplog.text and _files(out) == before
  with pytest.raises(prepare.PrepareError, match=r"^--output=.*other inputs or options "
                     r"\(options differ\)"):
    prepare.prepare(glob, out, _options(text_field="body"))


def test_inputs_errors(tmp_path):
  with pytest.raises(prepare.PrepareError, match="^--inputs: no files match"):
    prepare.resolve_inputs(str(tmp_path / "*.jsonl"))
  with pytest.raises(prepare.PrepareError, match="^--inputs: .* is a directory"):
    prepare.resolve_inputs(str(tmp_path))


def test_plan_units_groups_consecutive_files():
  assert prepare.plan_units([5, 5, 5, 20, 1, 1], 10) == [[0, 1], [2], [3], [4, 5]]


def test_inputs_and_output_on_gcs(tmp_path, fake_gcs):
  del fake_gcs
  write_jsonl_corpus(tmp_path / "in", files=2, docs=50)
  for f in sorted((tmp_path / "in").iterdir()):
    (epath.Path("gs://bucket/in") / f.name).write_bytes(f.read_bytes())
  local = prepare.prepare(str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "local"),
                          _options(val_fraction=0.2))
  manifest = prepare.prepare("gs://bucket/in/*.jsonl", "gs://bucket/prepared",
                             _options(val_fraction=0.2))
  assert [s["tokens"] for s in manifest["shards"]] == [s["tokens"] for s in local["shards"]]
  assert manifest["inputs"][0][0] == "gs://bucket/in/part-0.jsonl"
  for shard in manifest["shards"]:  # the same bytes as a local preparation of the same text
    remote = (epath.Path("gs://bucket/prepared") / shard["name"]).read_bytes()
    assert remote == (tmp_path / "local" / shard["name"]).read_bytes()
  listed = sorted(p.name for p in epath.Path("gs://bucket/prepared").iterdir())
  assert listed == sorted([prepare.MANIFEST] + [s["name"] for s in manifest["shards"]])
  assert shards.open_prepared("gs://bucket/prepared").manifest == manifest
  shard = manifest["shards"][0]
  assert (epath.Path("gs://bucket/prepared") / shard["name"]).stat().length == shard["file_bytes"]
