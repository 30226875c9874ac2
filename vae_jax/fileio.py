"""Atomic writes: a file a run writes is either its old version or its complete new one.

A run can be killed, or its disk fill up, at any moment. Every file a run writes (configs,
vocabularies, evaluation results, reports) goes through `write_text_atomic`: the text goes to a
temporary file in the same directory, is flushed to disk, and replaces the target with one
`os.replace`, which is atomic on POSIX file systems. A reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
  """Writes `text` to `path` (UTF-8) atomically; the folder must exist."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` atomically; the folder must exist. The file gets the usual
  permissions (0o666 less the umask), like one written by `open`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(directory,
                     f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any, **dump_kwargs) -> None:
  """`json.dumps(obj, indent=2, **dump_kwargs)` written to `path` atomically."""
  dump_kwargs.setdefault("indent", 2)
  write_text_atomic(path, json.dumps(obj, **dump_kwargs) + "\n")
