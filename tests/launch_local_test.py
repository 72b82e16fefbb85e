"""launch/local.sh: 2 processes x 4 simulated devices train, are preempted (SIGTERM to one
process), agree on a step, checkpoint, resume, and match a 1-process 8-device run step for
step; the checkpoint then moves to a 1-device mesh and training continues. A process killed
mid-run stops the other within seconds, and local.sh's last line names it."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # every test here launches processes or devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12


def _flags(corpus, workdir, steps=STEPS, mesh=(("data", 2), ("expert", 4))):
  flags = [
      "--config=experiments/tiny.py", f"--workdir={workdir}",
      "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
      "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.d_ff=64",
      "--config.moe.d_expert=32", f"--config.data.source={corpus}",
      "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.data.eval_batches=1",
      "--config.data.val_fraction=0.2", f"--config.train.steps={steps}",
      "--config.train.log_every=1", "--config.train.eval_every=100",
      "--config.train.checkpoint_every=100", "--config.opt.warmup_steps=2",
  ]
  return flags + [f"--config.mesh.{a}={n}" for a, n in mesh]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _local(flags, devices=4, **kw):
  return subprocess.Popen(["bash", str(ROOT / "launch" / "local.sh"), "-n", "2", "-d",
                           str(devices), "--", *flags], cwd=ROOT, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _process_one_pid(workdir):
  out = subprocess.run(["pgrep", "-f", f"moex.main.*{workdir}"], capture_output=True, text=True)
  for pid in out.stdout.split():
    try:
      with open(f"/proc/{pid}/environ", "rb") as f:
        if b"MOEX_PROCESS_ID=1\0" in f.read():
          return int(pid)
    except OSError:
      continue
  return None


@pytest.fixture(scope="module")
def corpus_glob(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  for i in range(12):
    (d / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n"
                                        for j in range(60)))
  return str(d / "*.py")


def test_preempt_resume_and_match_single_process(corpus_glob, tmp_path, monkeypatch):
  monkeypatch.setenv("MOEX_CACHE_DIR", str(tmp_path / "cache"))
  single = tmp_path / "single"
  r = subprocess.run([sys.executable, "-m", "moex.main", *_flags(corpus_glob, single)],
                     cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  multi = tmp_path / "multi"
  proc = _local(_flags(corpus_glob, multi))
  deadline = time.time() + 300
  while time.time() < deadline:  # wait for a few steps, then preempt process 1 only
    if (multi / "metrics.jsonl").exists() and max(_losses(multi), default=0) >= 3:
      break
    time.sleep(0.5)
  pid = _process_one_pid(multi)
  assert pid is not None
  os.kill(pid, signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  stopped = sorted(int(s) for s in os.listdir(multi / "checkpoints"))
  assert len(stopped) == 1 and 3 <= stopped[0] < STEPS, (stopped, out[-2000:])
  assert out.count("stopped (preemption (SIGTERM)) at step") == 2, out[-3000:]

  proc = _local(_flags(corpus_glob, multi))  # the same command resumes
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-5), step

  # The 8-device (data=2, expert=4) checkpoint restored onto 1 device continues the run.
  onto_one = tmp_path / "onto_one"
  os.makedirs(onto_one)
  subprocess.run(["cp", "-r", str(multi / "checkpoints"), str(onto_one)], check=True)
  r = subprocess.run([sys.executable, "-m", "moex.main",
                      *_flags(corpus_glob, onto_one, steps=STEPS + 2, mesh=())],
                     cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  c = _losses(onto_one)
  assert sorted(c) == [STEPS + 1, STEPS + 2]
  r = subprocess.run([sys.executable, "-m", "moex.main",
                      *_flags(corpus_glob, single, steps=STEPS + 2)],
                     cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  a = _losses(single)
  for step in (STEPS + 1, STEPS + 2):
    assert c[step] == pytest.approx(a[step], rel=1e-5), step


def test_killed_process_stops_the_other_and_is_named_last(corpus_glob, tmp_path, monkeypatch):
  from moex.train import flops

  cache = tmp_path / "cache"
  cache.mkdir()  # a made-up CPU peak: measuring it would cost each process ~20 s
  (cache / "cpu_peak.json").write_text(json.dumps({"key": flops._cpu_key(), "flops": 1e10}))
  monkeypatch.setenv("MOEX_CACHE_DIR", str(cache))
  workdir = tmp_path / "killed"
  # One device per process: the smallest mesh across two processes compiles fastest.
  proc = _local(_flags(corpus_glob, workdir, steps=100_000, mesh=(("data", 2),)), devices=1)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait until both are training
      if (workdir / "metrics.jsonl").exists() and max(_losses(workdir), default=0) >= 2:
        break
      time.sleep(0.5)
    pid = _process_one_pid(workdir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    # Without the fix the survivor waited for the heartbeat timeout (about 50 s), then aborted.
    out, _ = proc.communicate(timeout=30)
    seconds = time.time() - killed
  finally:
    left = subprocess.run(["pgrep", "-f", f"moex.main.*{workdir}"], capture_output=True,
                          text=True).stdout.split()
    for p in left:  # so that a failure here does not leave processes behind
      os.kill(int(p), signal.SIGKILL)
    proc.kill()
  assert not left, left
  assert proc.returncode == 128 + signal.SIGKILL, out[-3000:]
  assert seconds < 30, seconds
  last = out.strip().splitlines()[-1]
  assert last == f"local.sh: process 1 (pid {pid}) exited with 137; stopped the others", \
      out[-3000:]
