"""python -m moex.data.prepare: a killed worker resumed byte-identical, one-line refusals,
no RuntimeWarning (the command module is imported once)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_text import write_jsonl_corpus
from moex.data import preparing, records

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _options(**kw):
  return preparing.Options(tokenizer=kw.pop("tokenizer", "byte"), **kw)


def _files(directory) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(directory).iterdir())}


@pytest.mark.slow
def test_killed_worker_resumes_to_identical_output(tmp_path):
  """A worker SIGKILLed mid-shard: the run fails in one line and leaves no finished-looking
  shard; re-running completes it, byte-identical to an uninterrupted in-process run."""
  glob = write_jsonl_corpus(tmp_path / "in", files=6, docs=1200)
  reference = tmp_path / "reference"
  preparing.prepare_shards(glob, str(reference), _options(val_fraction=0.1, shard_mb=0.1))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "moex.data.prepare", f"--inputs={glob}", f"--output={out}",
         "--val_fraction=0.1", "--shard_mb=0.1", "--workers=1"]
  env = {**os.environ, preparing.KILL_ENV: "2:5", "PYTHONPATH": str(ROOT)}
  killed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert killed.returncode == 2  # a refusal (moex.cli.run)
  assert killed.stderr.strip().splitlines()[-1].startswith(
      "moex.data.prepare: a worker process died")
  manifest = json.loads((out / records.MANIFEST).read_text())
  assert not manifest["complete"]
  assert sorted({s["unit"] for s in manifest["shards"]}) == [0, 1]
  assert list(out.glob("train-00002-*.partial-*"))  # the killed unit's shard, not renamed
  assert not list(out.glob("train-00002-*.arrayrecord"))
  env.pop(preparing.KILL_ENV)
  resumed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming: 2 of" in resumed.stderr
  assert _files(out) == _files(reference)
  assert "RuntimeWarning" not in killed.stderr + resumed.stderr


def _prepare_cli(*flags):
  return subprocess.run([sys.executable, "-m", "moex.data.prepare", *flags], cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                        text=True, timeout=120)


def test_output_that_is_a_file_is_one_line(tmp_path):
  """Issue 25 #5: --output naming a file is refused in one line, not a FileExistsError."""
  glob = write_jsonl_corpus(tmp_path / "in", files=1, docs=10)
  target = tmp_path / "notes.txt"
  target.write_text("a user's file\n")
  r = _prepare_cli(f"--inputs={glob}", f"--output={target}", "--workers=0")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      f"moex.data.prepare: --output={target}: is a file, not a directory")
  assert target.read_text() == "a user's file\n"
  r = _prepare_cli(f"--inputs={glob}", f"--output={target}/below", "--workers=0")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"moex.data.prepare: --output={target}/below: ")


def test_no_runtime_warning_with_workers(tmp_path):
  """Issue 25 #7: running the command (and its spawned workers) imports it only once."""
  glob = write_jsonl_corpus(tmp_path / "in", files=2, docs=20)
  r = _prepare_cli(f"--inputs={glob}", f"--output={tmp_path / 'out'}", "--workers=2",
                   "--shard_mb=0.001")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "RuntimeWarning" not in r.stderr, r.stderr[-2000:]
  assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]
