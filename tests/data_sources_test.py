"""Tests for moex/data/sources.py."""

import os
import pathlib
from unittest import mock
import zlib

import numpy as np
import pytest

from moex.data import sources
from moex.data import tokenizer


def _write(root: pathlib.Path, rel: str, text: str = "x = 1\n") -> pathlib.Path:
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def _tree(root: pathlib.Path, n: int = 40) -> list[pathlib.Path]:
  return [_write(root, f"pkg{i % 3}/mod_{i}.py", f"v = {i}\n") for i in range(n)]


# resolve_files


def test_resolve_glob_sorted_and_recursive(tmp_path):
  files = _tree(tmp_path, 9)
  _write(tmp_path, "notes.txt")
  got = sources.resolve_files(str(tmp_path / "**" / "*.py"))
  assert got == sorted(files)
  assert all(p.is_absolute() for p in got)


def test_resolve_comma_separated_dedupes(tmp_path):
  a = _write(tmp_path, "a.py")
  b = _write(tmp_path, "sub/b.txt")
  spec = f"{tmp_path}/*.py, {b},{a},{tmp_path}/sub/*"
  assert sources.resolve_files(spec) == sorted([a, b])


def test_resolve_expands_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  a = _write(tmp_path, "corpus/a.py")
  assert sources.resolve_files("~/corpus/*.py") == [a]


def test_resolve_errors_name_data_source(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^data\.source: no files match '"):
    sources.resolve_files(str(tmp_path / "*.nothing"))
  missing = tmp_path / "missing.py"
  with pytest.raises(FileNotFoundError) as e:
    sources.resolve_files(str(missing))
  assert str(e.value) == f"data.source: file not found: {missing}"
  with pytest.raises(FileNotFoundError, match=r"data\.source: .* is a directory"):
    sources.resolve_files(str(tmp_path))


def test_resolve_stdlib():
  files = sources.resolve_files("stdlib")
  assert len(files) > 100
  assert files == sorted(files)
  assert any(f.name == "zipfile.py" or f.parent.name == "zipfile" for f in files)
  assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)


# split_files


def test_split_is_by_relative_path_crc(tmp_path):
  files = _tree(tmp_path)
  train, val = sources.split_files(files, 0.25)
  assert sorted(train + val) == sorted(files) and not set(train) & set(val)
  for f in files:
    crc = zlib.crc32(f.relative_to(tmp_path).as_posix().encode()) % 10000
    assert (f in val) == (crc < 2500)


def test_split_deterministic_and_independent_of_root_and_order(tmp_path):
  rels = [f"d{i % 4}/f{i}.py" for i in range(30)]
  one = [_write(tmp_path / "one", r) for r in rels]
  two = [_write(tmp_path / "elsewhere" / "two", r, "other") for r in rels]
  t1, v1 = sources.split_files(one, 0.3)
  t2, v2 = sources.split_files(list(reversed(two)), 0.3)
  rel = lambda fs, root: [f.relative_to(root).as_posix() for f in fs]
  assert rel(v1, tmp_path / "one") == rel(v2, tmp_path / "elsewhere" / "two")
  assert rel(t1, tmp_path / "one") == rel(t2, tmp_path / "elsewhere" / "two")
  # Adding files never moves existing ones.
  more = one + [_write(tmp_path / "one", f"new/g{i}.py") for i in range(10)]
  t3, v3 = sources.split_files(more, 0.3)
  assert set(v1) <= set(v3) and set(t1) <= set(t3)


def test_split_keeps_both_sides_non_empty(tmp_path):
  files = _tree(tmp_path, 5)
  train, val = sources.split_files(files, 0.0)
  assert len(val) == 1 and len(train) == 4
  train, val = sources.split_files(files, 1.0)
  assert len(train) == 1 and len(val) == 4


def test_split_leaves_the_fraction_range_to_the_config(tmp_path):
  """moex.config.validate checks data.val_fraction; the split only needs 2 files."""
  files = _tree(tmp_path, 5)
  assert [len(s) for s in sources.split_files(files, 1.5)] == [1, 4]


def test_split_needs_two_files(tmp_path):
  with pytest.raises(ValueError) as e:
    sources.split_files([_write(tmp_path, "a.py")], 0.1)
  assert str(e.value) == (
      "data.source: need at least 2 files to split into train and validation"
  )


# tokenized_array


def test_tokenized_array_layout(tmp_path):
  tok = tokenizer.ByteTokenizer()
  a = _write(tmp_path, "a.py", "ab")
  b = _write(tmp_path, "b.py", "")
  arr = sources.tokenized_array([a, b], tok, str(tmp_path / "cache"), "train")
  assert arr.dtype == np.uint16 and arr.ndim == 1
  assert isinstance(arr, np.memmap)
  assert arr.tolist() == [257, 97, 98, 258, 257, 258]


def test_tokenized_array_cache_reuse_and_invalidation(tmp_path):
  tok = tokenizer.ByteTokenizer()
  cache = tmp_path / "cache"
  files = _tree(tmp_path / "src", 4)
  with mock.patch.object(sources.logging, "info") as info:
    first = sources.tokenized_array(files, tok, str(cache), "train")
    again = sources.tokenized_array(files, tok, str(cache), "train")
  assert info.call_args_list[0].args[0].startswith("tokenized %d files")
  assert info.call_args_list[1].args[0].startswith("reusing cached tokens")
  assert first.filename == again.filename
  assert os.listdir(cache) == [pathlib.Path(first.filename).name]

  # Changing a file (content, or only its mtime) changes the key.
  files[0].write_text("changed = True\n")
  changed = sources.tokenized_array(files, tok, str(cache), "train")
  assert changed.filename != first.filename
  assert tok.decode(changed).startswith(b"changed = True\n")
  st = files[1].stat()
  os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  touched = sources.tokenized_array(files, tok, str(cache), "train")
  assert touched.filename not in (first.filename, changed.filename)
  assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]


def test_tokenized_array_default_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("MOEX_CACHE_DIR", str(tmp_path / "env_cache"))
  files = _tree(tmp_path / "src", 2)
  arr = sources.tokenized_array(files, tokenizer.ByteTokenizer(), "", "val")
  assert pathlib.Path(arr.filename).parent == tmp_path / "env_cache" / "tokens"
  assert pathlib.Path(arr.filename).name.startswith("val-")


def test_tokenized_array_with_a_bpe_tokenizer(bpe_dir, tmp_path):
  """Each file's ids then EOS (this tokenizer has no BOS); a cache file of its own."""
  tok = tokenizer.get_tokenizer(str(bpe_dir))
  texts = ["def f(x):\n    return x  # café\n", "", "import os\n"]
  files = [_write(tmp_path, f"m{i}.py", t) for i, t in enumerate(texts)]
  cache = tmp_path / "cache"
  arr = sources.tokenized_array(files, tok, str(cache), "train")
  expected = []
  for t in texts:
    expected += tok.encode(t).tolist() + [tok.eos_id]
  assert arr.dtype == np.uint16 and arr.tolist() == expected
  assert tok.token_bytes[arr].sum() == sum(len(t.encode("utf-8")) for t in texts)
  by_bytes = sources.tokenized_array(files, tokenizer.ByteTokenizer(), str(cache), "train")
  assert by_bytes.filename != arr.filename and len(os.listdir(cache)) == 2


def test_cache_key_follows_the_special_tokens_of_the_config_files(bpe_dir, tmp_path):
  """BOS/EOS may come from tokenizer_config.json, which the tokenizer's name does not hash."""
  d = tmp_path / "tok"
  d.mkdir()
  (d / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
  files = _tree(tmp_path / "src", 3)
  cache = str(tmp_path / "cache")
  plain = sources.tokenized_array(files, tokenizer.get_tokenizer(str(d)), cache, "train")
  (d / "tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>"}')
  tok = tokenizer.get_tokenizer(str(d))
  with_bos = sources.tokenized_array(files, tok, cache, "train")
  assert with_bos.filename != plain.filename
  assert with_bos.size == plain.size + 3 and with_bos[0] == tok.bos_id


def test_tokenized_array_uint32_past_65536_ids_and_no_separators(tmp_path):
  from data_text import write_word_level  # pylint: disable=g-import-not-at-top
  (tmp_path / "tok").mkdir()
  tok = tokenizer.get_tokenizer(str(write_word_level(tmp_path / "tok", 70_000)))
  files = [_write(tmp_path, "a.txt", "w1 w65536\n"), _write(tmp_path, "b.txt", "w69999")]
  with mock.patch.object(sources.logging, "warning") as warning:
    arr = sources.tokenized_array(files, tok, str(tmp_path / "cache"), "train")
  assert arr.dtype == np.uint32 and arr.tolist() == [1, 65536, 69999]
  (call,) = warning.call_args_list  # neither BOS nor EOS: documents run together
  assert (call.args[0] % call.args[1:]) == (
      f"data.tokenizer: {tok.name} has neither BOS nor EOS; documents are packed with "
      "nothing between them")
  with mock.patch.object(sources.logging, "info") as info:
    again = sources.tokenized_array(files, tok, str(tmp_path / "cache"), "train")
  assert info.call_args_list[0].args[0].startswith("reusing cached tokens")
  assert again.dtype == np.uint32 and again.tolist() == arr.tolist()


def test_long_tokenization_logs_progress(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_PROGRESS_SECONDS", 0.0)
  monkeypatch.setattr(sources, "_CHUNK_FILES", 2)
  files = _tree(tmp_path / "src", 5)
  with mock.patch.object(sources.logging, "info") as info:
    sources.tokenized_array(files, tokenizer.ByteTokenizer(), str(tmp_path / "cache"), "val")
  lines = [c.args[0] % c.args[1:] for c in info.call_args_list
           if c.args[0].startswith("tokenizing:")]
  assert [l.split(",")[0] for l in lines] == [
      "tokenizing: 2/5 files", "tokenizing: 4/5 files", "tokenizing: 5/5 files"]
  assert lines[-1].endswith("MB, about 0 s left")


@pytest.mark.parametrize("keep", ["half", "header", "empty", "garbage"])
def test_damaged_cache_is_rebuilt_with_a_warning(tiny_config, keep):
  """A cache file cut short (a full disk, a killed copy) is derived data: rebuilt, not fatal."""
  from moex import config as config_lib  # pylint: disable=g-import-not-at-top
  from moex.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = config_lib.validate(tiny_config, vocab_size=259).data
  first = pipeline.build(cfg, seed=0)
  n, batch = first.train_tokens, next(first.train_iter)["tokens"]
  cache = pathlib.Path(cfg.cache_dir)
  (path,) = cache.glob("train-*.npy")
  good = path.read_bytes()
  cut = {"half": good[:len(good) // 2], "header": good[:40], "empty": b"",
         "garbage": b"not an npy file at all" * 10}[keep]
  path.unlink()  # a new file: truncating the one `first` still maps would fault this process
  path.write_bytes(cut)
  with mock.patch.object(sources.logging, "warning") as warning:
    again = pipeline.build(cfg, seed=0)
  assert path.read_bytes() == good
  assert again.train_tokens == n
  np.testing.assert_array_equal(next(again.train_iter)["tokens"], batch)
  (call,) = warning.call_args_list
  assert (call.args[0] % call.args[1:]).startswith(f"token cache {path} is damaged (")
  assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]
