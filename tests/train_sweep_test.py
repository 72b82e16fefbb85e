"""moex/train/sweep.py, the library: refusals before anything runs, and a SIGTERM that reaches
the running variant (which checkpoints) instead of orphaning it."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from moex.train import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bad_config_seeds_root_or_order_is_one_line(tmp_path):
  (tmp_path / "none.py").write_text("def get_config(arg=None):\n  return None\n")
  (tmp_path / "dep.py").write_text("VARIANTS = ('a', 'b')\nINIT_FROM = {'b': 'a'}\n"
                                   "def get_config(arg=None):\n  return None\n")
  (tmp_path / "file").write_text("x")
  dep = str(tmp_path / "dep.py")
  for kwargs, line in [
      ({"config": str(tmp_path / "nope.py")}, f"--config: no such file {tmp_path / 'nope.py'}"),
      ({"config": str(tmp_path / "none.py")},
       f"{tmp_path / 'none.py'} has no VARIANTS; pass --variants"),
      ({"config": dep, "seeds": ["1", "x"]}, "--seeds: not a list of integers: 1,x"),
      ({"config": dep, "bench_steps": -1}, "--bench_steps=-1: must be 0 (no timing) or more"),
      ({"config": dep, "root": str(tmp_path / "file")},
       f"--root={tmp_path / 'file'}: is a file, not a folder"),
      ({"config": dep, "variants": ["b", "a"]},
       f"{dep}: INIT_FROM['b'] = 'a' must be a variant listed before 'b'")]:
    with pytest.raises(sweep.SweepError) as e:
      sweep.sweep(**{"root": str(tmp_path / "root"), **kwargs})
    assert str(e.value) == line


@pytest.mark.slow
def test_sigterm_reaches_the_running_variant_which_checkpoints(tiny_config, tmp_path):
  tiny_config.train.steps = 400
  tiny_config.train.eval_every = 400
  (tmp_path / "exp.py").write_text(
      "import ml_collections\nVARIANTS = ('a',)\n"
      f"def get_config(arg=None):\n  return ml_collections.ConfigDict({tiny_config.to_dict()!r})\n")
  cmd = [sys.executable, "-m", "moex.sweep", f"--config={tmp_path / 'exp.py'}",
         f"--root={tmp_path / 'root'}", "--bench_steps=0"]
  p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  log, metrics = tmp_path / "root" / "a.log", tmp_path / "root" / "a" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (  # a train line: the loop is in its steps
      metrics.exists() and '"split": "train"' in metrics.read_text()):
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=240)
  assert p.returncode == 2, err[-3000:]
  assert err.strip().splitlines()[-1].startswith(
      "moex.sweep: stopped by SIGTERM during variant 'a'"), err[-3000:]
  text = log.read_text()
  assert "received signal 15: checkpointing" in text, (err.strip().splitlines()[-1], text[-3000:])  # the run saw it and checkpointed
  assert not (tmp_path / "root" / "a" / "lock").exists()  # and let go of its workdir
  assert os.listdir(tmp_path / "root" / "a" / "checkpoints")
