"""moex.data.shards: packed rows (the batch contract), mixtures, resume, processes, training."""

import json
import re

import numpy as np
import pytest

from data_text import write_jsonl_corpus
from moex.data import pipeline, preparing, shards, tokenizer as tokenizer_lib
from moex.train import loop


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
  """Two prepared JSON Lines corpora (byte tokenizer): short documents and long ones."""
  tmp = tmp_path_factory.mktemp("sources")
  dirs = []
  for name, docs, prefix in (("short", 800, ""), ("long", 300, "# long\n" * 150)):
    glob = write_jsonl_corpus(tmp / f"{name}_in", files=2, docs=docs, prefix=prefix)
    preparing.prepare_shards(glob, str(tmp / name),
                             preparing.Options(tokenizer="byte", val_fraction=0.1))
    dirs.append(str(tmp / name))
  return dirs


def _pieces_are_consistent(seg_L, pos_L) -> None:
  """The contract on one row: ids 1, 2, ... along the row, positions count from 0 per piece,
  padding (0) only at the end with position 0."""
  real = seg_L != 0
  n = int(real.sum())
  assert real[:n].all() and not real[n:].any()
  assert (pos_L[n:] == 0).all()
  seg, pos = seg_L[:n], pos_L[:n]
  if n == 0:
    return
  assert seg[0] == 1
  step = np.diff(seg)
  assert set(step.tolist()) <= {0, 1}
  starts = np.concatenate([[True], step == 1])
  assert (pos[starts] == 0).all()  # a document split over rows restarts at 0 in the next
  assert (pos[1:][step == 0] == pos[:-1][step == 0] + 1).all()
  assert (pos[1:][step == 1] == 0).all()


def _documents_of_stream(rows) -> list[tuple[int, ...]]:
  """Documents ([BOS] ... [EOS] of the byte tokenizer) of consecutive full rows."""
  stream = np.concatenate([r["tokens"] for r in rows]).tolist()
  docs, start = [], 0
  for i, t in enumerate(stream):
    if t == tokenizer_lib.ByteTokenizer.eos_id:
      docs.append(tuple(stream[start:i + 1]))
      start = i + 1
  return docs


def test_packed_rows_obey_the_contract_and_keep_every_document(two_sources):
  p = shards.open_prepared(two_sources[1])
  docs = shards.documents(p, "train")
  epoch = sorted(tuple(docs[i]["tokens"].tolist()) for i in range(len(docs)))
  it = iter(shards.packed_rows(docs, seq_len=63, seed=3))
  rows, tokens = [], 0
  while tokens < 2 * sum(map(len, epoch)):  # well into the second epoch
    rows.append(next(it))
    tokens += 64
  for row in rows:
    assert {k: row[k].shape for k in shards.BATCH_KEYS} == {k: (64,) for k in shards.BATCH_KEYS}
    assert all(row[k].dtype == np.int32 for k in shards.BATCH_KEYS)
    assert (row["segment_ids"] != 0).all()  # an endless stream never pads
    _pieces_are_consistent(row["segment_ids"], row["positions"])
  rebuilt = _documents_of_stream(rows)
  assert sorted(rebuilt[:len(epoch)]) == epoch  # no document lost or duplicated in an epoch
  assert rebuilt[0][0] == tokenizer_lib.ByteTokenizer.bos_id
  assert rebuilt[:len(epoch)] != [tuple(docs[i]["tokens"].tolist()) for i in range(len(docs))]
  assert rebuilt[len(epoch):2 * len(epoch)] != rebuilt[:len(epoch)]  # a new order each epoch


def test_eval_rows_pad_only_the_last_row(two_sources):
  p = shards.open_prepared(two_sources[0])
  rows = list(shards.packed_rows(shards.documents(p, "val"), seq_len=127))
  assert sum(int((r["segment_ids"] != 0).sum()) for r in rows) == p.tokens("val")
  for row in rows:
    _pieces_are_consistent(row["segment_ids"], row["positions"])
  assert all((r["segment_ids"] != 0).all() for r in rows[:-1])
  batches = shards.eval_batches([p], (1.0,), 127, 4, 3)
  again = shards.eval_batches([p], (1.0,), 127, 4, 3)
  assert len(batches) == 3
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)


def test_mixture_token_shares_converge_to_the_weights(two_sources):
  prepared = [shards.open_prepared(d) for d in two_sources]
  it = shards.train_iterator(prepared, (0.8, 0.2), seq_len=127, batch_per_process=8, seed=0)
  for _ in range(100):
    next(it)
  tokens = it.tokens()
  assert sum(tokens.values()) == 100 * 8 * 127
  share = tokens[two_sources[0]] / sum(tokens.values())
  assert abs(share - 0.8) < 0.01
  # By documents the long source would take far more than 20% of the tokens at these weights.
  mean = [p.tokens("train") / sum(s["documents"] for s in p.manifest["shards"]
                                  if s["split"] == "train") for p in prepared]
  assert mean[1] > 2 * mean[0]


def test_iterator_resumes_exactly(two_sources):
  prepared = [shards.open_prepared(d) for d in two_sources]
  make = lambda: shards.train_iterator(prepared, (0.5, 0.5), 63, 4, seed=1)
  it = make()
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what the grain checkpoint handler stores
  at_state = it.tokens()
  expected = [next(it) for _ in range(5)]
  resumed = make()
  resumed.set_state(state)
  assert resumed.tokens() == at_state and sum(at_state.values()) == 7 * 4 * 63
  got = [next(resumed) for _ in range(5)]
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(expected, got) for k in a)
  assert resumed.tokens() == it.tokens()


def test_two_processes_see_disjoint_rows_of_the_same_global_batch(two_sources):
  prepared = [shards.open_prepared(d) for d in two_sources]
  whole = shards.train_iterator(prepared, (0.6, 0.4), 63, 8, seed=2)
  halves = [shards.train_iterator(prepared, (0.6, 0.4), 63, 4, 2, i, 2) for i in range(2)]
  for _ in range(3):
    batch, parts = next(whole), [next(h) for h in halves]
    for k in shards.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k])
  assert halves[0].tokens() == halves[1].tokens() == whole.tokens()  # global counts


def test_refusals(two_sources, tmp_path, bpe_dir):
  p = shards.open_prepared(two_sources[0])
  with pytest.raises(ValueError, match=r"^data.tokenizer: hf:\w+ \(800 ids\) is not the "
                     r"tokenizer .* was prepared with \(byte, 259 ids"):
    shards.check_tokenizer(p, tokenizer_lib.get_tokenizer(str(bpe_dir)))
  with pytest.raises(ValueError, match=r"^data.prepared: .*manifest.json not found; make it "
                     "with python -m moex.data.prepare"):
    shards.open_prepared(str(tmp_path))


def _prepared_config(tiny_config, dirs, weights=""):
  c = tiny_config
  c.data.prepared = ",".join(dirs)
  c.data.mixture_weights = weights
  return c


@pytest.mark.slow
def test_trains_from_a_mixture_and_resumes(two_sources, tiny_config, tmp_path):
  """The tiny model from two prepared sources, stopped at step 3 and resumed to step 6: each
  step logged once, and the token counts continue from the checkpointed iterator."""
  c = _prepared_config(tiny_config, two_sources, "3,1")
  workdir = tmp_path / "workdir"
  first = loop.train_and_evaluate(c, str(workdir), max_steps=3)
  assert first["stopped"] and first["step"] == 3
  result = loop.train_and_evaluate(c, str(workdir))
  assert result["step"] == 6 and np.isfinite(result["final_eval"]["loss"])
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if l["split"] == "train"]
  assert [l["step"] for l in train] == [1, 2, 3, 4, 5, 6]
  assert [sum(l["source_tokens"].values()) for l in train] == [s * 4 * 32 for s in range(1, 7)]
  assert train[-1]["source_token_share"][two_sources[0]] == pytest.approx(0.75, abs=0.05)


def test_pipeline_build_checks_the_tokenizer(two_sources, tiny_config, bpe_dir):
  from moex import config as config_lib  # pylint: disable=g-import-not-at-top
  c = _prepared_config(tiny_config, two_sources[:1])
  c.data.tokenizer = str(bpe_dir)
  cfg = config_lib.validate(c, vocab_size=800)
  with pytest.raises(ValueError, match="^data.tokenizer: .* is not the tokenizer"):
    pipeline.build(cfg.data, 0)


def _copy_prepared(src: str, dst) -> str:
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return str(dst)


def test_missing_shard_refused_at_start_up_in_one_line(two_sources, tmp_path, tiny_config):
  """Issue 25 #2: a shard the manifest lists but the directory lacks is refused when the
  dataset is opened (before any reader), in one line naming it; so is pipeline.build."""
  d = _copy_prepared(two_sources[0], tmp_path / "p")
  (tmp_path / "p" / "train-00000-of-00001.arrayrecord").unlink()
  with pytest.raises(ValueError, match=r"^data.prepared: .*/p: shard "
                     r"train-00000-of-00001.arrayrecord is missing") as e:
    shards.open_prepared(d)
  assert "\n" not in str(e.value)
  from moex import config as config_lib  # pylint: disable=g-import-not-at-top
  c = _prepared_config(tiny_config, [d])
  with pytest.raises(ValueError, match=r"^data.prepared: .*train-00000-of-00001.arrayrecord "
                     r"is missing"):
    pipeline.build(config_lib.validate(c, vocab_size=259).data, 0)


def test_truncated_shard_refused_at_start_up(two_sources, tmp_path):
  d = _copy_prepared(two_sources[0], tmp_path / "p")
  path = tmp_path / "p" / "val-00000-of-00001.arrayrecord"
  size = path.stat().st_size
  path.write_bytes(path.read_bytes()[:size // 2])
  with pytest.raises(ValueError, match=rf"^data.prepared: .*/p: shard "
                     rf"val-00000-of-00001.arrayrecord holds {size // 2} bytes, "
                     rf"manifest.json records {size}") as e:
    shards.open_prepared(d)
  assert "\n" not in str(e.value)


def test_corrupt_shard_mid_run_names_the_shard_and_record(two_sources, tmp_path):
  """Bytes damaged inside a shard (its size unchanged): reading fails at the damaged record
  with one line naming the shard file and the record's index in it."""
  d = _copy_prepared(two_sources[0], tmp_path / "p")
  path = tmp_path / "p" / "train-00000-of-00001.arrayrecord"
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))
  p = shards.open_prepared(d)  # the sizes still match: nothing to see at start-up
  docs = shards.documents(p, "train")
  with pytest.raises(ValueError, match=r"^data.prepared: .*/p/train-00000-of-00001."
                     r"arrayrecord: record (\d+) of \d+ is unreadable") as e:
    for i in range(len(docs)):
      docs[i]  # pylint: disable=pointless-statement
  assert "\n" not in str(e.value)
  record = int(re.search(r"record (\d+) of", str(e.value)).group(1))
  assert 0 < record < len(docs)  # the damage is in the middle, not at the first record
