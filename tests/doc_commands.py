"""The `python experiments/...` commands written in README.md and docs/*.md, as argument lists.

A command is found in an inline code span (`` `python experiments/vae.py --workdir=runs/x` ``,
which may wrap across lines) or in a fenced code block, where the little shell the docs use is
expanded: line continuations, comments, `NAME=value` assignments and `$NAME` / `${NAME}`
references (split into words, as an unquoted reference is), `for v in a b c; do ... done` loops,
and `&&` / `;` chains. Each command comes back with the file and line it was written on.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`]*?\bpython3? experiments/[^`]*)`")
_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_FOR = re.compile(r"^for ([A-Za-z_][A-Za-z0-9_]*) in (.*?);\s*do$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclasses.dataclass(frozen=True)
class Command:
  where: str        # file:line
  argv: tuple[str, ...]  # ('python', 'experiments/vae.py', '--workdir=...', ...)

  @property
  def script(self) -> str:
    return self.argv[1]

  @property
  def args(self) -> list[str]:
    return list(self.argv[2:])

  def __str__(self) -> str:
    return f"{self.where}: {shlex.join(self.argv)}"


def _expand(text: str, variables: dict[str, str]) -> str:
  return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def _commands_of(line: str, variables: dict[str, str]) -> list[tuple[str, ...]]:
  out = []
  for part in re.split(r"&&|;", _expand(line, variables)):
    if "experiments/" not in part:
      continue
    words = shlex.split(part, comments=True)
    if len(words) >= 2 and words[0] in ("python", "python3") and words[1].startswith(
        "experiments/"):
      out.append(tuple(words))
  return out


def _shell_block(block: str, first_line: int, name: str) -> list[Command]:
  """The commands of a fenced block, with its variables and loops expanded."""
  logical: list[tuple[int, str]] = []  # (line number, text) with continuations joined
  pending, start = "", None
  for offset, raw in enumerate(block.split("\n")):
    if start is None:
      start = first_line + offset
    if raw.rstrip().endswith("\\"):
      pending += raw.rstrip()[:-1] + " "
      continue
    logical.append((start, pending + raw))
    pending, start = "", None
  variables: dict[str, str] = {}
  loop: tuple[str, list[str]] | None = None
  body: list[tuple[int, str]] = []
  commands = []
  for number, text in logical:
    text = text.strip()
    if not text or text.startswith("#"):
      continue
    if loop is not None:
      if text == "done":
        var, values = loop
        for value in values:
          for n, line in body:
            commands += [Command(f"{name}:{n}", argv)
                         for argv in _commands_of(line, {**variables, var: value})]
        loop, body = None, []
      else:
        body.append((number, text))
      continue
    found = _FOR.match(text)
    if found:
      loop = (found.group(1), shlex.split(_expand(found.group(2), variables)))
      continue
    found = _ASSIGN.match(text)
    if found and "experiments/" not in text.split("=", 1)[0]:
      variables[found.group(1)] = " ".join(shlex.split(_expand(found.group(2), variables)))
      continue
    commands += [Command(f"{name}:{number}", argv) for argv in _commands_of(text, variables)]
  return commands


def documented_commands(paths=DOCS) -> list[Command]:
  """Every `python experiments/...` command of the given Markdown files."""
  commands = []
  for path in paths:
    text = path.read_text()
    name = path.relative_to(ROOT).as_posix()
    blocks = []
    for block in _FENCE.finditer(text):
      first = text.count("\n", 0, block.start(1)) + 1
      commands += _shell_block(block.group(1), first, name)
      blocks.append(block.span())
    for span in _INLINE.finditer(text):
      if any(a <= span.start() < b for a, b in blocks):
        continue
      line = text.count("\n", 0, span.start()) + 1
      commands += [Command(f"{name}:{line}", argv)
                   for argv in _commands_of(" ".join(span.group(1).split()), {})]
  return commands


def readme_quick_start() -> list[Command]:
  """The experiment commands of README's "Quick start" section, in order."""
  readme = ROOT / "README.md"
  text = readme.read_text()
  section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
  assert section, "README.md has no '## Quick start' section"
  first = text.count("\n", 0, section.start(1)) + 1
  commands = []
  for block in _FENCE.finditer(section.group(1)):
    line = first + section.group(1).count("\n", 0, block.start(1))
    commands += _shell_block(block.group(1), line, "README.md")
  return commands
