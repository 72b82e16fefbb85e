"""The on-disk format of a prepared dataset, written by moex.data.preparing and read by
moex.data.shards: shard names, the record encoding and manifest.json.

A prepared directory holds `{split}-{unit:05d}-of-{units:05d}.arrayrecord` for split in
SPLITS and every unit, and manifest.json. Each record is one document: the little-endian
bytes of its ids in the manifest's "id_dtype" (moex.data.tokenizer.id_dtype), BOS/EOS
included. The manifest (FORMAT "moex.prepared/1") holds:

  format, tokenizer (tokenizer_identity), id_dtype, options (format, text_field,
  val_fraction, shard_mb), inputs ([path, bytes] each), complete (true only at the end),
  shards: one entry per shard file {name, split, unit, documents, tokens, text_bytes,
  file_bytes, errors}, and totals per split (when complete).

`file_bytes` is the shard's size on disk; check_shards compares it with the file at
start-up (an entry without it, from an older manifest, is checked for presence only).
"""

from __future__ import annotations

import hashlib
import json
import os

from etils import epath
import numpy as np

from moex import errors

MANIFEST = "manifest.json"
FORMAT = "moex.prepared/1"
SPLITS = ("train", "val")
SUFFIX = ".arrayrecord"
# One record per group: every document is read alone (random access, as grain reads it).
WRITER_OPTIONS = "group_size:1"


class ShardError(ValueError, errors.Refusal):
  """A prepared directory that cannot be read; the one line names the shard (and record)."""


def shard_name(split: str, unit: int, units: int) -> str:
  return f"{split}-{unit:05d}-of-{units:05d}{SUFFIX}"


def record_dtype(id_dtype: str | np.dtype) -> np.dtype:
  """The dtype records are stored in: the manifest's id_dtype, little-endian."""
  return np.dtype(id_dtype).newbyteorder("<")


def encode(ids: np.ndarray) -> bytes:
  """One document's ids as a record."""
  return ids.astype(record_dtype(ids.dtype), copy=False).tobytes()


def decode(record: bytes, id_dtype: str | np.dtype) -> np.ndarray:
  """A record's ids as int32."""
  return np.frombuffer(record, record_dtype(id_dtype)).astype(np.int32)


def tokenizer_identity(tok) -> dict:
  """What identifies a tokenizer's ids: its name, size, specials and a hash of its files."""
  digest = hashlib.sha256()
  for name in sorted(tok.files):
    digest.update(name.encode() + b"\0" + hashlib.sha256(tok.files[name]).digest())
  return {"name": tok.name, "vocab_size": int(tok.vocab_size), "bos_id": int(tok.bos_id),
          "eos_id": int(tok.eos_id), "files_sha256": digest.hexdigest()}


def is_local(path: str) -> bool:
  return "://" not in path


def read_manifest(directory: epath.Path) -> dict | None:
  """DIR/manifest.json, or None when there is none."""
  path = epath.Path(directory) / MANIFEST
  return json.loads(path.read_text()) if path.exists() else None


def write_manifest(directory: epath.Path, manifest: dict) -> None:
  """Writes manifest.json so that a reader never sees half of it (a GCS object appears
  whole; a local file is renamed into place)."""
  directory = epath.Path(directory)
  text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
  if is_local(str(directory)):
    tmp = directory / f"{MANIFEST}.partial-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, directory / MANIFEST)
  else:
    (directory / MANIFEST).write_text(text)


def shard_problem(directory: epath.Path, entry: dict) -> str | None:
  """Why the shard of manifest `entry` is not as recorded (missing, other size), or None."""
  path = epath.Path(directory) / entry["name"]
  if not path.exists():
    return f"shard {entry['name']} is missing"
  want = entry.get("file_bytes")
  if want is not None:
    have = int(path.stat().length)
    if have != want:
      return f"shard {entry['name']} holds {have} bytes, {MANIFEST} records {want}"
  return None


def check_shards(directory: str, manifest: dict) -> None:
  """Refuses in one line the first shard the manifest lists that is missing or whose size
  differs from the manifest's (before any reader opens it)."""
  for entry in manifest.get("shards", []):
    problem = shard_problem(epath.Path(directory), entry)
    if problem is not None:
      raise ShardError(f"data.prepared: {directory}: {problem}; re-run the moex.data.prepare "
                       f"command that made it (it rewrites that shard)")
