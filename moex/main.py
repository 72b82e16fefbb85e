"""Entry point: python -m moex.main --config=experiments/NAME.py --workdir=DIR.

Intentionally short (as nanodo's main): parse flags, log the devices, call the trainer.
Override any config field with --config.section.key=value. A refusal (bad config, a held or
unwritable workdir, an I/O fault, a non-finite loss) is one line on stderr and exit status 2.
"""

import jax
from absl import flags, logging
from ml_collections import config_flags

from moex import cli, config as config_lib, errors
from moex.parallel import distributed
from moex.train import loop

PROGRAM = "moex"


def define_flags() -> flags.FlagHolder:
  """The trainer's flags; returns the --config holder (cli.run loads it with one-line errors)."""
  config = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                           lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, for a multi-process run (also "
      "MOEX_COORDINATOR_ADDRESS; TPU VM slices and SLURM jobs are detected without it).")
  flags.DEFINE_integer("num_processes", None, "Processes in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer(
      "heartbeat_timeout", 10, "Seconds before the others give up on a hung process (one that "
      "died is noticed at the next collective).")
  flags.mark_flags_as_required(["config", "workdir"])
  return config


class _QuietLibraries(logging.logging.Filter):
  """Hides orbax's and grain's per-save INFO chatter; their warnings still show."""

  def filter(self, record):
    noisy = ("/orbax/" in record.pathname or "/grain/" in record.pathname)
    return record.levelno >= logging.logging.WARNING or not noisy


@distributed.exiting_on_failure()  # outside main: its refusals exit with one line first
def main(argv):
  del argv
  f = flags.FLAGS
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                         heartbeat_timeout_seconds=f.heartbeat_timeout)
  logging.info("moex: process %d of %d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  # Refused here, not in cli.run: a SystemExit passes exiting_on_failure, so one process's
  # refusal is its one line and not a "this process failed" traceback.
  try:
    result = loop.train_and_evaluate(f.config, f.workdir)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    cli.refuse(PROGRAM, f"config error: {e}")
  except (errors.Refusal, FloatingPointError) as e:  # I/O faults, the workdir, a blow-up
    cli.refuse(PROGRAM, e)
  # The latest evaluation with its own step: a stopped run's may be older than its step.
  ev, step = result["last_eval"], result["step"]
  stopped = "stopped; re-run to resume. " if result["stopped"] else ""
  seen = ("no validation yet" if ev is None else
          f"validation at step {ev['step']}: {ev['bits_per_byte']:.4f} bits per byte, loss "
          f"{ev['loss']:.4f} nats/token")
  print(f"moex: step {step}: {stopped}{seen}; {result['tokens_per_sec']:.0f} tok/s over "
        f"{result['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags, program=PROGRAM)
