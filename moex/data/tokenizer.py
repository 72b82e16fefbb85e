"""Tokenizers: map text bytes to token ids and back.

`data.tokenizer` is one of
  - "byte": one token per byte plus PAD, BOS and EOS (259 ids);
  - a Hugging Face `tokenizer.json` (the `tokenizers` library);
  - a SentencePiece `.model` (the `sentencepiece` library);
  - a directory holding `tokenizer.json` (preferred) or `tokenizer.model`: a Hugging Face
    model directory, or a moex workdir's `tokenizer/` (see `save`).
Paths go through etils.epath (gs:// works) and "~" is expanded. A bad path or a file that
does not load is a ValueError whose one line starts with "data.tokenizer: " and names it.

Special ids: `bos_id`, `eos_id` and `pad_id` are -1 when the tokenizer has no such token.
moex packs each document as [BOS] + text + [EOS], leaving out whichever is absent (so EOS
alone, or BOS alone, still marks the boundaries; with neither, documents run together).
Nothing in moex pads (windows are packed), so a missing PAD changes nothing. For a
tokenizer.json they come from an adjacent tokenizer_config.json or special_tokens_map.json
(bos_token, eos_token, pad_token; a key set to null means none), else from the usual names
among its special tokens (<s>, </s>, <|endoftext|>, <pad>, ...); SentencePiece says itself.

`encode` never adds special tokens, and text that spells one ("<|endoftext|>" in a source
file) is encoded as plain text, so training text never holds control tokens. Bytes that are
not UTF-8 are replaced by U+FFFD (3 bytes) first, since both libraries take str.

`token_bytes[i]` is the number of UTF-8 text bytes token i stands for (0 for special tokens)
so that bits per byte follow from token cross-entropy. How exact sum(token_bytes[ids]) is
against len(text.encode()) for ids = encode(text), by kind:
  - "byte" and byte-level BPE (GPT-2, Llama 3, Qwen: a ByteLevel pre-tokenizer or decoder;
    each token maps back to bytes through GPT-2's bytes_to_unicode table): exact, counting
    the text after the tokenizer's normalizer (none for GPT-2 and Llama 3, NFC for Qwen)
    and without ByteLevel's add_prefix_space (when set: +1 for a text that does not start
    with whitespace).
  - SentencePiece (.model, or a tokenizer.json with a Metaspace pre-tokenizer or the '▁'
    convention, as Mixtral's): '▁' counts one space byte and a byte-fallback piece <0xNN>
    one byte. The dummy prefix (add_dummy_prefix, Metaspace's prepend_scheme, a Prepend
    normalizer) adds one '▁' to every encoded text, so the sum is len(text) + 1 per
    non-empty document: an overcount of one byte per file, a known approximation.
    (Metaspace adds none to a text that starts with a space, which instead decodes
    without it: the sum is then len(text).) Exact otherwise only with identity
    normalization and no whitespace collapsing (remove_extra_whitespaces False, as in
    Llama and Mistral models).
  - any other tokenizer.json (WordPiece, ...): each token's own UTF-8 length, which misses
    the whitespace the pre-tokenizer drops; loading one logs a warning that bits per byte
    are approximate.
"""

import functools
import hashlib
import json
import os
import re
import types
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import sentencepiece
import tokenizers
from absl import logging
from etils import epath

# File names a tokenizer directory holds (what `save` writes).
HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
# Files next to the tokenizer that name its special tokens; saved with it.
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")

# Usual special-token spellings, in order of preference, when no config names them.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_METASPACE = "\u2581"  # '▁'
_USAGE = ('use "byte", a tokenizer.json, a SentencePiece .model or a directory holding'
          f" {HF_FILE} or {SP_FILE}")


class Tokenizer(Protocol):
  """What the data pipeline and the trainer need from a tokenizer (ids -1 = absent)."""

  name: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  token_bytes: np.ndarray
  files: Mapping[str, bytes]  # what recreates it, by the name `save` writes it under

  def encode(self, data: bytes | str) -> np.ndarray: ...

  def encode_batch(self, docs: Sequence[bytes | str]) -> list[np.ndarray]: ...

  def decode(self, ids: np.ndarray) -> bytes: ...


def id_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype that holds ids 0..vocab_size-1 (uint16 or uint32)."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _text(data: bytes | str) -> str:
  return data if isinstance(data, str) else data.decode("utf-8", errors="replace")


def _frozen(token_bytes: np.ndarray) -> np.ndarray:
  token_bytes.flags.writeable = False
  return token_bytes


class ByteTokenizer:
  """One token per byte (0..255) plus PAD, BOS and EOS."""

  name = "byte"
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259
  files = types.MappingProxyType({})

  def __init__(self):
    # Bytes each token stands for, so that bits per byte can be computed from
    # token-level cross-entropy; specials carry no text.
    token_bytes = np.zeros([self.vocab_size], np.int32)
    token_bytes[:256] = 1
    self.token_bytes = _frozen(token_bytes)

  def encode(self, data: bytes | str) -> np.ndarray:
    """Returns the uint16 ids of `data` (a str is UTF-8 encoded first)."""
    if isinstance(data, str):
      data = data.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

  def encode_batch(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
    """encode of each document."""
    return [self.encode(d) for d in docs]

  def decode(self, ids) -> bytes:
    """Returns the bytes of `ids`, skipping special tokens."""
    ids = np.asarray(ids).reshape(-1)
    return ids[ids < 256].astype(np.uint8).tobytes()


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
  """The inverse of GPT-2's bytes_to_unicode: the byte each byte-level character stands for."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:  # unprintable bytes are shifted past 255, in byte order
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _byte_level_bytes(piece: str) -> int:
  """Bytes of a byte-level BPE token (a character outside the table counts its UTF-8)."""
  table = _unicode_to_byte()
  return sum(1 if c in table else len(c.encode("utf-8")) for c in piece)


def _sentencepiece_bytes(piece: str, replacement: str = _METASPACE,
                         byte_fallback: bool = True) -> int:
  """Bytes of a SentencePiece-style piece: '▁' is a space, <0xNN> one byte."""
  if byte_fallback and _BYTE_PIECE.fullmatch(piece):
    return 1
  return len(piece.replace(replacement, " ").encode("utf-8"))


def _nodes(node):
  """Every dict in a tokenizer.json component (Sequence members included)."""
  if isinstance(node, dict):
    yield node
    for value in node.values():
      yield from _nodes(value)
  elif isinstance(node, list):
    for value in node:
      yield from _nodes(value)


def _piece_counter(spec: dict):
  """(kind, bytes-of-piece function) for the model vocabulary of a tokenizer.json."""
  parts = [spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")]
  nodes = [n for p in parts for n in _nodes(p)]
  model = spec.get("model") or {}
  if any(n.get("type") == "ByteLevel" for n in nodes):
    return "byte-level", _byte_level_bytes
  metaspace = [n for n in nodes if n.get("type") == "Metaspace"]
  replaces = any(n.get("type") == "Replace" and _METASPACE in (
      n.get("content"), (n.get("pattern") or {}).get("String")) for n in nodes)
  byte_fallback = bool(model.get("byte_fallback"))
  if metaspace or replaces or byte_fallback:
    replacement = metaspace[0].get("replacement", _METASPACE) if metaspace else _METASPACE
    return "sentencepiece", functools.partial(
        _sentencepiece_bytes, replacement=replacement, byte_fallback=byte_fallback)
  prefix = model.get("continuing_subword_prefix") or ""
  return "other", lambda piece: len(piece.removeprefix(prefix).encode("utf-8"))


def _config_token(configs: Sequence[dict], key: str) -> tuple[bool, str | None]:
  """(found, content) of `key` (e.g. "eos_token") in the first config that sets it."""
  for config in configs:
    if key in config:
      value = config[key]
      if isinstance(value, dict):
        value = value.get("content")
      return True, value if isinstance(value, str) else None
  return False, None


def _hf_special_id(tok: tokenizers.Tokenizer, specials: Mapping[str, int],
                   configs: Sequence[dict], key: str, names: Sequence[str]) -> int:
  """The id of a special token: named by a config, else the first usual name present."""
  found, content = _config_token(configs, key)
  if found:
    token_id = tok.token_to_id(content) if content is not None else None
    if token_id is not None or content is None:
      return -1 if token_id is None else int(token_id)
  return next((specials[n] for n in names if n in specials), -1)


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer read from the bytes of a tokenizer.json."""

  def __init__(self, path: epath.Path, data: bytes, extra: Mapping[str, bytes]):
    """`extra`: tokenizer_config.json / special_tokens_map.json found next to `path`."""
    self.path = path
    self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    self._tok.encode_special_tokens = True  # text spelling "</s>" stays text
    self.name = "hf:" + hashlib.sha256(data).hexdigest()[:16]
    self.files = types.MappingProxyType({HF_FILE: data, **extra})
    added = self._tok.get_added_tokens_decoder()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                          max(vocab.values(), default=-1) + 1)
    self.dtype = id_dtype(self.vocab_size)
    specials = {t.content: i for i, t in added.items() if t.special}
    configs = [json.loads(extra[n]) for n in CONFIG_FILES if n in extra]
    self.bos_id = _hf_special_id(self._tok, specials, configs, "bos_token", _BOS_NAMES)
    self.eos_id = _hf_special_id(self._tok, specials, configs, "eos_token", _EOS_NAMES)
    self.pad_id = _hf_special_id(self._tok, specials, configs, "pad_token", _PAD_NAMES)
    self.kind, self.token_bytes = self._token_bytes(json.loads(data), added)
    if self.kind == "other":
      logging.warning("data.tokenizer: %s is neither byte-level nor SentencePiece-style; "
                      "token_bytes counts each token's own UTF-8 bytes, so bits per byte "
                      "are approximate", path)

  def _token_bytes(self, spec: dict, added: Mapping) -> tuple[str, np.ndarray]:
    """(kind, token_bytes [vocab_size] int32): see the module docstring."""
    kind, count = _piece_counter(spec)
    token_bytes = np.zeros([self.vocab_size], np.int32)
    for piece, i in self._tok.get_vocab(with_added_tokens=False).items():
      token_bytes[i] = count(piece)
    for i, token in added.items():  # added tokens match raw text; specials stand for none
      token_bytes[i] = 0 if token.special else len(token.content.encode("utf-8"))
    return kind, _frozen(token_bytes)

  def encode(self, data: bytes | str) -> np.ndarray:
    """The ids of `data`, no special tokens added."""
    return self.encode_batch([data])[0]

  def encode_batch(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
    """encode of each document, in parallel (the library's thread pool)."""
    batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
    encodings = batch([_text(d) for d in docs], add_special_tokens=False)
    return [np.asarray(e.ids, self.dtype) for e in encodings]

  def decode(self, ids) -> bytes:
    """The UTF-8 text of `ids`, skipping special tokens and ids past the vocabulary."""
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    return self._tok.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8")


class SPTokenizer:
  """A SentencePiece model read from the bytes of a .model file."""

  def __init__(self, path: epath.Path, data: bytes, extra: Mapping[str, bytes]):
    """`extra`: config files found next to `path`, saved with it (ids come from the model)."""
    self.path = path
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    self.name = "sp:" + hashlib.sha256(data).hexdigest()[:16]
    self.files = types.MappingProxyType({SP_FILE: data, **extra})
    self.kind = "sentencepiece"
    self.vocab_size = int(self._sp.get_piece_size())
    self.dtype = id_dtype(self.vocab_size)
    self.bos_id, self.eos_id = int(self._sp.bos_id()), int(self._sp.eos_id())
    self.pad_id = int(self._sp.pad_id())
    sp = self._sp
    self._special = np.array([sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                              for i in range(self.vocab_size)], bool)
    token_bytes = np.array([0 if self._special[i] else 1 if sp.is_byte(i)
                            else _sentencepiece_bytes(sp.id_to_piece(i), byte_fallback=False)
                            for i in range(self.vocab_size)], np.int32)
    self.token_bytes = _frozen(token_bytes)

  def encode(self, data: bytes | str) -> np.ndarray:
    """The ids of `data`, without BOS/EOS."""
    return self.encode_batch([data])[0]

  def encode_batch(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
    """encode of each document, in parallel (the library's threads)."""
    ids = self._sp.encode([_text(d) for d in docs], out_type=int)
    return [np.asarray(i, self.dtype) for i in ids]

  def decode(self, ids) -> bytes:
    """The UTF-8 text of `ids`, skipping control, unknown and out-of-vocabulary ids."""
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    ids = ids[~self._special[ids]]
    return self._sp.decode(ids.tolist()).encode("utf-8")


def _read(path: epath.Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise ValueError(f"data.tokenizer: could not read {path}: {e}") from None


def _read_json(path: epath.Path) -> bytes:
  """The bytes of a JSON config file, checked to parse."""
  data = _read(path)
  try:
    json.loads(data)
  except ValueError as e:
    raise ValueError(f"data.tokenizer: {path} is not JSON: {e}") from None
  return data


def _locate(spec: str) -> epath.Path:
  """The tokenizer file `spec` names (a file, or a directory's tokenizer.json / .model)."""
  path = epath.Path(os.path.expanduser(spec))
  if not path.exists():
    raise ValueError(f"data.tokenizer: {path}: no such file or directory; {_USAGE}")
  if not path.is_dir():
    return path
  for name in (HF_FILE, SP_FILE):
    if (path / name).is_file():
      return path / name
  raise ValueError(f"data.tokenizer: directory {path} holds neither {HF_FILE} nor {SP_FILE}")


def _load(path: epath.Path) -> Tokenizer:
  """Reads the tokenizer file at `path` and the config files next to it."""
  data = _read(path)
  extra = {n: _read_json(path.parent / n) for n in CONFIG_FILES if (path.parent / n).is_file()}
  is_json = path.suffix == ".json" or data.lstrip()[:1] == b"{"
  cls = HFTokenizer if is_json else SPTokenizer
  try:
    return cls(path, data, extra)
  except Exception as e:  # pylint: disable=broad-except  (the libraries raise bare ones)
    kind = "Hugging Face tokenizer.json" if is_json else "SentencePiece model"
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"data.tokenizer: could not load {path} as a {kind}: {reason}") from None


def get_tokenizer(spec: str) -> Tokenizer:
  """Returns the tokenizer `spec` (config data.tokenizer) names: "byte" or a path."""
  if spec == "byte":
    return ByteTokenizer()
  if not spec.strip():
    raise ValueError(f"data.tokenizer: empty; {_USAGE}")
  return _load(_locate(spec))


def save(tok: Tokenizer, directory: str | os.PathLike) -> list[epath.Path]:
  """Writes the files that recreate `tok` into `directory` (made if needed); returns them.

  get_tokenizer(directory) then loads the same tokenizer. "byte" has none: nothing is
  written and no directory made.
  """
  if not tok.files:
    return []
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  for name, data in tok.files.items():
    (directory / name).write_bytes(data)
    written.append(directory / name)
  return written
