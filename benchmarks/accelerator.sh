#!/usr/bin/env bash
# Throughput of the JAX training step on a GPU, beside the field's PyTorch code on the same GPU.
#
#   benchmarks/accelerator.sh --output_dir=gpu_results
#   benchmarks/accelerator.sh --output_dir=gpu_results \
#       --reference_dir=/path/to/vae-lagging-encoder --reference_python=/path/to/torch/bin/python
#
# On a machine with an NVIDIA GPU it
#   1. prints `nvidia-smi` and the JAX devices (also saved in the output folder),
#   2. runs tests/training/test_accelerator_ready.py, whose transfer guard checks every
#      device->host transfer only on an accelerator (skip with --skip_tests),
#   3. runs benchmarks/train_throughput.py            -> <output_dir>/ours.json,
#   4. with a reference clone, benchmarks/reference_throughput.py under a Python with PyTorch
#                                                      -> <output_dir>/reference.json,
#   5. and benchmarks/compare_throughput.py on the two -> the table, also in comparison.txt.
# It installs nothing. What it needs, installed by hand (the lines it does not run):
#
#   .venv/bin/pip install -U "jax[cuda12]"       # JAX with the CUDA 12 wheels, in this project's venv
#   git clone https://github.com/jxhe/vae-lagging-encoder /path/to/vae-lagging-encoder
#   python3 -m venv /path/to/torch && /path/to/torch/bin/pip install numpy torch \
#       --index-url https://download.pytorch.org/whl/cu124   # PyTorch with CUDA, for the reference
#
# Every option can also be given as an environment variable (the upper-case name):
# OUTPUT_DIR, DATA_DIR, SIZES, STEPS, REFERENCE_DIR, REFERENCE_PYTHON, PYTHON.
# Arguments after `--` go to train_throughput.py as they are.

set -euo pipefail

usage() {
  cat <<EOF
Usage: benchmarks/accelerator.sh [options] [-- extra train_throughput.py flags]

Times the JAX train step on this machine's GPU (benchmarks/train_throughput.py) and, with
--reference_dir, the PyTorch reference on the same GPU, then prints the comparison table.
Needs an NVIDIA GPU and JAX with CUDA; installs nothing (see the comments at the top).

Options (environment variable in brackets):
  --output_dir=DIR        folder for the JSON results and logs [OUTPUT_DIR]
                          (default: accelerator_results/<date-time> in the current folder)
  --data_dir=DIR          folder with ptb/ (and yahoo/) [DATA_DIR]
                          (default: ../shared/data beside the repository)
  --sizes=LIST            comma-separated model sizes, passed to both benchmarks [SIZES]
                          (default: each benchmark's own)
  --steps=N               timed train steps per size, passed to both [STEPS] (default: theirs)
  --reference_dir=DIR     clone of github.com/jxhe/vae-lagging-encoder [REFERENCE_DIR];
                          without it only our throughput is measured
  --reference_python=PY   Python with PyTorch for the reference [REFERENCE_PYTHON]
                          (default: python3)
  --python=PY             Python with this project and JAX [PYTHON]
                          (default: the repository's .venv/bin/python if present, else python3)
  --skip_tests            do not run tests/training/test_accelerator_ready.py first
  --dry_run               print the commands without checking for a GPU or running them
  -h, --help              this message
EOF
}

die() {
  echo "accelerator.sh: $*" >&2
  exit "${EXIT_CODE:-1}"
}

caller="$PWD"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

OUTPUT_DIR="${OUTPUT_DIR:-}"
DATA_DIR="${DATA_DIR:-}"
SIZES="${SIZES:-}"
STEPS="${STEPS:-}"
REFERENCE_DIR="${REFERENCE_DIR:-}"
REFERENCE_PYTHON="${REFERENCE_PYTHON:-python3}"
PYTHON="${PYTHON:-}"
skip_tests=0
dry_run=0
extra=()

value_of() {  # --name=value or --name value; sets $value and $shift_by
  local name="$1" arg="$2" next="${3-}" has_next="$4"
  if [[ "$arg" == *=* ]]; then
    value="${arg#*=}"
    shift_by=1
  elif [[ "$has_next" == 1 ]]; then
    value="$next"
    shift_by=2
  else
    usage >&2
    EXIT_CODE=2 die "$name needs a value."
  fi
  if [[ -z "$value" ]]; then
    usage >&2
    EXIT_CODE=2 die "$name needs a non-empty value."
  fi
}

while [[ $# -gt 0 ]]; do
  has_next=0
  [[ $# -gt 1 ]] && has_next=1
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --skip_tests) skip_tests=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    --output_dir|--output_dir=*|--data_dir|--data_dir=*|--sizes|--sizes=*|--steps|--steps=*|\
    --reference_dir|--reference_dir=*|--reference_python|--reference_python=*|\
    --python|--python=*)
      name=${1%%=*}  # --data_dir -> DATA_DIR, and so on
      value_of "$name" "$1" "${2-}" "$has_next"
      var=${name#--}
      printf -v "${var^^}" '%s' "$value"; shift "$shift_by" ;;
    *) usage >&2; EXIT_CODE=2 die "unknown argument '$1' (train_throughput.py flags go after --)." ;;
  esac
done

if [[ -n "$STEPS" && ! "$STEPS" =~ ^[1-9][0-9]*$ ]]; then
  EXIT_CODE=2 die "--steps must be a positive integer, got '$STEPS'."
fi

# Paths given relative to where the script was called from; the defaults are relative to the
# repository, where the commands run.
from_caller() {
  if [[ -z "$1" || "$1" == /* ]]; then echo "$1"; else echo "$caller/$1"; fi
}
OUTPUT_DIR="$(from_caller "${OUTPUT_DIR:-accelerator_results/$(date +%Y%m%d-%H%M%S)}")"
DATA_DIR="$(from_caller "$DATA_DIR")"
REFERENCE_DIR="$(from_caller "$REFERENCE_DIR")"
[[ "$PYTHON" == */* ]] && PYTHON="$(from_caller "$PYTHON")"
[[ "$REFERENCE_PYTHON" == */* ]] && REFERENCE_PYTHON="$(from_caller "$REFERENCE_PYTHON")"
cd "$repo"
DATA_DIR="${DATA_DIR:-../shared/data}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -n "$REFERENCE_DIR" && ! -f "$REFERENCE_DIR/text.py" ]]; then
  EXIT_CODE=2 die "--reference_dir=$REFERENCE_DIR is not a clone of jxhe/vae-lagging-encoder (no text.py there)."
fi

shared=(--data_dir="$DATA_DIR")
[[ -n "$SIZES" ]] && shared+=(--sizes="$SIZES")
[[ -n "$STEPS" ]] && shared+=(--steps="$STEPS")
ours_cmd=("$PYTHON" benchmarks/train_throughput.py "${shared[@]}" --output="$OUTPUT_DIR/ours.json"
          ${extra[@]+"${extra[@]}"})
reference_cmd=("$REFERENCE_PYTHON" benchmarks/reference_throughput.py
               --reference_dir="$REFERENCE_DIR" "${shared[@]}" --output="$OUTPUT_DIR/reference.json")
compare_cmd=("$PYTHON" benchmarks/compare_throughput.py --ours="$OUTPUT_DIR/ours.json"
             --reference="$OUTPUT_DIR/reference.json")
test_cmd=("$PYTHON" -m pytest -q tests/training/test_accelerator_ready.py)

if [[ "$dry_run" == 1 ]]; then
  echo "# the commands accelerator.sh would run (in $repo):"
  echo "nvidia-smi"
  [[ "$skip_tests" == 1 ]] || echo "${test_cmd[*]}"
  echo "${ours_cmd[*]}"
  if [[ -n "$REFERENCE_DIR" ]]; then
    echo "${reference_cmd[*]}"
    echo "${compare_cmd[*]}"
  fi
  exit 0
fi

# A GPU, and a JAX that uses it.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  EXIT_CODE=3 die "no GPU here: nvidia-smi is not installed. Run this on a machine with an NVIDIA GPU (--help)."
fi
if ! gpus="$(nvidia-smi -L 2>&1)" || ! grep -q '^GPU ' <<<"$gpus"; then
  EXIT_CODE=3 die "no GPU here: nvidia-smi -L lists none (${gpus:-no output})."
fi
if ! backend="$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>&1 | tail -n 1)" \
    || [[ "$backend" != "gpu" ]]; then
  EXIT_CODE=3 die "$PYTHON's JAX does not use the GPU (default backend: ${backend:-?}); install it with: $PYTHON -m pip install -U \"jax[cuda12]\""
fi

mkdir -p "$OUTPUT_DIR"
nvidia-smi | tee "$OUTPUT_DIR/nvidia-smi.txt"
"$PYTHON" -c 'import jax, jaxlib, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__)
print("devices", jax.devices())' | tee "$OUTPUT_DIR/environment.txt"

tests_failed=0
if [[ "$skip_tests" == 0 ]]; then
  echo "== ${test_cmd[*]}"
  if ! "${test_cmd[@]}" 2>&1 | tee "$OUTPUT_DIR/test_accelerator_ready.log"; then
    tests_failed=1  # the timings are still worth having; the exit status reports it
    echo "accelerator.sh: warning: test_accelerator_ready.py failed on the GPU (see $OUTPUT_DIR/test_accelerator_ready.log); measuring anyway." >&2
  fi
fi

echo "== ${ours_cmd[*]}"
"${ours_cmd[@]}" 2>&1 | tee "$OUTPUT_DIR/ours.log"

if [[ -z "$REFERENCE_DIR" ]]; then
  echo "No --reference_dir: measured ours only ($OUTPUT_DIR/ours.json)."
  exit "$tests_failed"
fi
if ! torch_info="$("$REFERENCE_PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>&1 | tail -n 1)"; then
  die "$REFERENCE_PYTHON cannot import torch ($torch_info); set --reference_python to a Python with PyTorch."
fi
echo "torch $torch_info (version, CUDA available)" | tee -a "$OUTPUT_DIR/environment.txt"
if [[ "$torch_info" != *True ]]; then
  echo "accelerator.sh: warning: $REFERENCE_PYTHON's PyTorch does not see the GPU; the reference runs on the CPU." >&2
fi

echo "== ${reference_cmd[*]}"
"${reference_cmd[@]}" 2>&1 | tee "$OUTPUT_DIR/reference.log"

echo "== ${compare_cmd[*]}"
"${compare_cmd[@]}" 2>&1 | tee "$OUTPUT_DIR/comparison.txt"
exit "$tests_failed"
