"""Command-line plumbing the moex programs share: `run` (flags, parsing, one-line refusals
with exit status 2) and --config loading errors as one line.

ml_collections loads the config file and applies --config.KEY=V overrides while absl parses
the flags, before main() runs, and lets their errors escape as tracebacks; `parse_flags`
turns them into one line naming the file, its line or the key.
"""

import os
import re
import sys
import traceback
from typing import Callable, NoReturn

from absl import app, flags
from ml_collections import config_dict

from moex import errors


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


def _flag_error(e: flags.Error) -> str:
  return f"flag error: {'; '.join(s.strip() for s in str(e).splitlines())} (see --helpshort)"


def parse_flags(argv: list[str], config_flag: flags.FlagHolder, program: str = "moex"
                ) -> list[str]:
  """absl's flag parsing, which loads --config and applies overrides; a failure exits with
  status 2 and one line (`PROGRAM: config error: ...` or `PROGRAM: flag error: ...`).

  `config_flag` is the program's config_flags.DEFINE_config_file holder, named "config".
  """
  config = _flag_value(argv, "config")
  file = None if config is None else config.split(":", 1)[0]
  if file is not None and not os.path.isfile(file):
    refuse(program, f"config error: --config={config}: no such file {os.path.abspath(file)}")
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    line = None if file is None else _load_error(e, argv, file)
    if line is not None:
      refuse(program, f"config error: {line}")
    if isinstance(e, flags.Error):
      refuse(program, _flag_error(e))
    raise
  # ml_collections defers an IOError raised inside get_config() to the config's first use.
  value = config_flag.value
  if not isinstance(value, config_dict.ConfigDict):
    line = _load_error(getattr(value, "_error", None), argv, file)
    refuse(program, f"config error: {line or f'{file}: get_config() returned no ConfigDict'}")
  return rest


def run(main: Callable[[list[str]], object], define_flags: Callable[[], object] | None = None,
        *, program: str) -> None:
  """The one way a moex command starts: define its flags, parse them, run `main`.

  `define_flags()` is called here, not at import, so importing a command next to another
  (tests, notebooks) defines no duplicate flags. If it returns the holder of a
  `config_flags.DEFINE_config_file("config", ...)`, that config is loaded with
  `parse_flags`'s one-line errors. A `Refusal` raised by `main` (or by the library under it)
  is printed as `PROGRAM: MESSAGE` on stderr and exits with `errors.EXIT_CODE`.
  """
  holder = define_flags() if define_flags is not None else None

  def parser(argv: list[str]) -> list[str]:
    if isinstance(holder, flags.FlagHolder) and holder.name == "config":
      return parse_flags(argv, holder, program)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      refuse(program, _flag_error(e))

  def guarded(argv: list[str]) -> None:
    try:
      main(argv)
    except errors.Refusal as e:
      refuse(program, e)

  app.run(guarded, flags_parser=parser)


def refuse(program: str, e: BaseException | str) -> NoReturn:
  """Prints `PROGRAM: MESSAGE` (the first line only) on stderr and exits with status 2."""
  line = (str(e) or type(e).__name__).splitlines()[0] if not isinstance(e, str) else e
  print(f"{program}: {line}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_CODE)
