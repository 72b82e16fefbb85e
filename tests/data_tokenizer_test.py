"""Tests for moex/data/tokenizer.py: the byte tokenizer, tokenizer.json (byte-level BPE and
SentencePiece style), SentencePiece .model files, directories, errors, save."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece
import tokenizers
from data_text import STDLIB_SAMPLE, stdlib_text, write_word_level
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from moex.data import tokenizer

# Text none of the tokenizers was trained on: accents, CJK, emoji, tabs, runs of spaces.
UNSEEN = "déjà vu — ∑ 🙂 漢字\n\tx  =  1  \n"


def _snippet(name: str = "shlex.py", lines: int = 60) -> str:
  """The first lines of a stdlib file (shlex.py holds non-ASCII text)."""
  return "".join(stdlib_text(name).splitlines(keepends=True)[:lines])


def _texts() -> list[str]:
  return [_snippet(), _snippet("textwrap.py", 30), UNSEEN, "x", " leading space", "a\n\n"]


# The byte tokenizer (ids and behaviour fixed: golden numbers depend on them)


def test_byte_tokenizer_constants():
  tok = tokenizer.ByteTokenizer()
  assert (tok.name, tok.vocab_size) == ("byte", 259)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
  assert dict(tok.files) == {}


def test_encode_is_bytes_as_uint16():
  tok = tokenizer.ByteTokenizer()
  ids = tok.encode(b"\x00az\xff")
  assert ids.dtype == np.uint16
  np.testing.assert_array_equal(ids, [0, 97, 122, 255])
  assert tok.encode(b"").shape == (0,)
  batch = tok.encode_batch([b"ab", "é", b""])
  assert [b.tolist() for b in batch] == [[97, 98], [0xC3, 0xA9], []]


def test_round_trip_utf8():
  tok = tokenizer.ByteTokenizer()
  text = "déjà vu — ∑ 🙂\n".encode("utf-8")
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode("é").tolist() == [0xC3, 0xA9]


def test_decode_skips_specials():
  tok = tokenizer.ByteTokenizer()
  ids = np.array([[tok.bos_id, 104, 105], [tok.eos_id, tok.pad_id, 33]])
  assert tok.decode(ids) == b"hi!"
  assert tok.decode([tok.bos_id, tok.eos_id]) == b""


def test_token_bytes():
  tok = tokenizer.ByteTokenizer()
  assert tok.token_bytes.dtype == np.int32
  assert tok.token_bytes.shape == (tok.vocab_size,)
  assert tok.token_bytes[:256].tolist() == [1] * 256
  assert tok.token_bytes[256:].tolist() == [0, 0, 0]
  # Bytes of a packed document = bytes of its text, specials excluded.
  text = "naïve".encode("utf-8")
  ids = np.concatenate([[tok.bos_id], tok.encode(text), [tok.eos_id]])
  assert tok.token_bytes[ids].sum() == len(text)


def test_get_tokenizer_byte():
  assert isinstance(tokenizer.get_tokenizer("byte"), tokenizer.ByteTokenizer)


# Loading files and directories


def test_get_tokenizer_from_files_and_directories(bpe_dir, sp_model, tmp_path, monkeypatch):
  hf = tokenizer.get_tokenizer(str(bpe_dir / "tokenizer.json"))
  assert isinstance(hf, tokenizer.HFTokenizer) and hf.kind == "byte-level"
  assert tokenizer.get_tokenizer(str(bpe_dir)).name == hf.name
  sp = tokenizer.get_tokenizer(str(sp_model))
  assert isinstance(sp, tokenizer.SPTokenizer) and sp.kind == "sentencepiece"
  assert tokenizer.get_tokenizer(str(sp_model.parent)).name == sp.name
  # A directory with both prefers tokenizer.json; "~" is expanded.
  both = tmp_path / "home" / "both"
  both.mkdir(parents=True)
  shutil.copy(bpe_dir / "tokenizer.json", both)
  shutil.copy(sp_model, both)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert tokenizer.get_tokenizer("~/both").name == hf.name
  # A file of another name loads by its content.
  shutil.copy(sp_model, tmp_path / "spiece.bin")
  assert tokenizer.get_tokenizer(str(tmp_path / "spiece.bin")).name == sp.name


def test_names_are_the_file_contents(bpe_dir, sp_model, tmp_path):
  hf = tokenizer.get_tokenizer(str(bpe_dir))
  sp = tokenizer.get_tokenizer(str(sp_model))
  assert hf.name.startswith("hf:") and len(hf.name) == 3 + 16
  assert sp.name.startswith("sp:") and len(sp.name) == 3 + 16
  copy = tmp_path / "elsewhere.json"
  shutil.copy(bpe_dir / "tokenizer.json", copy)
  assert tokenizer.get_tokenizer(str(copy)).name == hf.name  # same bytes, same tokens
  spec = json.loads(copy.read_text())
  spec["model"]["vocab"]["zzz_new"] = max(spec["model"]["vocab"].values()) + 1
  copy.write_text(json.dumps(spec))
  assert tokenizer.get_tokenizer(str(copy)).name != hf.name


def _error(spec: str) -> str:
  with pytest.raises(ValueError) as e:
    tokenizer.get_tokenizer(spec)
  message = str(e.value)
  assert message.startswith("data.tokenizer: ") and "\n" not in message, message
  return message


def test_bad_paths_are_one_line_errors_naming_them(tmp_path, bpe_dir):
  missing = tmp_path / "missing.json"
  assert _error(str(missing)).startswith(
      f"data.tokenizer: {missing}: no such file or directory; use \"byte\"")
  assert _error("bpe").startswith("data.tokenizer: bpe: no such file or directory")
  assert _error(" ").startswith("data.tokenizer: empty; use \"byte\"")
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  assert _error(str(empty)) == (
      f"data.tokenizer: directory {empty} holds neither tokenizer.json nor tokenizer.model")
  bad_json = tmp_path / "bad" / "tokenizer.json"
  bad_json.parent.mkdir()
  bad_json.write_text('{"version": "1.0", "model": 3}')
  assert _error(str(bad_json.parent)).startswith(
      f"data.tokenizer: could not load {bad_json} as a Hugging Face tokenizer.json: ")
  bad_model = tmp_path / "bad.model"
  bad_model.write_bytes(b"\x00\x01 not a protobuf")
  assert _error(str(bad_model)).startswith(
      f"data.tokenizer: could not load {bad_model} as a SentencePiece model: ")
  bad_config = tmp_path / "bad_config"
  shutil.copytree(bpe_dir, bad_config)
  (bad_config / "tokenizer_config.json").write_text("{not json")
  assert _error(str(bad_config)).startswith(
      f"data.tokenizer: {bad_config / 'tokenizer_config.json'} is not JSON: ")


# Special tokens


def test_sentencepiece_special_ids(sp_model):
  sp = tokenizer.get_tokenizer(str(sp_model))
  assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, -1)  # the trainer's defaults; no PAD
  assert sp.token_bytes[[0, 1, 2]].tolist() == [0, 0, 0]  # <unk>, <s>, </s>


def test_tokenizer_json_special_ids_from_names_and_configs(bpe_dir, tmp_path):
  hf = tokenizer.get_tokenizer(str(bpe_dir))
  endoftext = hf._tok.token_to_id("<|endoftext|>")  # pylint: disable=protected-access
  padding = hf._tok.token_to_id("<|padding|>")  # pylint: disable=protected-access
  # Found by name among the special tokens; GPT-2 style has no BOS.
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (-1, endoftext, padding)
  assert hf.token_bytes[[endoftext, padding]].tolist() == [0, 0]

  d = tmp_path / "with_config"
  shutil.copytree(bpe_dir, d)
  # tokenizer_config.json wins over special_tokens_map.json, which wins over names; null
  # means none; a token the vocabulary lacks falls back to the names.
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<|endoftext|>", "special": True}, "pad_token": None}))
  (d / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<|padding|>", "eos_token": "<absent>", "pad_token": "<|padding|>"}))
  hf = tokenizer.get_tokenizer(str(d))
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (endoftext, endoftext, -1)
  assert tokenizer.get_tokenizer(str(d / "tokenizer.json")).bos_id == endoftext


# Encode, decode, token_bytes


def test_byte_level_bpe_round_trip_and_exact_bytes(bpe_dir):
  hf = tokenizer.get_tokenizer(str(bpe_dir))
  assert hf.vocab_size == 800 and hf.token_bytes.shape == (800,)
  assert hf.token_bytes.dtype == np.int32 and not hf.token_bytes.flags.writeable
  for text in _texts():
    ids = hf.encode(text)
    assert ids.dtype == np.uint16 and ids.max() < hf.vocab_size
    assert hf.decode(ids) == text.encode("utf-8")
    assert hf.token_bytes[ids].sum() == len(text.encode("utf-8")), text[:20]
  # Fewer tokens than bytes on the text it was trained on.
  code = stdlib_text(STDLIB_SAMPLE[0])
  assert len(hf.encode(code)) < 0.6 * len(code.encode("utf-8"))


def test_byte_level_encode_adds_no_specials_and_keeps_spelled_ones_as_text(bpe_dir):
  hf = tokenizer.get_tokenizer(str(bpe_dir))
  text = "a = '<|endoftext|>'  # <|padding|>\n"
  ids = hf.encode(text)
  assert hf.eos_id not in ids.tolist() and hf.pad_id not in ids.tolist()
  assert hf.decode(ids) == text.encode("utf-8")
  assert hf.token_bytes[ids].sum() == len(text)
  # Decoding skips specials.
  assert hf.decode(np.concatenate([[hf.eos_id], ids, [hf.pad_id]])) == text.encode("utf-8")
  assert hf.decode([hf.eos_id, hf.vocab_size + 5]) == b""


def test_bytes_that_are_not_utf8_count_as_their_replacement(bpe_dir, sp_model):
  data = b"caf\xe9 = 1\n"  # latin-1
  replaced = data.decode("utf-8", errors="replace").encode("utf-8")
  hf = tokenizer.get_tokenizer(str(bpe_dir))
  assert hf.decode(hf.encode(data)) == replaced
  assert hf.token_bytes[hf.encode(data)].sum() == len(replaced)
  sp = tokenizer.get_tokenizer(str(sp_model))
  assert sp.decode(sp.encode(data)) == replaced


def test_gpt2_byte_table():
  table = tokenizer._unicode_to_byte()  # pylint: disable=protected-access
  assert sorted(table.values()) == list(range(256)) and len(table) == 256
  assert (table["Ā"], table["Ġ"], table["Ċ"], table["!"], table["ÿ"]) == (0, 32, 10, 33, 255)


def test_sentencepiece_round_trip_and_bytes_plus_the_dummy_prefix(sp_model):
  sp = tokenizer.get_tokenizer(str(sp_model))
  assert sp.vocab_size == 400
  model = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
  byte_ids = [i for i in range(sp.vocab_size) if model.is_byte(i)]
  assert len(byte_ids) == 256 and set(sp.token_bytes[byte_ids].tolist()) == {1}
  for text in _texts():
    ids = sp.encode(text)
    assert ids.dtype == np.uint16 and sp.bos_id not in ids.tolist()
    assert sp.decode(ids) == text.encode("utf-8")
    # One '▁' more than the text has spaces: the dummy prefix.
    assert sp.token_bytes[ids].sum() == len(text.encode("utf-8")) + 1, text[:20]
  assert sp.encode("").size == 0
  assert sp.decode([sp.bos_id, *sp.encode("x y"), sp.eos_id, 0]) == b"x y"


def _sentencepiece_style_json(directory, variant: str):
  """A tokenizer.json in the SentencePiece convention, as Mixtral's (byte fallback pieces
  <0xNN>, '▁' for spaces): with a Metaspace pre-tokenizer, or Prepend and Replace
  normalizers (the older conversion)."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                show_progress=False)
  tok.train_from_iterator([stdlib_text(n) for n in STDLIB_SAMPLE], trainer)
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
  if variant == "prepend_replace":
    spec["pre_tokenizer"] = None
    spec["normalizer"] = json.loads(normalizers.Sequence([
        normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]).__getstate__())
  directory.mkdir()
  (directory / "tokenizer.json").write_text(json.dumps(spec))
  return directory


@pytest.mark.parametrize("variant", ["metaspace", "prepend_replace"])
def test_sentencepiece_style_tokenizer_json(tmp_path, variant):
  hf = tokenizer.get_tokenizer(str(_sentencepiece_style_json(tmp_path / variant, variant)))
  assert hf.kind == "sentencepiece" and hf.vocab_size == 500 + 256
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, -1)
  assert hf.token_bytes[[0, 1, 2]].tolist() == [0, 0, 0]
  assert set(hf.token_bytes[500:].tolist()) == {1}  # <0xNN>
  for text in _texts():
    ids = hf.encode(text)
    # Metaspace prepends '▁' only to a text that does not start with one (the library's
    # way: such a text then loses its first space on decode); Prepend always does.
    prefixed = variant == "prepend_replace" or not text.startswith(" ")
    decoded = text if prefixed else text[1:]
    assert hf.decode(ids) == decoded.encode("utf-8")
    assert hf.token_bytes[ids].sum() == len(decoded.encode("utf-8")) + 1, text[:20]
  # Characters outside the vocabulary fall back to byte pieces, one byte each.
  assert len(hf.encode("漢")) == 1 + 3 and hf.token_bytes[hf.encode("漢")].sum() == 1 + 3


def test_other_tokenizer_json_warns_that_bytes_are_approximate(tmp_path):
  vocab = {"[UNK]": 0, "def": 1, "return": 2}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  with pytest.MonkeyPatch.context() as m:
    seen = []
    m.setattr(tokenizer.logging, "warning", lambda msg, *a: seen.append(msg % a))
    wl = tokenizer.get_tokenizer(str(tmp_path))
  assert wl.kind == "other" and wl.token_bytes.tolist() == [5, 3, 6]
  assert (wl.bos_id, wl.eos_id, wl.pad_id) == (-1, -1, -1)
  assert seen == [f"data.tokenizer: {tmp_path / 'tokenizer.json'} is neither byte-level nor "
                  "SentencePiece-style; token_bytes counts each token's own UTF-8 bytes, so "
                  "bits per byte are approximate"]


def test_id_dtype_and_a_vocabulary_past_uint16(tmp_path):
  assert tokenizer.id_dtype(259) == np.uint16 and tokenizer.id_dtype(1 << 16) == np.uint16
  assert tokenizer.id_dtype((1 << 16) + 1) == np.uint32
  big = tokenizer.get_tokenizer(str(write_word_level(tmp_path, 70_000)))
  assert big.vocab_size == 70_000
  ids = big.encode("w1 w65536 w69999")
  assert ids.dtype == np.uint32 and ids.tolist() == [1, 65536, 69999]
  assert big.decode(ids) == b"w1 w65536 w69999"


# save


def test_save_writes_what_loads_the_same_tokenizer(bpe_dir, sp_model, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(bpe_dir, src)
  (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
  (src / "special_tokens_map.json").write_text(json.dumps({"pad_token": None}))
  (src / "README.md").write_text("not a tokenizer file")
  hf = tokenizer.get_tokenizer(str(src / "tokenizer.json"))
  written = tokenizer.save(hf, tmp_path / "out" / "hf")
  assert sorted(p.name for p in written) == sorted(
      ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
  assert sorted(p.name for p in (tmp_path / "out" / "hf").iterdir()) == sorted(
      p.name for p in written)
  again = tokenizer.get_tokenizer(str(tmp_path / "out" / "hf"))
  assert (again.name, again.bos_id, again.eos_id, again.pad_id) == (
      hf.name, hf.bos_id, hf.eos_id, hf.pad_id)
  np.testing.assert_array_equal(again.token_bytes, hf.token_bytes)

  sp = tokenizer.get_tokenizer(str(sp_model))
  assert [p.name for p in tokenizer.save(sp, tmp_path / "out" / "sp")] == ["tokenizer.model"]
  again = tokenizer.get_tokenizer(str(tmp_path / "out" / "sp"))
  assert again.name == sp.name and again.encode(UNSEEN).tolist() == sp.encode(UNSEEN).tolist()

  assert tokenizer.save(tokenizer.ByteTokenizer(), tmp_path / "out" / "byte") == []
  assert not (tmp_path / "out" / "byte").exists()


def test_remote_load_and_save(fake_gcs, bpe_dir, sp_model):
  del fake_gcs
  from etils import epath  # pylint: disable=g-import-not-at-top
  remote = epath.Path("gs://bucket/models/tok")
  remote.mkdir(parents=True)
  (remote / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
  hf = tokenizer.get_tokenizer("gs://bucket/models/tok")
  assert hf.name == tokenizer.get_tokenizer(str(bpe_dir)).name
  tokenizer.save(hf, "gs://bucket/run/tokenizer")
  assert tokenizer.get_tokenizer("gs://bucket/run/tokenizer").name == hf.name
  (remote / "sp.model").write_bytes(sp_model.read_bytes())
  assert tokenizer.get_tokenizer("gs://bucket/models/tok/sp.model").vocab_size == 400
  assert _error("gs://bucket/nothing").startswith(
      "data.tokenizer: gs://bucket/nothing: no such file or directory")
