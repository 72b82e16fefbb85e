"""Entry point: python -m moex.main --config=experiments/NAME.py --workdir=DIR.

Intentionally short (as nanodo's main): parse flags, log the devices, call the trainer.
Override any config field with --config.section.key=value.
"""

import os
import re
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from moex import config as config_lib
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


def _flag_value(argv: list[str], name: str) -> str | None:
  """The last value given to --name on the command line (absl's last wins), else None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        value = arg[len(prefix):]
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _chain(e: BaseException | None):
  """e and the exceptions it was raised from or while handling."""
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    yield e
    e = e.__cause__ or e.__context__


def _unknown_key(e: BaseException, argv: list[str], file: str) -> str | None:
  """The line for an override naming a key the config lacks (ml_collections' KeyError)."""
  msg = e
  while isinstance(msg, BaseException) and msg.args:  # AttributeError(KeyError(str))
    msg = msg.args[0]
  if not isinstance(msg, str):
    return None
  key = msg.splitlines()[0].strip("'\"")
  hint = re.search(r'Did you mean "([^"]+)"', msg)
  for arg in argv[1:]:
    m = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    parts = m.group(1).split(".") if m else []
    if key in parts:
      parents = parts[:parts.index(key)]
      line = f"--config.{m.group(1)}: {file} has no key {'.'.join(parents + [key])}"
      return line + (f"; did you mean {'.'.join(parents + [hint.group(1)])}?" if hint else "")
  return None


def _load_error(e: BaseException | None, argv: list[str], file: str) -> str | None:
  """One line for a failure to load or override config `file`, or None if not one."""
  path = os.path.abspath(file)
  for x in _chain(e):
    if isinstance(x, SyntaxError) and x.filename and os.path.abspath(x.filename) == path:
      return f"{x.filename}:{x.lineno}: SyntaxError: {x.msg}"
    lines = [f.lineno for f in traceback.extract_tb(x.__traceback__)
             if os.path.abspath(f.filename) == path]
    if lines:  # raised by the config file's own code: its innermost line there
      return f"{path}:{lines[-1]}: {type(x).__name__}: {(str(x) or '?').splitlines()[0]}"
  for x in _chain(e):
    if isinstance(x, AttributeError) and "get_config" in str(x):
      return f"{file}: defines no get_config()"
    if isinstance(x, (KeyError, AttributeError)):
      return _unknown_key(x, argv, file)
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, which loads --config and applies overrides; a failure is one line.

  ml_collections loads the file and applies --config.KEY=V overrides while absl parses the
  flags, before main() runs, and lets their errors escape as tracebacks.
  """
  config = _flag_value(argv, "config")
  file = None if config is None else config.split(":", 1)[0]
  if file is not None and not os.path.isfile(file):
    sys.exit(f"moex: config error: --config={config}: no such file {os.path.abspath(file)}")
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    line = None if file is None else _load_error(e, argv, file)
    if line is not None:
      sys.exit(f"moex: config error: {line}")
    if isinstance(e, flags.Error):
      sys.exit(f"moex: flag error: {'; '.join(s.strip() for s in str(e).splitlines())} "
               "(see --helpshort)")
    raise
  # ml_collections defers an IOError raised inside get_config() to the config's first use.
  value = _CONFIG.value
  if not isinstance(value, config_dict.ConfigDict):
    line = _load_error(getattr(value, "_error", None), argv, file)
    sys.exit(f"moex: config error: {line or f'{file}: get_config() returned no ConfigDict'}")
  return rest


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


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
