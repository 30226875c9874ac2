"""Runs a reference table's rows and writes its results: one command per table.

  python experiments/reproduce.py --table=synthetic --root=runs/reproduce
  python experiments/reproduce.py --table=ptb_lstm --root=runs/reproduce --rows=lm,anneal,ae_fb
  python experiments/reproduce.py --table=synthetic --root=runs/reproduce --report_only

The tables, their rows and protocols are listed in experiments/tables.py. For every seed
(`--seeds`, by default the table's) and every row (`--rows`, by default all, in the table's
order), the row's ordinary experiment command trains in `<root>/<table>/<row>_s<seed>` and
evaluates its best checkpoint (`eval_<split>.json`); on the embedded corpus a linear probe of
each factor follows (experiments/classify.py, `probe.json`). A row whose results exist is
skipped; an interrupted one is resumed exactly by re-running its command, which continues from
its last checkpoint (or only evaluates, if training had finished), so the whole command can be
stopped at any point and started again with the same `--root`. Two such commands may share a
root: a row another live process is running is left to it (`<workdir>.lock`).

A row is also finished when `<results_dir>/<table>.json` already records it with the same
command (the same script, config, variants and overrides; the workdir may differ) and the same
config (what the command's config file and variants give now, `config_differences`): results
committed from another machine last, though its workdirs are gone. Such a row is neither run
again nor dropped from the table; a record whose command or config no longer matches the table
(its protocol changed, perhaps inside a variant) is dropped, and the row runs again.

Then, from every finished row (also those of earlier invocations), it writes
`<results_dir>/<table>.json` (one record per row and seed: its command, config, commit, steps,
epochs, best step, wall time, machine, every scalar metric of `eval_<split>.json` with its
standard error, the probe accuracies; a summary over seeds per row, mean ± sd; the rows still
to run with their commands) and `<results_dir>/<table>.md` (the same as tables, generated),
and with `--figures` a comparison figure of the first seed's runs (experiments/report.py,
`<results_dir>/<table>.png`). `--results_dir` defaults to the repository's docs/results.
Every finished row's per-sentence IW-NLL (`eval_<split>_sentences.json`) is kept beside them,
in the split's order, as `<results_dir>/<table>_sentences/<row>_s<seed>.json`, so that two rows
can be compared sentence by sentence after their workdirs are gone:

  python experiments/reproduce.py --table=synthetic --root=runs/reproduce \
      --paired=cured_flow_gaussian,cured_vae

prints, for every seed both rows have, the mean difference of their IW-NLLs over the shared
sentences and its standard error (that of the paired differences: the test sentences' noise,
not the training seeds'), and changes nothing.

`--dry_run` prints the commands of the rows still to run and changes nothing. The commands
run with this interpreter, in the current directory (relative paths in a row's config, such as
`../shared/data/ptb`, are relative to it, as for any experiment command).
"""

from __future__ import annotations

import datetime
import functools
import glob
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags, logging
from ml_collections import config_flags
import numpy as np

import main_lib
import tables as tables_lib
from vae_jax import aggregate, configs, errors, fileio
from vae_jax.data import synthetic
from vae_jax.run_config import LM_KINDS
from vae_jax.training import writers

FLAGS = flags.FLAGS
EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(EXPERIMENTS)
RECORD_FILE = "reproduce.json"   # a row's invocations: command, wall time, commit, machine
PROBE_FILE = "probe.json"
PROBE_TRAIN_SPLIT = "train_1000"


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("table", None, sorted(tables_lib.TABLES), "The table to reproduce.",
                    required=True, **fv)
  flags.DEFINE_string("root", None, "Directory of the runs (<root>/<table>/<row>_s<seed>); "
                      "relative paths are relative to the current directory.", required=True,
                      **fv)
  flags.DEFINE_list("rows", [], "Rows to run (default: all, in the table's order).", **fv)
  flags.DEFINE_list("seeds", [], "Seeds to run (default: the table's).", **fv)
  flags.DEFINE_string("results_dir", os.path.join(REPOSITORY, "docs", "results"),
                      "Where <table>.json, <table>.md and <table>.png are written.", **fv)
  flags.DEFINE_bool("figures", True, "Write the comparison figure (experiments/report.py).",
                    **fv)
  flags.DEFINE_bool("report_only", False, "Run nothing: write the results of the rows that "
                    "finished.", **fv)
  flags.DEFINE_bool("dry_run", False, "Print the commands of the rows still to run; change "
                    "nothing.", **fv)
  flags.DEFINE_list("paired", [], "ROW_A,ROW_B: print their IW-NLL difference per seed, "
                    "paired sentence by sentence from the kept per-sentence values; change "
                    "nothing.", **fv)


# ------------------------------------------------------------------------------------------
# Rows as commands.

def workdir(root: str, table: tables_lib.Table, row: tables_lib.Row, seed: int) -> str:
  return os.path.join(root, table.name, f"{row.name}_s{seed}")


def _script_path(name: str) -> str:
  """experiments/<name> as the user would type it from the current directory."""
  return os.path.relpath(os.path.join(EXPERIMENTS, name))


def command(table: tables_lib.Table, row: tables_lib.Row, seed: int, path: str) -> list[str]:
  """The row's experiment command (without the interpreter)."""
  config = row.config or row.script
  variants = ",".join(v for v in (table.variants, row.variants) if v)
  config_arg = _script_path(os.path.join("configs", config)) + (f":{variants}" if variants else "")
  return [_script_path(row.script), f"--config={config_arg}", *table.overrides, *row.overrides,
          f"--config.train.seed={seed}", f"--workdir={path}"]


def probe_command(path: str) -> list[str]:
  """The linear probe of the embedded corpus's factors on a run's codes."""
  return [_script_path("classify.py"), f"--workdir={path}", "--corpus=synthetic",
          f"--train_splits={PROBE_TRAIN_SPLIT}", "--test_split=test",
          f"--out={os.path.join(path, PROBE_FILE)}"]


def eval_file(table: tables_lib.Table, path: str) -> str:
  return os.path.join(path, f"eval_{table.split}.json")


def _protocol(argv: Sequence[str]) -> list[str]:
  """A command as what it runs, not where: without the interpreter and the workdir, and with
  the script and config files by name (the directory they are typed from may differ)."""
  out = []
  for arg in argv:
    if arg == "python" or arg.startswith("--workdir="):
      continue
    if arg.startswith("--config=") and os.sep in arg:
      arg = "--config=" + os.path.basename(arg.removeprefix("--config="))
    elif arg.endswith(".py"):
      arg = os.path.basename(arg)
    out.append(arg)
  return out


@functools.cache
def parsed_config(args: tuple[str, ...]) -> dict[str, Any]:
  """The config an experiment command's `--config=FILE[:variants]` and `--config.*` flags
  give (no other flags), as JSON, the form of a run's `config.json` (before its paths are
  resolved)."""
  [config_arg] = [a.removeprefix("--config=") for a in args if a.startswith("--config=")]
  values = flags.FlagValues()
  # config_flags reads the `--config.*` overrides from sys.argv when --config is parsed.
  argv = ["reproduce", *(a for a in args if a.startswith("--config"))]
  saved, sys.argv = sys.argv, argv
  try:
    config_flags.DEFINE_config_file("config", config_arg, "", lock_config=True,
                                    flag_values=values)
    values(argv)
  finally:
    sys.argv = saved
  return json.loads(values["config"].value.to_json_best_effort(sort_keys=True))


@functools.cache
def default_config() -> dict[str, Any]:
  """Every setting's default (`configs/base.py`'s `base_config`), as JSON."""
  spec = importlib.util.spec_from_file_location(
      "reproduce_config_base", os.path.join(EXPERIMENTS, "configs", "base.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return json.loads(module.base_config().to_json_best_effort(sort_keys=True))


def row_config(table: tables_lib.Table, row: tables_lib.Row, seed: int) -> dict[str, Any]:
  """The config the row's command trains with, as JSON."""
  return parsed_config(tuple(command(table, row, seed, "")[1:-1]))


def config_differences(recorded_config: Mapping[str, Any], current: Mapping[str, Any],
                       defaults: Mapping[str, Any]) -> list[str]:
  """The settings in which a recorded run's config differs from the config its row's command
  gives now (`current`), as 'name: recorded -> current'. Paths are where, not what, and are
  not compared (`configs.PATH_FIELDS`). A setting the record lacks (added to the configs after
  it ran) differs only if the row sets it to another value than every config's default
  (`defaults`, `configs/base.py`'s `base_config`), i.e. if the row's protocol uses what the
  setting adds. Settings the record has and the config no longer has are not compared (they
  were removed, with whatever they did)."""
  was, now, default = (aggregate.flatten(recorded_config), aggregate.flatten(current),
                       aggregate.flatten(defaults))
  out = []
  for name, value in sorted(now.items()):
    if name in configs.PATH_FIELDS:
      continue
    if name in was:
      if was[name] != value:
        out.append(f"{name}: {was[name]!r} -> {value!r}")
    elif name in default and default[name] != value:
      out.append(f"{name}: (not recorded) -> {value!r}")
  return out


def recorded(table: tables_lib.Table, results_dir: str) -> dict[tuple[str, int], dict]:
  """The runs `<results_dir>/<table>.json` records as finished, by (row, seed), whose command
  and config are still the row's (`config_differences`: a variant of the config may change
  what the same command runs); records of another protocol are left out (with a warning)."""
  out, names = {}, {row.name: row for row in table.rows}
  for record in _read(results_dir, f"{table.name}.json").get("runs", []):
    row = names.get(record.get("row"))
    if not (row and (_protocol(shlex.split(record["command"]))
                     == _protocol(command(table, row, record["seed"], "")))):
      logging.warning("%s: the record of %s seed %s has another command than the table's "
                      "(%s); it is dropped and the row runs again.", table.name,
                      record.get("row"), record.get("seed"), record.get("command"))
      continue
    changed = config_differences(record.get("config", {}),
                                 row_config(table, row, record["seed"]), default_config())
    if changed:
      logging.warning("%s: the record of %s seed %s was run with another config than the "
                      "row's command gives now (%s); it is dropped and the row runs again.",
                      table.name, row.name, record["seed"], "; ".join(changed))
      continue
    out[(row.name, record["seed"])] = record
  return out


def is_finished(table: tables_lib.Table, path: str) -> bool:
  done = os.path.exists(eval_file(table, path))
  return done and (not table.probe or os.path.exists(os.path.join(path, PROBE_FILE)))


def selected(table: tables_lib.Table, rows: Sequence[str], seeds: Sequence[str]):
  """[(row, seed)] in running order: every row of the first seed, then of the next."""
  unknown = [r for r in rows if r not in {row.name for row in table.rows}]
  if unknown:
    raise errors.ConfigError(f"--rows: {', '.join(unknown)} not in table {table.name} (rows: "
                             f"{', '.join(r.name for r in table.rows)}).")
  chosen = [r for r in table.rows if not rows or r.name in rows]
  try:
    seed_list = [int(s) for s in seeds] if seeds else list(table.seeds)
  except ValueError:
    raise errors.ConfigError(f"--seeds={','.join(seeds)}: give integers, e.g. --seeds=0,1,2.")
  return [(row, seed) for seed in seed_list for row in chosen]


# ------------------------------------------------------------------------------------------
# Running.

def commit() -> str:
  """The repository's commit, with '-dirty' when tracked files differ from it."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPOSITORY).returncode
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("-dirty" if dirty else "")


def machine() -> str:
  """The processor and accelerators the commands run on."""
  import jax
  devices = jax.devices()
  kind = devices[0].device_kind if devices else "none"
  return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{len(devices)} × {devices[0].platform if devices else 'cpu'} ({kind}), "
          f"JAX {jax.__version__}")


class Lock:
  """`<path>.lock` held by this process while it runs a row; a lock whose process is gone
  (on this host) is taken over."""

  def __init__(self, path: str):
    self.path = path + ".lock"
    self.held = False

  def _owner_alive(self) -> bool:
    try:
      with open(self.path) as f:
        host, pid = f.read().split()
    except (OSError, ValueError):
      return False
    if host != socket.gethostname():
      return True     # cannot tell: assume the other host is running it
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True
    return True

  def acquire(self) -> bool:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        if self._owner_alive():
          return False
        os.remove(self.path)
        continue
      with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")
      self.held = True
      return True
    return False

  def release(self) -> None:
    if self.held:
      os.remove(self.path)
      self.held = False


def _run_logged(argv: list[str], path: str, log_name: str) -> int:
  """Runs `python argv` with its output appended to `<path>/<log_name>`; its exit status."""
  with open(os.path.join(path, log_name), "a") as log:
    log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')}: "
              f"{shlex.join(['python', *argv])}\n")
    log.flush()
    child = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT)
    try:
      status = child.wait()
    finally:
      if child.poll() is None:   # this process is being stopped: so is the row (it resumes)
        child.terminate()
        child.wait()
  return status


def _stop_on_sigterm() -> None:
  """SIGTERM ends this process like Ctrl-C, so that the running row is stopped with it (an
  orphaned row would keep writing to a workdir the next invocation takes over)."""
  def handler(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
  signal.signal(signal.SIGTERM, handler)


def read_record(path: str) -> dict[str, Any]:
  return _read(path, RECORD_FILE) or {"invocations": []}


def run_row(table: tables_lib.Table, row: tables_lib.Row, seed: int, path: str,
            machine_name: str, revision: str) -> bool:
  """Trains (or resumes) and evaluates one row, then probes it; True when it finished."""
  argv = command(table, row, seed, path)
  os.makedirs(path, exist_ok=True)
  record = read_record(path)
  record["command"] = shlex.join(["python", *argv])
  steps = [("train", argv)]
  if table.probe:
    steps.append(("probe", probe_command(path)))
  for name, step_argv in steps:
    output = eval_file(table, path) if name == "train" else os.path.join(path, PROBE_FILE)
    if os.path.exists(output):
      continue
    logging.info("%s %s seed %d: %s", table.name, row.name, seed,
                 shlex.join(["python", *step_argv]))
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    clock, status = time.time(), "stopped"
    try:
      status = _run_logged(step_argv, path, f"{name}.log")
    finally:   # a stopped invocation's time counts too
      record["invocations"].append({"step": name, "started": started,
                                    "wall_s": time.time() - clock, "status": status,
                                    "commit": revision, "machine": machine_name})
      fileio.write_json_atomic(os.path.join(path, RECORD_FILE), record, indent=1)
    if status != 0:
      logging.error("%s %s seed %d: %s exited with status %d (its log: %s).", table.name,
                    row.name, seed, name, status, os.path.join(path, f"{name}.log"))
      return False
  return True


# ------------------------------------------------------------------------------------------
# Results.

def probe_accuracies(path: str) -> dict[str, float]:
  """{'probe/<factor>': test accuracy} of a run's `probe.json`."""
  file = os.path.join(path, PROBE_FILE)
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    results = next(iter(json.load(f).values()))
  return {f"probe/{key.split('/')[0]}": float(value["accuracy"])
          for key, value in results.items() if key.endswith(PROBE_TRAIN_SPLIT)}


def _read(path: str, name: str) -> dict[str, Any]:
  file = os.path.join(path, name)
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    return json.load(f)


def portable(tree: Any) -> Any:
  """`tree` with every absolute path that exists made relative to the current directory (a
  run's config.json holds its data directories resolved)."""
  if isinstance(tree, Mapping):
    return {k: portable(v) for k, v in tree.items()}
  if isinstance(tree, str) and os.path.isabs(tree) and os.path.exists(tree):
    return os.path.relpath(tree)
  return tree


def exact_gap(sentences: Mapping[str, Any], exact: Mapping[str, np.ndarray]) -> dict[str, float]:
  """The model's IW-NLL minus the exact NLL, paired sentence by sentence:

    nll_gap = mean_x [-L_K(x) - (-log p(x))],   nll_gap_se = sd_x[...] / sqrt(N),

  from a run's `eval_<split>_sentences.json` and the split's exact per-sentence NLL and token
  counts (`synthetic_exact`). Its mean is the difference of the two means; its standard error
  is that of the paired differences, far smaller than either mean's (the sentences' own spread
  cancels). Empty, with a warning, if the run's sentences are not the split's as the grammar
  gives them (an index out of range, or token counts that differ: a truncated sentence)."""
  index = np.asarray(sentences["sentence"], np.int64)
  if index.size == 0 or index.max() >= len(exact["nll"]) or not np.array_equal(
      np.asarray(sentences["n_tokens"]), exact["n_tokens"][index]):
    logging.warning("the per-sentence evaluation is not of the split's sentences as the "
                    "grammar gives them (indices or token counts differ); no paired gap.")
    return {}
  gap = np.asarray(sentences["nll"], np.float64) - exact["nll"][index]
  return {"nll_gap": float(gap.mean()),
          "nll_gap_se": float(gap.std(ddof=1) / math.sqrt(len(gap))) if len(gap) > 1 else 0.0}


def with_gap(record: dict[str, Any], truth: Mapping[str, float]) -> dict[str, Any]:
  """`record` with `nll_gap` in its metrics: as recorded (paired, with its standard error),
  else the difference of the means `nll - exact_nll` alone (runs evaluated before
  per-sentence values were saved; the unpaired standard error would overstate its noise)."""
  metrics = record["metrics"]
  if "nll_gap" in metrics or "exact_nll" not in truth or "nll" not in metrics:
    return record
  return {**record, "metrics": {**metrics, "nll_gap": metrics["nll"] - truth["exact_nll"]}}


def row_record(table: tables_lib.Table, row: tables_lib.Row, seed: int, path: str,
               root: str, exact: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """Everything a table says of one finished run; with the split's `exact` per-sentence NLL,
  the paired gap to it (`exact_gap`)."""
  read = lambda name: _read(path, name)
  record = read_record(path)
  training = read("training.json")
  invocations = record.get("invocations", [])
  metrics = aggregate.scalars(read(f"eval_{table.split}.json"))
  sentences = read(f"eval_{table.split}_sentences.json")
  if exact is not None and sentences:
    metrics.update(exact_gap(sentences, exact))
  metrics.update(probe_accuracies(path))
  for key in ("epochs", "best_epoch"):
    if training.get(key) is not None:
      metrics[key] = float(training[key])
  return {
      "row": row.name, "seed": seed, "about": row.about,
      "workdir": os.path.relpath(path, root),
      "command": record.get("command", shlex.join(["python", *command(table, row, seed,
                                                                        path)])),
      "config": portable(read("config.json")),
      "commits": sorted({i["commit"] for i in invocations}),
      "machines": sorted({i["machine"] for i in invocations}),
      "wall_s": sum(i["wall_s"] for i in invocations),
      "invocations": len(invocations),
      "steps": training.get("steps"), "steps_per_epoch": training.get("steps_per_epoch"),
      "epochs": training.get("epochs"), "stopped_early": training.get("stopped_early"),
      "best_step": training.get("best_step"), "best_epoch": training.get("best_epoch"),
      "metrics": metrics,
  }


def summarize_rows(table: tables_lib.Table, records: Sequence[Mapping[str, Any]]):
  """Per row, over its finished seeds: mean, sd (ddof 1), se and n of every metric all of
  them report (`vae_jax.aggregate.summarize`), and the mean of each metric's own standard
  error (`<metric>_se`) for rows with one seed."""
  out = []
  for row in table.rows:
    runs = [r for r in records if r["row"] == row.name]
    if not runs:
      continue
    names = set.intersection(*(set(r["metrics"]) for r in runs))
    summary = {k: aggregate.summarize([r["metrics"][k] for r in runs]) for k in sorted(names)}
    entry = {"row": row.name, "about": row.about, "seeds": [r["seed"] for r in runs],
             "metrics": summary}
    if row.anchor is not None:
      entry["anchor"] = {"source": row.anchor.source, "metrics": dict(row.anchor.metrics),
                         "difference": anchor_differences(row.anchor, summary)}
    out.append(entry)
  return out


def anchor_differences(anchor: tables_lib.Anchor, summary: Mapping[str, Mapping[str, float]]):
  """Ours minus published, per anchored metric, with whether the difference lies within
  two run-to-run standard deviations (known only with two or more seeds)."""
  out = {}
  for name, published in anchor.metrics.items():
    if name not in summary:
      continue
    ours = summary[name]
    diff = ours["mean"] - published
    within = None if ours["n"] < 2 else abs(diff) <= 2 * ours["sd"]
    out[name] = {"ours": ours["mean"], "published": published, "difference": diff,
                 "within_2sd": within}
  return out


def _cell(summary: Mapping[str, Mapping[str, float]], column: tables_lib.Column,
          truth: Mapping[str, float]) -> str:
  stats = summary.get(column.metric)
  if stats is None:
    return "—"
  offset = column.offset
  if isinstance(offset, str):
    offset = truth.get(offset)
    if offset is None:
      return "—"
  mean = stats["mean"] - (offset or 0.0)
  spread = stats["sd"] if stats["n"] > 1 else summary.get(f"{column.metric}_se", {}).get("mean")
  text = f"{mean:.{column.digits}f}"
  if spread:
    text += f" ± {spread:.{column.digits}f}"
  return text


def markdown(table: tables_lib.Table, summaries, pending, truth, root_hint: str) -> str:
  """The generated Markdown of a table."""
  lines = [f"# {table.title}", "",
           f"Generated by `python experiments/reproduce.py --table={table.name} "
           f"--root={root_hint}` from the runs that finished; the numbers are in "
           f"`{table.name}.json`, with every row's command, config, commit, steps and wall "
           "time. Do not edit by hand.", "", "## Protocol", "", table.protocol, ""]
  if truth:
    lines += ["The truth on the same split: " + ", ".join(
        f"{k} = {v:.3f}" for k, v in truth.items() if not k.endswith("_se")) + ".", ""]
  lines += ["## Results", "",
            "Each cell is the mean ± standard deviation over the seeds shown (ddof 1); with one "
            "seed, the value ± its own standard error over sentences. NLL is in nats per "
            f"sentence on the {table.split} split.", ""]
  header = ["row", "seeds", *(c.title for c in table.columns)]
  lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(table.columns)]
  for s in summaries:
    cells = [f"{s['row']} ({s['about']})" if s["about"] else s["row"],
             ",".join(str(x) for x in s["seeds"])]
    cells += [_cell(s["metrics"], c, truth) for c in table.columns]
    lines.append("| " + " | ".join(cells) + " |")
  anchored = [s for s in summaries if "anchor" in s]
  if anchored:
    lines += ["", "## Beside the published numbers", "",
              "Difference = ours − published; 'within spread' asks whether it lies within two "
              "run-to-run standard deviations of ours (unknown with one seed).", "",
              "| row | metric | ours | published | difference | within spread | source |",
              "|---|---|---:|---:|---:|---|---|"]
    for s in anchored:
      for name, d in s["anchor"]["difference"].items():
        within = {None: "unknown (1 seed)", True: "yes", False: "no"}[d["within_2sd"]]
        lines.append(f"| {s['row']} | {name} | {d['ours']:.2f} | {d['published']:.2f} | "
                     f"{d['difference']:+.2f} | {within} | {s['anchor']['source']} |")
  if pending:
    lines += ["", "## Not yet run", "", "Each is one command (from the repository's root):", ""]
    for p in pending:
      where = ""
      if "step" in p:
        where = (f" (interrupted or running: step {p['step']}, best validation "
                 f"{p['best_metric']} {p['best_value']:.3f} at step {p['best_step']})")
      lines.append(f"- {p['row']}, seed {p['seed']}{where}: `{p['command']}`")
  return "\n".join(lines) + "\n"


def progress(path: str) -> dict[str, Any]:
  """How far an unfinished row got: its last validation step and its best validation value
  so far (`metrics.jsonl`); empty when it has not been validated yet."""
  config = _read(path, "config.json")
  metric = config.get("train", {}).get("best_metric") or (
      "nll" if config.get("model", {}).get("kind") in LM_KINDS else "neg_elbo")
  validated = [(entry["step"], entry["metrics"][metric]) for entry in writers.read_metrics(path)
               if entry.get("split") == "valid"
               and entry.get("metrics", {}).get(metric) is not None]
  if not validated:
    return {}
  last = validated[-1][0]
  best = min(validated, key=lambda entry: entry[1])
  return {"step": last, "best_step": best[0], "best_metric": metric, "best_value": best[1]}


def sentences_file(results_dir: str, table: tables_lib.Table, row: str,
                   seed: int | str) -> str:
  return os.path.join(results_dir, f"{table.name}_sentences", f"{row}_s{seed}.json")


def keep_sentences(table: tables_lib.Table, row: str, seed: int, path: str,
                   results_dir: str) -> None:
  """Writes a finished run's per-sentence IW-NLL, in the split's order and rounded to 1e-3
  nats (20 times below the paired differences' standard error), to `sentences_file` (with the
  sentences' indices when they are not the whole split from 0); nothing if the run saved
  none."""
  saved = _read(path, f"eval_{table.split}_sentences.json")
  if not saved:
    return
  order = np.argsort(saved["sentence"], kind="stable")
  index = np.asarray(saved["sentence"], np.int64)[order]
  kept = {"split": table.split, "nll": [round(float(x), 3)
                                         for x in np.asarray(saved["nll"])[order]]}
  if not np.array_equal(index, np.arange(len(index))):
    kept["sentence"] = index.tolist()
  file = sentences_file(results_dir, table, row, seed)
  os.makedirs(os.path.dirname(file), exist_ok=True)
  fileio.write_json_atomic(file, kept, indent=None, separators=(",", ":"))


def read_sentences(results_dir: str, table: tables_lib.Table, row: str,
                   seed: int) -> dict[int, float]:
  """{sentence index: IW-NLL} of a kept run; empty if none was kept."""
  kept = _read(*os.path.split(sentences_file(results_dir, table, row, seed)))
  if not kept:
    return {}
  index = kept.get("sentence", range(len(kept["nll"])))
  return dict(zip((int(i) for i in index), kept["nll"]))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, float]:
  """mean_x [nll_a(x) - nll_b(x)] over the sentences both have, with the standard error of
  those differences (ddof 1) and their number."""
  shared = sorted(set(a) & set(b))
  if not shared:
    return {}
  d = aggregate.summarize([a[i] - b[i] for i in shared])
  return {"difference": d["mean"], "se": d["se"], "n": d["n"]}


def write_results(table: tables_lib.Table, root: str, results_dir: str, truth,
                  seeds: Sequence[int],
                  earlier: Mapping[tuple[str, int], dict] | None = None,
                  exact: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """Collects every finished row × seed of `table` (under `root`, else among the `earlier`
  records, see `recorded`) and writes the JSON and the Markdown; returns the JSON's content.
  With the split's `exact` per-sentence NLL (`synthetic_exact`), every record carries its gap
  to it (`exact_gap`, `with_gap`)."""
  records, pending = [], []
  earlier = earlier or {}
  for seed in seeds:
    for row in table.rows:
      path = workdir(root, table, row, seed)
      if is_finished(table, path):
        records.append(with_gap(row_record(table, row, seed, path, root, exact), truth))
        keep_sentences(table, row.name, seed, path, results_dir)
      elif (row.name, seed) in earlier:
        records.append(with_gap(earlier[(row.name, seed)], truth))
      else:
        pending.append({"row": row.name, "seed": seed, "command": shlex.join(
            ["python", *command(table, row, seed, path)]), **progress(path)})
  summaries = summarize_rows(table, records)
  content = {"table": table.name, "title": table.title, "protocol": table.protocol,
             "split": table.split, "truth": truth, "runs": records, "summary": summaries,
             "pending": pending}
  os.makedirs(results_dir, exist_ok=True)
  fileio.write_json_atomic(os.path.join(results_dir, f"{table.name}.json"), content, indent=1)
  fileio.write_text_atomic(os.path.join(results_dir, f"{table.name}.md"),
                           markdown(table, summaries, pending, truth, root))
  return content


def write_figure(table: tables_lib.Table, root: str, results_dir: str, seed: int,
                 finished: int) -> None:
  """experiments/report.py over the finished runs of `seed`: their comparison figure. The
  figure needs the runs' files: it is left as it is while fewer of them are under `root` than
  the `finished` runs of `seed` the table records."""
  paths = [workdir(root, table, row, seed) for row in table.rows]
  paths = [p for p in paths if is_finished(table, p)]
  if not paths:
    return
  if len(paths) < finished:
    logging.info("%s.png not rewritten: %d of the %d finished runs of seed %d are under %s.",
                 table.name, len(paths), finished, seed, root)
    return
  argv = [_script_path("report.py"), *(f"--workdir={p}" for p in paths),
          f"--out={os.path.join(results_dir, table.name + '.png')}"]
  status = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
  if status.returncode != 0:
    logging.warning("report.py failed (status %d): %s", status.returncode,
                    status.stderr[-2000:])


def synthetic_exact(split: str = "test") -> dict[str, np.ndarray]:
  """Every sentence of the embedded corpus's `split`, in order: its exact NLL -log p(x) (EOS
  included), its token count |x| + 1, and the exact information it carries about the factors,
  H(f) - H(f | x)."""
  examples = synthetic.generate(split)
  posteriors = np.array([synthetic.factor_posterior(e.tokens) for e in examples])
  # H(f | x); labels the sentence rules out (p = 0) add 0 log 1 = 0.
  conditional = -np.sum(posteriors * np.log(np.where(posteriors > 0, posteriors, 1.0)), axis=1)
  return {"nll": np.array([-synthetic.log_prob(e.tokens) for e in examples]),
          "n_tokens": np.array([len(e.tokens) + 1 for e in examples]),
          "information": synthetic.FACTOR_ENTROPY - conditional}


def synthetic_truth(exact: Mapping[str, np.ndarray]) -> dict[str, float]:
  """The embedded corpus's exact NLL of a split (mean over its sentences of -log p(x), EOS
  included) and the exact information its sentences carry about the factors,
  I(x; f) = H(f) - mean_x H(f | x), each with its standard error over sentences, from the
  split's `synthetic_exact`."""
  se = lambda v: float(np.std(v, ddof=1) / math.sqrt(len(v)))
  nll, info = exact["nll"], exact["information"]
  return {"exact_nll": float(nll.mean()), "exact_nll_se": se(nll),
          "factor_information": float(info.mean()), "factor_information_se": se(info)}


def print_paired(table: tables_lib.Table, results_dir: str, rows: Sequence[str]) -> None:
  """`--paired=A,B`: A's IW-NLL minus B's, per seed both have kept (`paired_difference`)."""
  names = {row.name for row in table.rows}
  if len(rows) != 2 or not set(rows) <= names:
    raise errors.ConfigError(f"--paired takes two rows of {table.name} ({', '.join(sorted(names))})"
                             f", got {','.join(rows)}.")
  kept = (os.path.basename(f).removeprefix(f"{rows[0]}_s").removesuffix(".json")
          for f in glob.glob(sentences_file(results_dir, table, rows[0], "*")))
  for seed in sorted({int(s) for s in kept if s.isdigit()} | set(table.seeds)):
    got = paired_difference(*(read_sentences(results_dir, table, r, seed) for r in rows))
    if got:
      print(f"seed {seed}: {rows[0]} - {rows[1]} = {got['difference']:+.4f} ± {got['se']:.4f} "
            f"nats over {got['n']} sentences")
    else:
      print(f"seed {seed}: no per-sentence values kept for both")


def main(argv):
  main_lib.no_arguments(argv)
  table = tables_lib.TABLES[FLAGS.table]
  # Commands name the root as given (they run in this directory); files are read through it.
  root = FLAGS.root
  results_dir = FLAGS.results_dir
  if FLAGS.paired:
    print_paired(table, results_dir, FLAGS.paired)
    return
  chosen = selected(table, FLAGS.rows, FLAGS.seeds)
  earlier = recorded(table, results_dir)
  todo = [(row, seed) for row, seed in chosen if (row.name, seed) not in earlier
          and not is_finished(table, workdir(root, table, row, seed))]
  if FLAGS.dry_run:
    for row, seed in todo:
      print(shlex.join(["python", *command(table, row, seed, workdir(root, table, row, seed))]))
    return
  failed = []
  _stop_on_sigterm()
  if not FLAGS.report_only and todo:
    revision, machine_name = commit(), machine()
    for row, seed in todo:
      path = workdir(root, table, row, seed)
      lock = Lock(path)
      if not lock.acquire():
        logging.info("%s seed %d is running in another process (%s); skipped.", row.name,
                     seed, lock.path)
        continue
      try:
        if not run_row(table, row, seed, path, machine_name, revision):
          failed.append(f"{row.name} seed {seed}")
      except KeyboardInterrupt:
        print(f"stopped during {row.name} seed {seed}; the same command continues it.")
        sys.exit(130)
      finally:
        lock.release()
  seeds = sorted({seed for _, seed in chosen} | set(table.seeds))
  exact = synthetic_exact(table.split) if table.probe else None
  truth = synthetic_truth(exact) if exact is not None else {}
  content = write_results(table, root, results_dir, truth, seeds, earlier, exact)
  if FLAGS.figures:
    write_figure(table, root, results_dir, seeds[0],
                 sum(r["seed"] == seeds[0] for r in content["runs"]))
  print(f"{table.name}: {len(content['runs'])} runs finished, {len(content['pending'])} to "
        f"run; wrote {os.path.join(results_dir, table.name)}.json and .md")
  if failed:
    raise errors.UserError(f"{len(failed)} rows failed: {', '.join(failed)} (see their "
                           "train.log / probe.log).")


if __name__ == "__main__":
  main_lib.run(define_flags, main)
