"""moex/parallel/distributed.py: when one of two processes dies, the other stops at once with
one line; when one hangs, the heartbeat stops the other within seconds."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from moex.parallel import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Two processes of one device each, gathering a counter across processes (a gloo collective)
# until they are stopped; `ready` once the first collective went through.
_WORKER = """
import time
import numpy as np
from jax.experimental import multihost_utils
from moex.parallel import distributed

distributed.initialize()

@distributed.exiting_on_failure()
def run():
  for i in range(100_000):
    multihost_utils.process_allgather(np.int32(i))
    if i == 0:
      print("ready", flush=True)
    time.sleep(0.05)

run()
"""


def _start_pair():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               MOEX_COORDINATOR_ADDRESS=f"localhost:{port}", MOEX_NUM_PROCESSES="2",
               MOEX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:  # gloo prints its own line on stdout first
    if not any(line.strip() == "ready" for line in p.stdout):
      raise AssertionError(p.communicate(timeout=60))
  return procs


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_survivor_stops_within_seconds(how):
  survivor, victim = _start_pair()
  try:
    os.kill(victim.pid, how)
    start = time.time()
    # Before: a dead peer left the survivor in JAX's shutdown barrier until the heartbeat
    # timeout (then a C++ abort); a hung one was noticed after the 60 s heartbeat.
    _, err = survivor.communicate(timeout=30)
    seconds = time.time() - start
  finally:
    for p in (survivor, victim):
      p.kill()
      p.wait()
  assert seconds < 30, seconds
  assert survivor.returncode != 0
  if how == signal.SIGKILL:  # a dead peer: our one line, last, and no stack dump
    assert survivor.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("moex: process 0 of 2 stopped: a collective failed"), err[-3000:]
    assert "re-run the same command" in last and "Fatal Python error" not in err, err[-3000:]


def _fake_multiprocess(monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)

  def fake_exit(code):
    raise SystemExit(f"os._exit({code})")
  monkeypatch.setattr(distributed.os, "_exit", fake_exit)


def test_other_errors_print_their_traceback_then_one_line(monkeypatch, capsys):
  _fake_multiprocess(monkeypatch)
  with pytest.raises(SystemExit, match=r"os._exit\(1\)"):
    with distributed.exiting_on_failure():
      raise OSError("disk full")
  err = capsys.readouterr().err
  assert "Traceback" in err and "OSError: disk full" in err
  assert err.strip().splitlines()[-1].startswith(
      "moex: process 1 of 2 stopped: this process failed: see the traceback above (disk full)")


def test_one_process_raises_as_usual():
  with pytest.raises(OSError, match="disk full"):
    with distributed.exiting_on_failure():
      raise OSError("disk full")
