"""One orbax CheckpointManager for the train state and the data iterator, under DIR/checkpoints.

Every process writes its own shards (orbax) and its own iterator position (grain). Restore
always passes an abstract target with shardings, so a checkpoint lands on whatever mesh
the new run uses. Only finite states are saved (moex/train/loop.py); a checkpoint that cannot
be read is moved aside and the one before it restored; a write that fails leaves no temporary
directory behind and ends in one CheckpointError line.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as py_logging
import re

import grain
import jax
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from moex import errors
from moex.config import ConfigError, TrainConfig
from moex.data import pipeline
from moex.model import params as params_lib
from moex import workdir as workdir_lib


UNREADABLE = workdir_lib.UNREADABLE  # Beside checkpoints/: where unreadable ones are moved.


class CheckpointError(OSError, errors.Refusal):
  """A checkpoint could not be written, or none could be read: an I/O fault, not a config
  error."""


class _Unreadable(Exception):
  """One checkpoint's files are missing, truncated or undecodable (the message says which)."""


def _reason(e: BaseException) -> str:
  """A short one-line account of an OS, tensorstore or decode error."""
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror} (errno {e.errno})"
  text = str(e).strip()
  # tensorstore ends its messages with the OS error: "...: File too large [os_error_code='27']"
  m = re.search(r":\s*([^:\[\]]+?)\s*\[os_error_code='?(\d+)'?\]", text)
  if m:
    return f"{m.group(1)} (errno {m.group(2)})"
  first = text.splitlines()[0] if text else ""
  return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


class _RedundantOrbaxErrors(py_logging.Filter):
  """Drops orbax's traceback of a failed background write: orbax re-raises the same exception
  in the main thread, where it becomes one CheckpointError line."""

  def filter(self, record):
    return not ("/orbax/" in record.pathname and record.levelno >= py_logging.ERROR
                and "_SignalingThread.run() raised" in str(record.msg))


@contextlib.contextmanager
def _quiet_abandoned_futures():
  """A failed orbax read or write abandons its sibling tensorstore futures, and asyncio logs a
  traceback for each when it is collected; the failure is reported once, by the caller."""
  log = py_logging.getLogger("asyncio")
  disabled, log.disabled = log.disabled, True
  try:
    yield
  except BaseException:
    gc.collect()  # Collect the abandoned futures while asyncio's logger is off.
    raise
  finally:
    log.disabled = disabled


def _flat_shapes(tree) -> dict:
  """{orbax key path: shape} of a pytree's array leaves, as orbax names them in metadata."""
  flat = ocp.tree.to_flat_dict(tree)
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def _agree(ok: bool) -> bool:
  """True when `ok` holds on every process (a checkpoint may be unreadable on one only)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Saves and restores {"state": train state, "data": grain iterator}."""

  def __init__(self, workdir: str, cfg: TrainConfig):
    self.directory = workdir_lib.path(workdir) / workdir_lib.CHECKPOINTS  # gs:// kept as a URL
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_checkpoints,
            enable_async_checkpointing=cfg.async_checkpointing,
            # A save that died (full disk, killed job) leaves STEP.orbax-checkpoint-tmp*.
            cleanup_tmp_directories=True,
            create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": pipeline.data_checkpoint_handler()})
    self._writing = None  # The step of the save in flight (async), for error messages.
    self._failed = False
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, _RedundantOrbaxErrors) for f in absl_logger.filters):
      absl_logger.addFilter(_RedundantOrbaxErrors())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_iter: grain.DatasetIterator) -> None:
    """Starts writing checkpoint `step` (in the background when async)."""
    try:
      with _quiet_abandoned_futures():
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=pipeline.data_save_args(data_iter)),
            force=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      # With async saves this may be the previous step's write, finishing now.
      self._write_failed(self._writing or step, e)
    self._writing = step
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore_latest(self, abstract_state: dict, data_iter: grain.DatasetIterator
                     ) -> tuple[int | None, dict | None]:
    """(step, state) of the newest checkpoint that reads back, (None, None) when there is
    none; unreadable newer ones are moved to DIR/checkpoints_unreadable with one warning each.

    Raises ConfigError when a readable checkpoint holds another model/optimizer, and
    CheckpointError when there are checkpoints but none reads back.
    """
    broken = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, why = self.restore(step, abstract_state, data_iter), None
      except _Unreadable as e:
        state, why = None, str(e)
      if not _agree(why is None):
        broken.append((step, why or "unreadable on another process"))
        continue
      for bad, why in broken:
        moved = self._move_aside(bad)
        logging.warning("checkpoints: step %d in %s is unreadable (%s); moved it to %s and "
                        "resumed from step %d", bad, self.directory, why, moved, step)
      return step, state
    if broken:
      listed = "; ".join(f"step {s}: {why}" for s, why in broken)
      raise CheckpointError(f"checkpoints: no checkpoint in {self.directory} can be read "
                            f"({listed}); move that directory aside to start afresh")
    return None, None

  def restore(self, step: int, abstract_state: dict,
              data_iter: grain.DatasetIterator) -> dict:
    """The state saved at `step`, placed per `abstract_state`'s shardings; the iterator is
    moved to its saved position in place.

    A tree or shape that differs from the saved metadata is a different model (ConfigError);
    a file that is missing or cannot be read or decoded is a broken checkpoint (_Unreadable).
    """
    target = self._check_matches(step, abstract_state)
    try:
      with _quiet_abandoned_futures():
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _Unreadable(f"state: {_reason(e)}") from None
    self._restore_data(step, data_iter)
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    if target is not abstract_state:  # back under this moex's names
      return jax.tree.unflatten(jax.tree.structure(abstract_state),
                                jax.tree.leaves(restored["state"]))
    return restored["state"]

  def _check_matches(self, step: int, abstract_state: dict) -> dict:
    """Compares the saved tree and shapes with this config's (before reading any array);
    returns the restore target (abstract_state, or it under a workdir's old names)."""
    try:
      with _quiet_abandoned_futures():
        meta = self.manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise _Unreadable(f"state metadata: {_reason(e)}") from None
    if meta is None:
      raise _Unreadable("state/_METADATA is missing")
    saved = _flat_shapes(meta.tree)
    target = (params_lib.with_old_names(abstract_state) if params_lib.has_old_names(saved)
              else abstract_state)
    wanted = _flat_shapes(ocp.tree.serialize_tree(target, keep_empty_nodes=True))
    if saved == wanted:
      return target
    keys = sorted(set(saved) ^ set(wanted))
    if keys:
      where = "saved only" if keys[0] in saved else "this config only"
      reason = f"{'.'.join(keys[0])} is in the {where}"
    else:
      k = next(k for k in sorted(saved) if saved[k] != wanted[k])
      reason = f"{'.'.join(k)} is {saved[k]} saved, {wanted[k]} here"
    raise ConfigError(f"checkpoints: step {step} in {self.directory} does not match this "
                      f"config's model/optimizer ({reason}); use a new --workdir")

  def _restore_data(self, step: int, data_iter: grain.DatasetIterator) -> None:
    """Sets the iterator to its saved position.

    Every process iterates the same global batches (moex/data/pipeline.py), so all
    processes saved the same position; this process's own file is used when it exists,
    else process 0's, which lets a checkpoint move to a different number of processes.
    """
    data_dir = epath.Path(self.directory) / str(step) / "data"
    mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    files = [mine] if mine.exists() else sorted(data_dir.glob("process_0-of-*.json"))
    if not files:
      raise _Unreadable("no data-iterator state in data/")
    try:
      data_iter.set_state(json.loads(files[0].read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise _Unreadable(f"data/{files[0].name}: {_reason(e)}") from None

  def _move_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the manager's sight (kept, not deleted); returns where."""
    dest = epath.Path(self.directory).parent / UNREADABLE / str(step)
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      if dest.exists():
        dest.rmtree()
      (epath.Path(self.directory) / str(step)).rename(dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"moex_checkpoint_move_aside_{step}")
    self.manager.reload()
    return str(dest)

  def _write_failed(self, step: int, e: Exception) -> None:
    """Removes the half-written temporary directories and raises one CheckpointError line."""
    self._failed = True
    if jax.process_index() == 0:
      for tmp in epath.Path(self.directory).glob("*.orbax-checkpoint-tmp*"):
        with contextlib.suppress(OSError):
          tmp.rmtree()
    good = self.manager.latest_step()
    raise CheckpointError(
        f"checkpoints: could not write step {step} to {self.directory} ({_reason(e)}); free "
        f"space or fix that directory, then re-run to resume from "
        f"{'the start' if good is None else f'step {good}'}") from None

  def wait(self) -> None:
    try:
      with _quiet_abandoned_futures():
        self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._write_failed(self._writing, e)
    self._writing = None

  def close(self) -> None:
    try:
      if not self._failed:
        self.wait()
    finally:
      # After a failed write, closing may re-raise it: the CheckpointError already said it.
      with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
        self.manager.close()
