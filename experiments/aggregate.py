"""Mean ± standard deviation over seeds of finished runs.

  python experiments/aggregate.py --workdir=runs/vae_s0 --workdir=runs/vae_s1 --workdir=runs/vae_s2
  python experiments/aggregate.py runs/vae_s* runs/lm_s* --split=test --out=runs/seeds.json

Workdirs (as flags or as arguments, so a shell pattern works) whose saved configs differ only
in `train.seed` form one row; every numeric scalar of their `eval_<split>.json` is summarised
by its mean, standard deviation over seeds (ddof = 1), standard error and number of seeds
(`vae_jax.aggregate`). Prints a Markdown table of `--columns` and writes every statistic to
`--out` as JSON.
"""

import os

from absl import flags

import main_lib

FLAGS = flags.FLAGS

COLUMNS = ["nll", "ppl", "kl", "mi_per_batch", "mi_set", "au"]


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_multi_string("workdir", [], "A finished run's directory (repeat; or give the "
                            "directories as arguments).", **fv)
  flags.DEFINE_string("split", "test", "Which eval_<split>.json to read.", **fv)
  flags.DEFINE_list("columns", COLUMNS, "Metrics shown in the table.", **fv)
  flags.DEFINE_string("out", None, "JSON file for every statistic of every group.", **fv)


def main(argv):
  from vae_jax import aggregate, errors, fileio
  from vae_jax.workdir import resolve_path, resolve_workdir
  given = [*FLAGS.workdir, *argv[1:]]
  if not given:
    raise errors.ConfigError("no runs: give --workdir=DIR (repeatable) or the directories as "
                             "arguments.")
  runs = [aggregate.read_run(resolve_workdir(w, must_exist=True), FLAGS.split)
          for w in given]
  records = aggregate.aggregate(aggregate.group_runs(runs))
  print(f"{FLAGS.split} split, mean ± sd over seeds:")
  print(aggregate.table(records, FLAGS.columns))
  if FLAGS.out:
    out = resolve_path(FLAGS.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fileio.write_json_atomic(out, records)


if __name__ == "__main__":
  main_lib.run(define_flags, main)
