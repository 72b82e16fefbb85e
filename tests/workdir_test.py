"""Tests for moex/workdir.py: the Workdir object (config, tokenizer, weights, finished), one run
per workdir (DIR/lock), remote workdir paths."""

import json
import os
import socket
import subprocess
import sys

import pytest

from moex import report
from moex import workdir
from moex.train import checkpoint, loop, writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
  """A pid that was just used and is no longer running."""
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _write_lock(d, **fields):
  os.makedirs(d, exist_ok=True)
  rec = {"host": socket.gethostname(), "pid": os.getpid(), "started": "T", "heartbeat": 0,
         "token": "theirs", **fields}
  with open(os.path.join(d, workdir.LOCK), "w") as f:
    json.dump(rec, f)


def test_second_run_on_a_held_workdir_refuses_naming_the_holder(tiny_config, tmp_path):
  d = str(tmp_path / "run")
  held = workdir.Lock(d).acquire()
  try:
    with pytest.raises(workdir.WorkdirInUse) as e:
      loop.train_and_evaluate(tiny_config, d)
  finally:
    held.release()
  msg = str(e.value)
  assert msg == (f"workdir {d} is in use by pid {os.getpid()} on host {socket.gethostname()} "
                 f"(started {held.record['started']}); wait for it or remove {d}/lock if "
                 "that process is gone")
  assert not os.path.exists(os.path.join(d, "metrics.jsonl"))  # Nothing of the run's written.
  assert not os.path.exists(os.path.join(d, "lock"))  # Released.


@pytest.mark.slow
def test_main_refuses_a_held_workdir_in_one_line(tmp_path):
  d = tmp_path / "w"
  held = workdir.Lock(d).acquire()
  try:
    r = subprocess.run([sys.executable, "-m", "moex.main", "--config=experiments/tiny.py",
                        f"--workdir={d}"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
  finally:
    held.release()
  assert r.returncode == 2  # a refusal
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"moex: workdir {d} is in use by pid {os.getpid()} on host "), last
  assert last.endswith(f"wait for it or remove {d}/lock if that process is gone"), last


@pytest.mark.slow
def test_main_on_a_workdir_that_is_a_file_is_one_line(tmp_path):
  f = tmp_path / "a_file"
  f.write_text("not a directory")
  r = subprocess.run([sys.executable, "-m", "moex.main", "--config=experiments/tiny.py",
                      f"--workdir={f}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 2  # a refusal
  assert r.stderr.strip().splitlines()[-1] == (
      f"moex: workdir {f}: is a file, not a directory; pick another --workdir")
  assert "Traceback" not in r.stderr and "config error" not in r.stderr


def test_unwritable_workdir_is_one_line_naming_it(tmp_path, monkeypatch):
  # Tests run as root, where chmod does not stop writes: a read-only file system is faked.
  def read_only(self, *args, **kwargs):
    raise OSError(30, "Read-only file system")

  monkeypatch.setattr(type(workdir.path(tmp_path)), "write_text", read_only)
  with pytest.raises(workdir.WorkdirError, match=r"^workdir .*/w: cannot be written "
                     r"\(Read-only file system\); pick another --workdir"):
    workdir.make(tmp_path / "w")


@pytest.mark.slow
def test_lock_of_a_dead_process_is_taken_over(tiny_config, tmp_path, caplog):
  d = str(tmp_path / "run")
  _write_lock(d, pid=_dead_pid(), heartbeat=1e18)  # fresh heartbeat: the pid decides
  tiny_config.train.steps = 1
  result = loop.train_and_evaluate(tiny_config, d)
  assert result["step"] == 1
  assert "that process is not running" in caplog.text
  assert not os.path.exists(os.path.join(d, "lock"))


@pytest.mark.slow
def test_lock_released_when_the_run_fails(tiny_config, tmp_path):
  d = str(tmp_path / "run")
  tiny_config.opt.learning_rate = 1e30  # non-finite loss: FloatingPointError
  with pytest.raises(FloatingPointError):
    loop.train_and_evaluate(tiny_config, d)
  assert not os.path.exists(os.path.join(d, "lock"))


def test_lock_of_another_host_refused_unless_stale(tmp_path, monkeypatch):
  d = str(tmp_path / "run")
  _write_lock(d, host="elsewhere", pid=1, heartbeat=workdir.time.time())
  with pytest.raises(workdir.WorkdirInUse, match=r"pid 1 on host elsewhere .*last heartbeat "
                     r"\d+s ago \(taken over after 600s\); wait for it or remove .*/lock if"):
    workdir.Lock(d).acquire()
  _write_lock(d, host="elsewhere", pid=1, heartbeat=workdir.time.time() - 601)
  workdir.Lock(d).acquire().release()
  assert not os.path.exists(os.path.join(d, "lock"))


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir, "HEARTBEAT_SECONDS", 0.05)
  held = workdir.Lock(tmp_path).acquire()
  before = json.loads((tmp_path / "lock").read_text())["heartbeat"]
  workdir.time.sleep(0.5)
  after = json.loads((tmp_path / "lock").read_text())["heartbeat"]
  held.release()
  assert after > before and not (tmp_path / "lock").exists()


@pytest.mark.slow
def test_training_on_a_remote_workdir(fake_gcs, tiny_config, tmp_path, monkeypatch):
  """Lock, config.json, metrics and statistics go to gs:// and read back; checkpoints go to
  a local folder here (orbax writes arrays with tensorstore's own GCS driver)."""
  monkeypatch.setattr(workdir, "LOCK_SETTLE_SECONDS", 0.0)
  real = checkpoint.Checkpointer
  monkeypatch.setattr(checkpoint, "Checkpointer",
                      lambda wd, cfg: real(str(tmp_path / "ckpt"), cfg))
  d = "gs://bucket/run"
  loop.train_and_evaluate(tiny_config, d, max_steps=4)
  loop.train_and_evaluate(tiny_config, d)  # resumes: drops nothing, appends parts
  store = fake_gcs.store
  assert "/bucket/run/config.json" in store and "/bucket/run/lock" not in store
  assert any(k.startswith("/bucket/run/metrics.jsonl.parts/") for k in store)
  run = report.load_run(d)
  assert [r["step"] for r in report.split(run.metrics, "train")] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in report.split(run.metrics, "eval")] == [0, 3, 6]
  assert run.config["model"]["vocab_size"] > 0
  raw = report.read_jsonl(f"{d}/metrics.jsonl")
  assert len(raw) == len(run.metrics)  # no repeats to deduplicate


def test_checkpoint_directory_keeps_a_remote_url(fake_gcs, tiny_config, monkeypatch):
  seen = {}
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager",
                      lambda directory, **kw: seen.setdefault("dir", directory))
  from moex import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.validate(tiny_config, vocab_size=256)
  ckpt = checkpoint.Checkpointer("gs://bucket/run", cfg.train)
  assert str(ckpt.directory) == str(seen["dir"]) == "gs://bucket/run/checkpoints"


def test_remote_resume_drops_later_parts(fake_gcs):
  w = writers.Writer("gs://b/r")
  for s in (1, 2, 3):
    w.metrics({"step": s, "split": "train", "loss": 1.0})
    w.flush()
  w.close()
  writers.Writer("gs://b/r", resume_step=2).close()
  assert [r["step"] for r in report.read_jsonl("gs://b/r/metrics.jsonl")] == [1, 2]


def _code_strings(path):
  """(line, text) of every string constant in a module that is not a docstring."""
  import ast  # pylint: disable=import-outside-toplevel
  tree = ast.parse(path.read_text())
  docs = {id(n.body[0].value) for n in ast.walk(tree)
          if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
          and n.body and isinstance(n.body[0], ast.Expr)
          and isinstance(n.body[0].value, ast.Constant)}
  return [(n.lineno, n.value) for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_only_the_workdir_module_spells_a_workdirs_config_and_metrics_files():
  """config.json and metrics.jsonl of a workdir are read through moex.workdir; an HF
  directory's config.json belongs to moex/interop/ (hf.CONFIG)."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(ROOT)
  word = re.compile(r"(?<![\w.])(config\.json|metrics\.jsonl)")
  found = []
  for path in sorted(root.glob("moex/**/*.py")) + sorted(root.glob("experiments/*.py")):
    rel = path.relative_to(root).as_posix()
    if rel == "moex/workdir.py" or rel.startswith("moex/interop/"):
      continue
    found += [f"{rel}:{line}: {text!r}" for line, text in _code_strings(path)
              if word.search(text)]
  assert not found, "use moex.workdir (Workdir, CONFIG, METRICS) instead:\n" + "\n".join(found)
