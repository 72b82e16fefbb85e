"""Tests for moex/data/tokenizer.py."""

import numpy as np
import pytest

from moex.data import tokenizer


def test_byte_tokenizer_constants():
  tok = tokenizer.ByteTokenizer()
  assert (tok.name, tok.vocab_size) == ("byte", 259)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)


def test_encode_is_bytes_as_uint16():
  tok = tokenizer.ByteTokenizer()
  ids = tok.encode(b"\x00az\xff")
  assert ids.dtype == np.uint16
  np.testing.assert_array_equal(ids, [0, 97, 122, 255])
  assert tok.encode(b"").shape == (0,)


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


def test_get_tokenizer():
  assert isinstance(tokenizer.get_tokenizer("byte"), tokenizer.ByteTokenizer)
  with pytest.raises(ValueError) as e:
    tokenizer.get_tokenizer("bpe")
  assert str(e.value) == "data.tokenizer: unknown tokenizer 'bpe' (known: byte)"
