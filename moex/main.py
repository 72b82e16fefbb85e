"""Entry point: python -m moex.main --config=experiments/NAME.py --workdir=DIR.

Intentionally short (as nanodo's main): parse flags, log the devices, call the trainer.
Override any config field with --config.section.key=value.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from moex import config as config_lib
from moex.parallel import distributed
from moex.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run (also "
    "MOEX_COORDINATOR_ADDRESS; TPU VM slices and SLURM jobs are detected without it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 10, "Seconds before the others give up on a hung process (one that "
    "died is noticed at the next collective).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Hides orbax's and grain's per-save INFO chatter; their warnings still show."""

  def filter(self, record):
    noisy = ("/orbax/" in record.pathname or "/grain/" in record.pathname)
    return record.levelno >= logging.logging.WARNING or not noisy


@distributed.exiting_on_failure()  # outside main: its config errors exit with one line first
def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         heartbeat_timeout_seconds=_HEARTBEAT.value)
  logging.info("moex: process %d of %d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    sys.exit(f"moex: config error: {e}")
  except FloatingPointError as e:
    sys.exit(f"moex: {e}")
  final = result["final_eval"]
  if final is not None:
    print(f"moex: step {result['step']}: validation {final['bits_per_byte']:.4f} bits per "
          f"byte, loss {final['loss']:.4f} nats/token; {result['tokens_per_sec']:.0f} tok/s "
          f"over {result['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
  app.run(main)
