"""Tokenizers: map raw bytes to token ids and back."""

from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  """What the data pipeline and the trainer need from a tokenizer."""

  name: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  token_bytes: np.ndarray

  def encode(self, data: bytes) -> np.ndarray: ...

  def decode(self, ids: np.ndarray) -> bytes: ...


class ByteTokenizer:
  """One token per byte (0..255) plus PAD, BOS and EOS."""

  name = "byte"
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def __init__(self):
    # Bytes each token stands for, so that bits per byte can be computed from
    # token-level cross-entropy; specials carry no text.
    token_bytes = np.zeros([self.vocab_size], np.int32)
    token_bytes[:256] = 1
    token_bytes.flags.writeable = False
    self.token_bytes = token_bytes

  def encode(self, data: bytes | str) -> np.ndarray:
    """Returns the uint16 ids of `data` (a str is UTF-8 encoded first)."""
    if isinstance(data, str):
      data = data.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

  def decode(self, ids) -> bytes:
    """Returns the bytes of `ids`, skipping special tokens."""
    ids = np.asarray(ids).reshape(-1)
    return ids[ids < 256].astype(np.uint8).tobytes()


_TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
  """Returns the tokenizer called `name`."""
  if name not in _TOKENIZERS:
    known = ", ".join(sorted(_TOKENIZERS))
    raise ValueError(
        f"data.tokenizer: unknown tokenizer {name!r} (known: {known})"
    )
  return _TOKENIZERS[name]()
