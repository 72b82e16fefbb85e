"""Tests for moex/data/pipeline.py."""

import pickle
from unittest import mock

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_text import STDLIB_SAMPLE, stdlib_text

from moex import config as config_lib
from moex.data import pipeline

L = 8  # sequence length


def _tokens(n: int = 1001) -> np.ndarray:
  return np.arange(n, dtype=np.uint16)


def _take(it, n: int) -> list[np.ndarray]:
  return [next(it)["tokens"] for _ in range(n)]


def test_windows_contiguous_and_shifted():
  tokens = _tokens(100)
  windows = pipeline.PackedWindows(tokens, L)
  assert len(windows) == (100 - 1) // L
  for i in range(len(windows)):
    w = windows[i]
    assert w.dtype == np.int32 and w.shape == (L + 1,)
    np.testing.assert_array_equal(w, np.arange(i * L, i * L + L + 1))
    if i + 1 < len(windows):
      assert w[-1] == windows[i + 1][0]  # the last target is the next input
  assert len(pipeline.PackedWindows(_tokens(L + 1), L)) == 1
  assert len(pipeline.PackedWindows(_tokens(L), L)) == 0


def test_windows_pickle():
  windows = pickle.loads(pickle.dumps(pipeline.PackedWindows(_tokens(50), L)))
  np.testing.assert_array_equal(windows[2], np.arange(16, 25))


def test_train_batches_shape_dtype():
  it = pipeline.train_iterator(_tokens(), L, batch_per_process=4, seed=0)
  batch = next(it)
  assert set(batch) == {"tokens"}
  assert batch["tokens"].dtype == np.int32
  assert batch["tokens"].shape == (4, L + 1)
  # Every row is a window: consecutive tokens starting at a multiple of L.
  rows = batch["tokens"]
  assert np.all(rows[:, 0] % L == 0)
  np.testing.assert_array_equal(np.diff(rows, axis=1), 1)


def test_train_epochs_cover_all_windows_and_reshuffle():
  tokens = _tokens(16 * L + 1)  # 16 windows, 4 batches of 4 per epoch
  it = pipeline.train_iterator(tokens, L, batch_per_process=4, seed=1)
  epoch1 = np.concatenate(_take(it, 4))[:, 0] // L
  epoch2 = np.concatenate(_take(it, 4))[:, 0] // L
  assert sorted(epoch1) == sorted(epoch2) == list(range(16))
  assert epoch1.tolist() != epoch2.tolist()
  assert epoch1.tolist() != list(range(16))


def test_same_seed_same_order_other_seed_differs():
  a = _take(pipeline.train_iterator(_tokens(), L, 4, seed=7), 5)
  b = _take(pipeline.train_iterator(_tokens(), L, 4, seed=7), 5)
  c = _take(pipeline.train_iterator(_tokens(), L, 4, seed=8), 5)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


def test_processes_split_the_single_process_batches():
  tokens = _tokens(24 * L + 1)
  one = pipeline.train_iterator(tokens, L, 8, seed=3)
  two = [pipeline.train_iterator(tokens, L, 4, seed=3, process_index=p, process_count=2)
         for p in range(2)]
  for _ in range(5):  # across an epoch boundary (3 batches of 8 per epoch)
    whole = next(one)["tokens"]
    parts = np.concatenate([next(it)["tokens"] for it in two])
    np.testing.assert_array_equal(parts, whole)


def test_processes_get_disjoint_windows():
  tokens = _tokens(24 * L + 1)  # 24 windows: 12 per process, 3 batches of 4
  starts = []
  for p in range(2):
    it = pipeline.train_iterator(tokens, L, 4, seed=3, process_index=p,
                                 process_count=2)
    starts.append(set((np.concatenate(_take(it, 3))[:, 0] // L).tolist()))
  assert not starts[0] & starts[1]
  assert starts[0] | starts[1] == set(range(24))


def test_train_too_few_windows():
  with pytest.raises(ValueError, match=r"data\.batch_size: 8 .* only 6 windows"):
    pipeline.train_iterator(_tokens(6 * L + 1), L, batch_per_process=8, seed=0)


def test_eval_batches_deterministic_and_capped():
  tokens = _tokens(10 * L + 1)  # 10 windows
  first = pipeline.eval_batches(tokens, L, 2, num_batches=3)
  again = pipeline.eval_batches(tokens, L, 2, num_batches=3)
  assert len(first) == 3
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  starts = np.concatenate([b["tokens"] for b in first])[:, 0] // L
  assert starts.tolist() == [0, 1, 2, 3, 4, 5]
  assert first[0]["tokens"].dtype == np.int32
  with mock.patch.object(pipeline.logging, "warning") as warning:
    capped = pipeline.eval_batches(tokens, L, 2, num_batches=100)
  assert len(capped) == 5 and warning.called
  # Process 1 of 2 holds rows 2..3 of each global batch of 4.
  two = pipeline.eval_batches(tokens, L, 2, 10, process_index=1, process_count=2)
  assert (np.concatenate([b["tokens"] for b in two])[:, 0] // L).tolist() == [
      2, 3, 6, 7]
  with pytest.raises(ValueError, match=r"validation split holds only 10 windows"):
    pipeline.eval_batches(tokens, L, 16, num_batches=1)


@pytest.mark.parametrize("register_handlers", [True, False])
def test_checkpoint_with_state_in_orbax_manager(tmp_path, register_handlers):
  def make_iter():
    return pipeline.train_iterator(_tokens(), L, batch_per_process=4, seed=5)

  def make_manager():
    # Without item_handlers orbax finds the handlers from the args types.
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "data": pipeline.data_checkpoint_handler(),
    } if register_handlers else None
    return ocp.CheckpointManager(
        tmp_path / "ckpt",
        options=ocp.CheckpointManagerOptions(max_to_keep=2),
        item_handlers=handlers,
    )

  it = make_iter()
  _take(it, 3)
  manager = make_manager()
  state = {"x": np.zeros(3)}
  manager.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=pipeline.data_save_args(it)))
  # Advancing while an async save may be in flight must not leak into it.
  expected = _take(it, 40)  # crosses an epoch boundary (31 batches per epoch)
  manager.wait_until_finished()
  manager.close()

  fresh = make_iter()
  manager = make_manager()
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state),
      data=pipeline.data_restore_args(fresh)))
  manager.close()
  np.testing.assert_array_equal(restored["state"]["x"], np.zeros(3))
  assert restored["data"] is fresh
  np.testing.assert_array_equal(np.stack(_take(fresh, 40)), np.stack(expected))


def _data(**fields) -> config_lib.DataConfig:
  """The typed view moex.config.validate makes of config.data."""
  base = dict(source="stdlib", tokenizer="byte", val_fraction=0.05, cache_dir="", seq_len=16,
              batch_size=4, eval_batches=8)
  return config_lib.DataConfig(**{**base, **fields})


def test_build_end_to_end(tmp_path):
  src = tmp_path / "src"
  for i in range(30):
    (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
    (src / f"d{i % 3}" / f"m{i}.py").write_text(f"def f{i}():\n  return {i}\n" * 20)
  config = _data(source=f"{src}/**/*.py", val_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                 seq_len=16, batch_size=4, eval_batches=1000)
  data = pipeline.build(config, seed=0, process_index=1, process_count=2)
  assert data.tokenizer.name == "byte"
  assert data.train_tokens > 0 and data.val_tokens > 0
  batch = next(data.train_iter)
  assert batch["tokens"].shape == (2, 17)
  assert 1 <= len(data.eval_batches) < 1000
  assert data.eval_batches[0]["tokens"].shape == (2, 17)
  assert isinstance(data.train_iter, grain.DatasetIterator)
  # Every byte (not the specials) of the text is in one split or the other.
  total_bytes = sum(p.stat().st_size for p in src.rglob("*.py"))
  assert data.train_tokens + data.val_tokens == total_bytes + 2 * 30


def test_build_with_a_bpe_tokenizer(bpe_dir, tmp_path):
  """Windows of BPE ids (all < vocab_size); every file's tokens plus its EOS are in a split."""
  src = tmp_path / "src"
  src.mkdir()
  texts = ["".join(stdlib_text(name).splitlines(keepends=True)[i * 40:(i + 1) * 40])
           for name in STDLIB_SAMPLE for i in range(4)]
  for i, text in enumerate(texts):
    (src / f"m{i:02d}.py").write_text(text, "utf-8")
  config = _data(source=f"{src}/*.py", tokenizer=str(bpe_dir), val_fraction=0.2,
                 cache_dir=str(tmp_path / "cache"), seq_len=32, batch_size=4, eval_batches=2)
  data = pipeline.build(config, seed=0)
  tok = data.tokenizer
  assert tok.name.startswith("hf:") and tok.vocab_size == 800
  assert data.train_tokens + data.val_tokens == sum(len(tok.encode(t)) + 1 for t in texts)
  for batch in [next(data.train_iter) for _ in range(5)] + data.eval_batches:
    assert batch["tokens"].shape == (4, 33) and batch["tokens"].dtype == np.int32
    assert 0 <= batch["tokens"].min() and batch["tokens"].max() < tok.vocab_size
  assert len(data.eval_batches) == 2


def test_build_reads_seq_len_and_batch_from_the_typed_view(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(6):
    (src / f"m{i}.py").write_text("x = 1\n" * 50)
  view = _data(source=f"{src}/*.py", val_fraction=0.5, cache_dir=str(tmp_path / "cache"),
               eval_batches=2, seq_len=16, batch_size=4)
  data = pipeline.build(view, seed=0)
  assert next(data.train_iter)["tokens"].shape == (4, 17)


def test_data_has_one_config_view():
  """moex.config.DataConfig is the only one: checked once, in moex.config.validate."""
  import moex.data  # pylint: disable=g-import-not-at-top
  assert not hasattr(pipeline, "DataConfig")
  assert not hasattr(moex.data, "DataConfig")


def test_build_rejects_unknown_tokenizer(tmp_path):
  with pytest.raises(ValueError, match=r"data\.tokenizer"):
    pipeline.build(_data(tokenizer="nope"), seed=0)
