"""moex/compare.py, the command: its output, and a bad input as one line (exit 2)."""

import json
import pathlib
import subprocess
import sys

import pytest
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "moex.compare", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_importing_the_command_defines_none_of_its_flags():
  import moex.compare  # pylint: disable=import-outside-toplevel
  assert not {"workdirs", "labels"} & set(flags.FLAGS)
  assert callable(moex.compare.define_flags)


@pytest.mark.slow
def test_the_command_prints_the_table_and_refuses_a_missing_workdir(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "metrics.jsonl").write_text(
      json.dumps({"step": 0, "split": "eval", "loss": 1.0, "bits_per_byte": 2.5}) + "\n")
  r = _run(f"--workdirs={tmp_path / 'a'}", f"--out={tmp_path / 'c.png'}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| a | 2.5000 |" in r.stdout and (tmp_path / "c.png").stat().st_size > 1000
  r = _run(f"--workdirs={tmp_path / 'a'},{tmp_path / 'b'}", f"--out={tmp_path / 'c.png'}")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"moex.compare: --workdirs: {tmp_path / 'b'}: no such directory")
