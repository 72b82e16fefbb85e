"""moex.data.records: the record encoding, shard names, the manifest, the shard check."""

import json

import numpy as np
import pytest
from etils import epath

from moex.data import records


def test_records_are_little_endian_ids():
  ids = np.array([1, 258, 65535], np.uint16)
  assert records.encode(ids) == b"\x01\x00\x02\x01\xff\xff"
  assert records.encode(ids.astype(">u2")) == records.encode(ids)  # whatever the host order
  assert records.decode(records.encode(ids), "uint16").tolist() == [1, 258, 65535]
  wide = np.array([70000], np.uint32)
  assert records.decode(records.encode(wide), "uint32").dtype == np.int32
  assert records.decode(records.encode(wide), "uint32").tolist() == [70000]


def test_shard_names():
  assert records.shard_name("val", 3, 12) == "val-00003-of-00012.arrayrecord"


def test_manifest_written_whole_and_read_back(tmp_path):
  assert records.read_manifest(epath.Path(tmp_path)) is None
  records.write_manifest(epath.Path(tmp_path), {"format": records.FORMAT, "shards": []})
  assert records.read_manifest(epath.Path(tmp_path)) == {"format": records.FORMAT,
                                                         "shards": []}
  assert [p.name for p in tmp_path.iterdir()] == [records.MANIFEST]  # no partial left


def test_check_shards_presence_and_size_and_old_manifests(tmp_path):
  (tmp_path / "train-00000-of-00001.arrayrecord").write_bytes(b"x" * 10)
  entry = {"name": "train-00000-of-00001.arrayrecord", "file_bytes": 10}
  records.check_shards(str(tmp_path), {"shards": [entry]})
  with pytest.raises(records.ShardError, match=r"^data.prepared: .*: shard train-00000-of-"
                     r"00001.arrayrecord holds 10 bytes, manifest.json records 11; re-run"):
    records.check_shards(str(tmp_path), {"shards": [{**entry, "file_bytes": 11}]})
  # A manifest written before sizes were recorded: presence is still checked.
  old = json.loads(json.dumps({"shards": [{"name": entry["name"]}]}))
  records.check_shards(str(tmp_path), old)
  with pytest.raises(records.ShardError, match="val-00000-of-00001.arrayrecord is missing"):
    records.check_shards(str(tmp_path), {"shards": [{"name": "val-00000-of-00001.arrayrecord"}]})
