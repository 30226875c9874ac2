"""The expected failures of a run: things the person running the command can fix.

Every class here derives from `UserError`. Its message is one line that names the file, folder
or config field at fault and says what to do. The experiment mains catch `UserError`, print
`error: <message>` on stderr and exit with status 2, without a traceback; the traceback is
logged at `--verbosity=1`. Anything else that escapes is a bug and keeps its traceback.

The classes also derive from the built-in exception a caller would expect (`ValueError`,
`FileNotFoundError`, ...), so `except ValueError` around library calls keeps working.
"""

from __future__ import annotations


class UserError(Exception):
  """An expected failure; `str(e)` is one actionable line."""

  def __init__(self, message: str):
    super().__init__(one_line(message))


def one_line(message: str) -> str:
  """`message` with its line breaks and runs of blanks folded into single spaces."""
  return " ".join(str(message).split())


class ConfigError(UserError, ValueError):
  """A config value or command-line flag is invalid; the message names the field."""


class DataError(UserError, ValueError):
  """A corpus file is missing, empty, unreadable or malformed; the message names the file
  (and the line, where one is at fault)."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A corpus directory or file does not exist."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be used: it is a file, cannot be written, or holds another run."""


class VocabMismatchError(UserError, ValueError):
  """The vocabulary of this run differs from the one a workdir's checkpoints were trained
  with."""


class CheckpointError(UserError):
  """No checkpoint of a run can be restored."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A workdir has no checkpoint of the requested kind."""


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss or the parameters stopped being finite; the last good checkpoint is intact."""
