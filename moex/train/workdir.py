"""The workdir as an epath.Path (local, gs://, s3://), and the lock that gives it one run.

DIR/lock holds {"host", "pid", "started", "heartbeat", "token"} of the run that owns DIR.
Locally it is created with O_CREAT|O_EXCL (atomic). On a remote store (no exclusive
create through epath) it is written, then read back after LOCK_SETTLE_SECONDS: the run
whose token is there wins. Two remote starts less than LOCK_SETTLE_SECONDS apart may both
pass that check. A lock whose pid is dead on this host, or whose heartbeat (rewritten every
HEARTBEAT_SECONDS) is older than STALE_SECONDS, is taken over with a warning.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from moex import errors

LOCK = "lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0  # 10 missed heartbeats: the holder is gone (killed, host lost)
LOCK_SETTLE_SECONDS = 2.0


class WorkdirInUse(RuntimeError, errors.Refusal):
  """Another run holds the workdir; the message is the one line to show the user."""


class WorkdirError(OSError, errors.Refusal):
  """The workdir cannot be made or written (a file in the way, permissions, no space)."""


def make(workdir: str | os.PathLike) -> epath.Path:
  """Creates the workdir; WorkdirError, one line naming it, when that is impossible."""
  p = path(workdir)
  try:
    if p.exists() and not p.is_dir():
      raise WorkdirError(f"workdir {workdir}: is a file, not a directory; pick another "
                         "--workdir")
    p.mkdir(parents=True, exist_ok=True)
    probe = p / ".moex-write-test"
    probe.write_text("")
    probe.unlink()
  except WorkdirError:
    raise
  except OSError as e:
    raise WorkdirError(f"workdir {workdir}: cannot be written ({e.strerror or e}); pick "
                       "another --workdir or fix its permissions or free space") from None
  return p


def path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an epath.Path; local paths made absolute (os would mangle gs://)."""
  return epath.Path(workdir) if is_remote(workdir) else epath.Path(os.path.abspath(workdir))


def is_remote(workdir: str | os.PathLike) -> bool:
  """Whether the path is a URL (gs://BUCKET/...) rather than a local file path."""
  return "://" in os.fspath(workdir)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


class Lock:
  """DIR/lock for the life of one run; `release` is safe to call more than once."""

  def __init__(self, workdir: str | os.PathLike):
    self.dir = path(workdir)
    self.file = self.dir / LOCK
    self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds"),
                   "heartbeat": time.time(), "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread = None
    self._held = False

  def acquire(self) -> Lock:
    """Takes the lock or raises WorkdirInUse naming the holder."""
    make(self.dir)
    for _ in range(3):  # A takeover can race another one: retry from the start.
      if self._try_create():
        self._held = True
        self._thread = threading.Thread(target=self._beat, daemon=True, name="moex-lock")
        self._thread.start()
        return self
      holder = self._read()
      if holder is None:
        continue  # Released meanwhile, or not yet written in full.
      reason = self._stale(holder)
      if reason is None:
        raise WorkdirInUse(self._refusal(holder))
      logging.warning("workdir %s: taking over the lock of pid %s on host %s (%s)", self.dir,
                      holder.get("pid"), holder.get("host"), reason)
      self.file.unlink(missing_ok=True)
    raise WorkdirInUse(f"workdir {self.dir}: could not take {self.file} (others keep "
                       "taking it); stop the other runs on it and retry")

  def _try_create(self) -> bool:
    data = json.dumps(self.record)
    if not is_remote(self.dir):
      try:
        fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(data)
      return True
    if self.file.exists():
      return False
    self.file.write_text(data)
    time.sleep(LOCK_SETTLE_SECONDS)  # Let a concurrent writer's object land first.
    holder = self._read()
    return holder is not None and holder.get("token") == self.record["token"]

  def _read(self) -> dict | None:
    try:
      holder = json.loads(self.file.read_text())
    except (OSError, ValueError):
      return None
    return holder if isinstance(holder, dict) else None

  def _stale(self, holder: dict) -> str | None:
    """Why the holder is gone (dead pid here, silent heartbeat), or None if it may live."""
    if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int):
      if not _pid_alive(holder["pid"]):
        return "that process is not running"
      if holder["pid"] != os.getpid():
        return None  # Alive here: its heartbeat does not matter.
    silent = time.time() - float(holder.get("heartbeat", 0))
    if silent > STALE_SECONDS:
      return f"no heartbeat for {silent:.0f}s"
    return None

  def _refusal(self, holder: dict) -> str:
    where = (f"pid {holder.get('pid')} on host {holder.get('host')} "
             f"(started {holder.get('started')})")
    if holder.get("host") == self.record["host"]:
      return (f"workdir {self.dir} is in use by {where}; wait for it or remove {self.file} "
              "if that process is gone")
    return (f"workdir {self.dir} is in use by {where}, last heartbeat "
            f"{time.time() - float(holder.get('heartbeat', 0)):.0f}s ago (taken over after "
            f"{STALE_SECONDS:.0f}s); wait for it or remove {self.file} if that job is gone")

  def _beat(self) -> None:
    # A remote holder cannot be checked by pid: a fresh heartbeat says it is alive.
    while not self._stop.wait(HEARTBEAT_SECONDS):
      self.record["heartbeat"] = time.time()
      try:
        if (self._read() or {}).get("token") != self.record["token"]:
          logging.warning("workdir %s: the lock was taken by another run", self.dir)
          return
        tmp = self.dir / f"{LOCK}.{self.record['token']}"
        tmp.write_text(json.dumps(self.record))
        tmp.replace(self.file)
      except OSError as e:
        logging.warning("workdir %s: lock heartbeat failed: %s", self.dir, e)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    if not self._held:
      return
    self._held = False
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if (self._read() or {}).get("token") == self.record["token"]:
      self.file.unlink(missing_ok=True)


def lock(workdir: str | os.PathLike) -> Lock | None:
  """Process 0 takes the workdir's lock; every process raises WorkdirInUse if it failed."""
  held, error = None, None
  if jax.process_index() == 0:
    try:
      held = Lock(workdir).acquire()
    except WorkdirInUse as e:
      error = e
  if jax.process_count() > 1:  # The others must not start training without process 0.
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not int(ok) and error is None:
      raise WorkdirInUse(f"workdir {path(workdir)} is in use (see process 0's log); wait "
                         f"for the other run or remove {path(workdir) / LOCK} if it is gone")
  if error is not None:
    raise error
  return held
