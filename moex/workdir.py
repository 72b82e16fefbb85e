"""The workdir: one object for what a moex workdir holds, local or gs:// alike (etils.epath).

A workdir DIR holds (each name is a constant here; nothing else spells them):
  config.json            CONFIG: the resolved config (model.vocab_size filled in). Importers
                         (moex.convert) and upcyclers (moex.upcycle) write it LAST, through
                         `write_config` (atomic), so a workdir with config.json is complete;
                         the trainer rewrites it at every start.
  tokenizer/             TOKENIZER: the tokenizer's files (none for "byte"). When present it
                         is the workdir's tokenizer, whatever data.tokenizer says (`tokenizer`)
  params/                PARAMS: a parameters-only orbax checkpoint (an import or upcycle)
  checkpoints/N/         CHECKPOINTS: the trainer's checkpoints (state/ and data/)
  checkpoints_unreadable/N/  UNREADABLE: checkpoints the trainer moved aside (never a reader)
  metrics.jsonl, moe_stats.jsonl  METRICS, MOE_STATS (remote: NAME.parts/*.jsonl, PARTS)
  tensorboard/           TENSORBOARD: TensorBoard events and profiles
  lock                   LOCK: the run that holds the workdir (`Lock`)
  hf_source.json         HF_SOURCE: what an import came from (moex.convert)
  upcycle.json           UPCYCLE: how an upcycle was made (moex.upcycle)
  report/                REPORT_DIR: moex.report's default output (REPORT = report.md, PNGs)

`Workdir(DIR)` reads them; a reader never moves or deletes a file in a workdir (another run
may hold it). `validate(cd, tokenizer)` is the one "vocabulary from the tokenizer, then
config.validate" step every command and benchmark uses.

DIR/lock holds {"host", "pid", "started", "heartbeat", "token"} of the run that owns DIR.
Locally it is created with O_CREAT|O_EXCL (atomic). On a remote store (no exclusive
create through epath) it is written, then read back after LOCK_SETTLE_SECONDS: the run
whose token is there wins. Two remote starts less than LOCK_SETTLE_SECONDS apart may both
pass that check. A lock whose pid is dead on this host, or whose heartbeat (rewritten every
HEARTBEAT_SECONDS) is older than STALE_SECONDS, is taken over with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from moex import config as config_lib, errors
from moex.data import tokenizer as tokenizer_lib

# The files and folders of a workdir.
CONFIG = "config.json"
TOKENIZER = "tokenizer"
PARAMS = "params"
CHECKPOINTS = "checkpoints"
STATE = "state"  # CHECKPOINTS/N/state: the train state orbax tree (N/data: the iterator)
UNREADABLE = "checkpoints_unreadable"
METRICS = "metrics.jsonl"
MOE_STATS = "moe_stats.jsonl"
PARTS = ".parts"  # NAME.parts/: the remote form of a log
TENSORBOARD = "tensorboard"
LOCK = "lock"
HF_SOURCE = "hf_source.json"
UPCYCLE = "upcycle.json"
REPORT_DIR = "report"
REPORT = "report.md"
WRITE_PROBE = ".moex-write-test"

HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0  # 10 missed heartbeats: the holder is gone (killed, host lost)
LOCK_SETTLE_SECONDS = 2.0


class WorkdirInUse(RuntimeError, errors.Refusal):
  """Another run holds the workdir; the message is the one line to show the user."""


class WorkdirError(OSError, errors.Refusal):
  """The workdir cannot be made, written or read (a file in the way, permissions, no space,
  a missing or corrupt config.json)."""


def make(workdir: str | os.PathLike) -> epath.Path:
  """Creates the workdir; WorkdirError, one line naming it, when that is impossible."""
  p = path(workdir)
  try:
    if p.exists() and not p.is_dir():
      raise WorkdirError(f"workdir {workdir}: is a file, not a directory; pick another "
                         "--workdir")
    p.mkdir(parents=True, exist_ok=True)
    probe = p / WRITE_PROBE
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


def validate(cd: ml_collections.ConfigDict, tokenizer: str | None = None, *,
             check_tokenizer: bool = True) -> config_lib.Config:
  """config.validate with model.vocab_size 0 resolved from the tokenizer (the one place).

  `tokenizer` defaults to the config's data.tokenizer. With `check_tokenizer` the tokenizer
  is always loaded (a model.vocab_size below the tokenizer's is refused); without it, only
  when model.vocab_size is 0 (a resolved config.json, or a footprint without the files).
  ConfigError, one line naming the key or the tokenizer, on any failure.
  """
  if not isinstance(cd.get("data"), ml_collections.ConfigDict) or "tokenizer" not in cd.data:
    config_lib.validate(cd)  # raises the one line naming the missing section or key
  unset = (isinstance(cd.get("model"), ml_collections.ConfigDict)
           and cd.model.get("vocab_size") == 0)
  if not (check_tokenizer or unset):
    return config_lib.validate(cd)
  try:
    tok = tokenizer_lib.get_tokenizer(cd.data.tokenizer if tokenizer is None else tokenizer)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  return config_lib.validate(cd, vocab_size=tok.vocab_size)


@dataclasses.dataclass(frozen=True)
class Weights:
  """One orbax tree holding {"params", "buffers"} in a workdir."""

  path: epath.Path  # params/, or checkpoints/N/state
  label: str  # "params/" or "checkpoint step N": what the logs and messages say
  step: int | None  # N for a checkpoint, None for params/


def _reason(e: BaseException) -> str:
  """A short one-line account of why an orbax tree did not read (no C++ object reprs)."""
  from moex.train import checkpoint  # the trainer's wording of OS and tensorstore errors
  return checkpoint._reason(e)  # pylint: disable=protected-access


class Workdir:
  """A moex workdir (local made absolute, or gs://...): its files, read and written here."""

  def __init__(self, workdir: str | os.PathLike):
    self.given = os.fspath(workdir)  # as the user wrote it: what messages name
    self.path = path(workdir)

  def __repr__(self) -> str:
    return f"Workdir({os.fspath(self.path)!r})"

  def __fspath__(self) -> str:
    return os.fspath(self.path)

  # config.json

  @property
  def config_path(self) -> epath.Path:
    return self.path / CONFIG

  def has_config(self) -> bool:
    """Whether config.json is there (a trained, imported or upcycled workdir)."""
    return self.config_path.exists()

  def raw_config(self) -> dict[str, Any]:
    """config.json as a dict; WorkdirError, one line naming the file, when missing or bad."""
    p = self.config_path
    try:
      text = p.read_text()
    except FileNotFoundError:
      raise WorkdirError(f"{p}: missing (not a moex workdir, or an import that did not "
                         "finish)") from None
    except OSError as e:
      raise WorkdirError(f"{p}: cannot be read ({e.strerror or e})") from None
    try:
      raw = json.loads(text)
    except ValueError as e:
      raise WorkdirError(f"{p}: not JSON ({e})") from None
    if not isinstance(raw, dict):
      raise WorkdirError(f"{p}: not a JSON object (got {type(raw).__name__})")
    return raw

  def config(self) -> ml_collections.ConfigDict:
    """config.json as a ConfigDict (not validated)."""
    return ml_collections.ConfigDict(self.raw_config())

  def validated(self, check_tokenizer: bool = True) -> config_lib.Config:
    """config.json validated, its vocabulary checked against (or filled from) `tokenizer`."""
    cd = self.config()
    return validate(cd, self.tokenizer_spec(cd), check_tokenizer=check_tokenizer)

  def write_config(self, cfg: ml_collections.ConfigDict | dict) -> epath.Path:
    """Writes config.json atomically (a temporary file here, then renamed over it).

    Importers and upcyclers call it LAST: a workdir with config.json is complete. On gs://
    the rename is a copy then a delete: the object appears whole or not at all.
    """
    raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    tmp = self.path / f".{CONFIG}.{uuid.uuid4().hex}.tmp"
    try:
      tmp.write_text(json.dumps(raw, indent=2, default=str))
      tmp.replace(self.config_path)
    except OSError as e:
      raise WorkdirError(f"{self.config_path}: cannot be written ({e.strerror or e}); fix "
                         "the workdir's permissions or free space") from None
    finally:
      if tmp.exists():
        tmp.unlink()
    return self.config_path

  # The tokenizer.

  def tokenizer_spec(self, cd: ml_collections.ConfigDict | None = None) -> str:
    """What to load the workdir's tokenizer from: DIR/tokenizer/ when present (the files the
    workdir was trained or imported with, wherever it now lies), else data.tokenizer."""
    if (self.path / TOKENIZER).is_dir():
      return os.fspath(self.path / TOKENIZER)
    cd = self.config() if cd is None else cd
    if not isinstance(cd.get("data"), ml_collections.ConfigDict) or "tokenizer" not in cd.data:
      raise config_lib.ConfigError(f"data.tokenizer: missing in {self.config_path}, and "
                                   f"there is no {self.path / TOKENIZER}/")
    return cd.data.tokenizer

  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    """The workdir's tokenizer (`tokenizer_spec`); ConfigError, one line, when it won't load."""
    try:
      return tokenizer_lib.get_tokenizer(self.tokenizer_spec())
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None

  # The weights.

  def checkpoint_steps(self) -> list[int]:
    """The steps of the finished checkpoints that hold a train state, newest first."""
    root = self.path / CHECKPOINTS
    steps = ocp.utils.checkpoint_steps(root) if root.exists() else []
    return sorted((s for s in steps if (root / str(s) / STATE).exists()), reverse=True)

  def weight_sources(self, who: str = "train.init_from", none: str | None = None
                     ) -> list[Weights]:
    """Where the weights may be read from, best first: params/ alone when it exists (an
    import or upcycle), else every checkpoint, newest first.

    ConfigError (one line starting with `who`) when params/ is an unfinished write, or when
    there are no weights at all (then `none` is the message, if given).
    """
    params = self.path / PARAMS
    if params.exists():
      if not ocp.step.is_path_finalized(params):
        raise config_lib.ConfigError(f"{who}: {params} is not a finished write (orbax's "
                                     "commit marker is missing); write it again with "
                                     "save_params")
      return [Weights(params, f"{PARAMS}/", None)]
    found = [Weights(self.path / CHECKPOINTS / str(s) / STATE, f"checkpoint step {s}", s)
             for s in self.checkpoint_steps()]
    if not found:
      raise config_lib.ConfigError(
          none or f"{who}: {self.given} has neither {PARAMS}/ nor a checkpoint")
    return found

  def weights(self, who: str = "train.init_from", none: str | None = None) -> Weights:
    """params/, else the newest checkpoint whose metadata reads; older ones stand in for an
    unreadable newest with ONE warning (nothing is moved: a reader leaves the workdir as is).

    CheckpointError when no checkpoint reads; ConfigError as `weight_sources`.
    """
    from moex.train import checkpoint  # its CheckpointError: the trainer's I/O refusal

    sources = self.weight_sources(who, none)
    skipped = []
    for w in sources:
      try:
        with checkpoint._quiet_abandoned_futures():  # pylint: disable=protected-access
          meta = ocp.PyTreeCheckpointer().metadata(w.path)
        if meta is None or meta.item_metadata is None:
          raise ValueError("its _METADATA is missing")
      except Exception as e:  # pylint: disable=broad-exception-caught
        if w.step is None:
          raise checkpoint.CheckpointError(f"{who}: cannot read the metadata of {w.path} "
                                           f"({_reason(e)})") from None
        skipped.append((w, _reason(e)))
        continue
      warn_skipped(who, self, skipped, w)
      return w
    raise checkpoint.CheckpointError(
        f"{who}: no checkpoint in {self.path / CHECKPOINTS} can be read ("
        + "; ".join(f"step {w.step}: {why}" for w, why in skipped) + ")")

  # Is the run finished?

  def final_eval(self, steps: int | None = None) -> dict | None:
    """The last eval record at step >= `steps` (default the config's train.steps), or None
    while the run has not got there (or has no config.json or metrics.jsonl)."""
    from moex.report import read  # the log reader (skips torn lines); imports this module
    from moex.train import writers
    if steps is None:
      if not self.has_config():
        return None
      try:
        steps = int(self.raw_config()["train"]["steps"])
      except (KeyError, TypeError, ValueError):
        return None
    if not writers.log_files(self.path / METRICS):
      return None
    rows = [r for r in read.read_jsonl(self.path / METRICS)
            if r.get("split") == "eval" and r["step"] >= steps]
    return rows[-1] if rows else None

  def finished(self, steps: int | None = None) -> bool:
    """Whether metrics.jsonl holds the eval of step `steps` (default: config's train.steps)."""
    return self.final_eval(steps) is not None

  # The lock.

  def lock(self) -> Lock | None:
    """Takes the workdir for this run (`lock`); release the returned Lock when done."""
    return lock(self.path)

  def make(self) -> Workdir:
    """Creates the directory (WorkdirError, one line, when impossible); returns self."""
    make(self.given)
    return self


def warn_skipped(who: str, wd: Workdir, skipped: list[tuple[Weights, str]], used: Weights
                 ) -> None:
  """The one warning for newer checkpoints a reader passed over (kept where they are)."""
  if skipped:
    listed = "; ".join(f"step {w.step} ({why})" for w, why in skipped)
    logging.warning("%s: %s in %s unreadable: %s; using %s (left in place)", who,
                    "checkpoint" if len(skipped) == 1 else "checkpoints",
                    wd.path / CHECKPOINTS, listed, used.label)


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
