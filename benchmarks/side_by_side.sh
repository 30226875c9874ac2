#!/usr/bin/env bash
# Side-by-side throughput of vae_jax and the PyTorch reference (jxhe/vae-lagging-encoder).
#
#   benchmarks/side_by_side.sh OUT_DIR REFERENCE_DIR REFERENCE_PYTHON [ROUNDS] [-- FLAGS...]
#
# REFERENCE_DIR is a clone of github.com/jxhe/vae-lagging-encoder and REFERENCE_PYTHON a
# Python with PyTorch (e.g. a venv made with `pip install torch numpy`). The two programs are
# alternated ROUNDS times (default 3), each run timing one pass over the same PTB batches
# after a warm-up pass (train_throughput.py --rounds=1, reference_throughput.py --rounds=1),
# so that machine noise hits both alike; then compare_throughput.py writes OUT_DIR/table.md
# with the median and range over rounds. FLAGS after `--` go to both programs (e.g.
# `-- --sizes=ptb --eval_sentences=0`). Run it from the repository root on a quiet machine.
set -euo pipefail

if [[ $# -lt 3 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]] && exit 0 || exit 2
fi
out=$1 ref_dir=$2 ref_python=$3
shift 3
rounds=3
if [[ $# -gt 0 && "$1" != "--" ]]; then rounds=$1; shift; fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
mkdir -p "$out"
for ((r = 1; r <= rounds; r++)); do
  echo "== round $r of $rounds: reference" >&2
  "$ref_python" "$here/reference_throughput.py" --reference_dir="$ref_dir" --rounds=1 \
      --output="$out/reference_$r.json" "$@" > "$out/reference_$r.log" 2>&1
  echo "== round $r of $rounds: vae_jax" >&2
  "$python" "$here/train_throughput.py" --rounds=1 --output="$out/ours_$r.json" "$@" \
      > "$out/ours_$r.log" 2>&1
done
"$python" "$here/compare_throughput.py" --ours "$out"/ours_*.json \
    --reference "$out"/reference_*.json --output="$out/table.md"
