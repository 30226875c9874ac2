"""A run's directory: where it is, whether it can be written, whether it holds a run to resume.

A workdir holds `config.json`, `vocab.json`, `metrics.jsonl`, `checkpoints/`, `eval_<split>.json`
and the TensorBoard files of one run. The rules:

- Paths are resolved once, at the command-line boundary, to normal absolute paths (so a run
  started as `--workdir=runs/x` from one directory is the same run as `--workdir=/abs/runs/x`,
  and `../shared/data/ptb/` is the same corpus as `../shared/data/ptb`).
- A workdir *resumes* when it holds a committed checkpoint under `checkpoints/latest/`; without
  one it is *fresh*, whatever else it holds (the `config.json` or `vocab.json` of a start that
  failed never blocks the corrected command).
- Nothing is written before the config and every split the run will read were checked; then
  `prepare` creates the folder and checks that it can be written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from absl import logging

from vae_jax import errors

CHECKPOINTS = "checkpoints"


def resolve_path(path: str | os.PathLike[str]) -> str:
  """`path` as a normal absolute path (`~` expanded; `a/./b/` and `a/b` are the same)."""
  return os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def resolve_workdir(workdir: str | os.PathLike[str] | None, *, must_exist: bool = False) -> str:
  """The absolute workdir, checked without writing anything.

  Raises:
    WorkdirError: if it is empty, is a file (or lies under one), or, with `must_exist`, is not
      a directory.
  """
  if workdir is None or not os.fspath(workdir).strip():
    raise errors.WorkdirError("--workdir is empty: give the directory of the run, e.g. "
                              "--workdir=runs/my_run.")
  path = resolve_path(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.WorkdirError(f"--workdir={workdir} is a file ({path}), not a directory: give "
                              "a directory path (it is created if missing).")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise errors.WorkdirError(f"--workdir={workdir}: {parent} is a file, so {path} cannot be "
                              "created; choose another path.")
  if must_exist and not os.path.isdir(path):
    raise errors.WorkdirError(f"--workdir={workdir}: {path} does not exist; give the directory "
                              "of a run written by an experiments/*.py command.")
  return path


def prepare(workdir: str) -> None:
  """Creates `workdir` and checks that files can be written in it.

  Raises:
    WorkdirError: naming the folder, if it cannot be created or written.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.WorkdirError(f"cannot write to the workdir {workdir} ({e.strerror or e}); "
                              "choose a writable --workdir or fix its permissions.") from e


def committed_steps(workdir: str) -> list[int]:
  """Steps of the committed latest checkpoints (folders `checkpoints/latest/<step>`; orbax
  writes a step under a temporary name and renames it when complete)."""
  latest = os.path.join(workdir, CHECKPOINTS, "latest")
  if not os.path.isdir(latest):
    return []
  return sorted(int(n) for n in os.listdir(latest)
                if n.isdigit() and os.path.isdir(os.path.join(latest, n)))


def is_fresh(workdir: str) -> bool:
  """True unless the workdir holds a committed latest checkpoint to resume from."""
  return not committed_steps(workdir)


def discard_stale_checkpoints(workdir: str) -> None:
  """Removes the checkpoints of an earlier start that never committed a latest one (a best
  checkpoint is saved just before the latest of the same step): a fresh run starts clean."""
  directory = os.path.join(workdir, CHECKPOINTS)
  if os.path.isdir(directory) and is_fresh(workdir):
    logging.info("Removing %s: it holds no committed latest checkpoint, so this run starts "
                 "fresh.", directory)
    shutil.rmtree(directory)


def read_json(path: str, what: str) -> Any:
  """The JSON in `path`; a damaged file is a `WorkdirError` that names it.

  `what` says what the file is for the message, e.g. "the run's config".
  """
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.WorkdirError(f"{path} ({what}) is damaged ({e}); restore it from a copy or "
                              "start a fresh --workdir.") from e


def differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted field, saved value, current value) for every field the two nested dicts disagree
  on. Fields absent from `saved` (added to the configs since it was written) are skipped."""
  out = []
  for key, now in current.items():
    if key not in saved:
      continue
    before = saved[key]
    name = f"{prefix}{key}"
    if isinstance(now, Mapping) and isinstance(before, Mapping):
      out += differences(before, now, name + ".")
    elif before != now:
      out.append((name, before, now))
  return out
