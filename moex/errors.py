"""The one base class of every refusal moex shows a user as one line.

A command catches `Refusal` (in `moex.cli.run`), prints `PROGRAM: MESSAGE` on stderr and exits
with status 2. Every module's own error class (ConfigError, WorkdirError, CheckpointError,
FormatError, ...) derives from it, so a command never lists which kinds it catches.
The message is the whole line the user sees: name the key, file or flag, and the fix.
"""

EXIT_CODE = 2  # What a refused command exits with (absl's usage errors exit 1).


class Refusal(Exception):
  """A refusal the user can act on; str(e) is the one line to show."""
