"""Runs a tests/multidevice/ script on 8 simulated CPU devices, in a subprocess (the device
count is fixed when jax starts), and returns the JSON lines it printed."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(script: str, timeout: int = 900) -> tuple[str, list[dict]]:
  """(stdout, the lines of stdout that are JSON objects) of tests/multidevice/SCRIPT; fails
  the test, with the end of stderr, when the script exits non-zero."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice" / script)],
                     capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout, [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
