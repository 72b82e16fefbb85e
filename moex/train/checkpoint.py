"""One orbax CheckpointManager for the train state and the data iterator, under DIR/checkpoints.

Every process writes its own shards (orbax) and its own iterator position (grain). Restore
always passes an abstract target with shardings, so a checkpoint lands on whatever mesh
the new run uses.
"""

from __future__ import annotations

import json
import os

import grain
import jax
from etils import epath
import orbax.checkpoint as ocp
from absl import logging

from moex.config import ConfigError, TrainConfig
from moex.data import pipeline


class Checkpointer:
  """Saves and restores {"state": train state, "data": grain iterator}."""

  def __init__(self, workdir: str, cfg: TrainConfig):
    self.directory = epath.Path(
        workdir if "://" in str(workdir) else os.path.abspath(workdir)) / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_checkpoints,
            enable_async_checkpointing=cfg.async_checkpointing,
            create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": pipeline.data_checkpoint_handler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_iter: grain.DatasetIterator) -> None:
    """Starts writing checkpoint `step` (in the background when async)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=pipeline.data_save_args(data_iter)),
        force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore(self, step: int, abstract_state: dict,
              data_iter: grain.DatasetIterator) -> dict:
    """The state saved at `step`, placed per `abstract_state`'s shardings; the iterator is
    moved to its saved position in place."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except ValueError as e:  # Tree or shape mismatch: a different model or optimizer.
      reason = str(e).strip().splitlines()[0][:200]
      raise ConfigError(f"checkpoints: step {step} in {self.directory} does not match this "
                        f"config's model/optimizer ({reason}); use a new --workdir") from None
    self._restore_data(step, data_iter)
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"]

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
      raise ConfigError(f"checkpoints: step {step} in {self.directory} has no data-iterator "
                        "state")
    data_iter.set_state(json.loads(files[0].read_text()))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
