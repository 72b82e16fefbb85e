"""Entry point: python -m moex.main --config=experiments/NAME.py --workdir=DIR.

Intentionally short (as nanodo's main): parse flags, log the devices, call the trainer.
Override any config field with --config.section.key=value.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from moex import cli, config as config_lib
from moex.parallel import distributed
from moex.train import checkpoint, loop, workdir

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
  except checkpoint.CheckpointError as e:  # An I/O fault (disk, permissions), not the config.
    sys.exit(f"moex: {e}")
  except (config_lib.ConfigError, FileNotFoundError) as e:
    sys.exit(f"moex: config error: {e}")
  except FloatingPointError as e:
    sys.exit(f"moex: {e}")
  except (workdir.WorkdirInUse, workdir.WorkdirError) as e:
    sys.exit(f"moex: {e}")
  # The latest evaluation with its own step: a stopped run's may be older than its step.
  ev, step = result["last_eval"], result["step"]
  stopped = "stopped; re-run to resume. " if result["stopped"] else ""
  seen = ("no validation yet" if ev is None else
          f"validation at step {ev['step']}: {ev['bits_per_byte']:.4f} bits per byte, loss "
          f"{ev['loss']:.4f} nats/token")
  print(f"moex: step {step}: {stopped}{seen}; {result['tokens_per_sec']:.0f} tok/s over "
        f"{result['seconds']:.0f}s", flush=True)


def _parse_flags(argv: list[str]) -> list[str]:
  return cli.parse_flags(argv, _CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
