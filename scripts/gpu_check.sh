#!/usr/bin/env bash
# The GPU check (issue 15): align vs TRL 1.16, DPO and GRPO (HF generate), one process and FSDP2 with one process, on
# a config-built model of Qwen2.5-0.5B's shape in bf16; prints tokens/s, MFU, peak GPU memory per run and the ratios.
# Everything it does is in scripts/gpu_check.py (its docstring says how each figure is measured).
#
#   scripts/gpu_check.sh --fetch-wheels DIR      # here, with PyPI: the wheels the GPU machine lacks, into DIR
#   scripts/gpu_check.sh --wheels DIR [ARGS]     # there, no network: install DIR's wheels, run the check
#   scripts/gpu_check.sh --cpu --tiny            # the CPU path (a tiny model, one-process runs; tests run it)
#
# The GPU machine (torch 2.11, transformers 5.17, accelerate 1.15, peft; Python 3.12, x86-64) has no trl, datasets
# or vLLM and reaches no registry. What the check imports that it lacks, exactly: trl and datasets, and datasets'
# dill and multiprocess (pyarrow, pandas, xxhash, fsspec, huggingface-hub, psutil, jinja2 are in its image). All
# four are pure-Python wheels, under 2 MiB together; align runs from this checkout (PYTHONPATH), not installed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS_PINNED=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
LIMIT_MIB=50

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  dir="${2:?usage: scripts/gpu_check.sh --fetch-wheels DIR}"
  mkdir -p "$dir"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dir" "${WHEELS_PINNED[@]}"
  size_kib=$(du -sk "$dir" | cut -f1)
  ls -l "$dir"
  echo "gpu_check: $(ls "$dir"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB in $dir (limit ${LIMIT_MIB} MiB)"
  if (( size_kib > LIMIT_MIB * 1024 )); then
    echo "gpu_check: $dir is over ${LIMIT_MIB} MiB: carry only the wheels listed above" >&2
    exit 1
  fi
  exit 0
fi

wheels=""
args=()
while (( $# )); do
  case "$1" in
    --wheels) wheels="${2:?--wheels DIR}"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

pythonpath="$REPO"
if [[ -n "$wheels" ]]; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site-XXXXXX")"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  pythonpath="$pythonpath:$site"
fi
export PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
exec python3 "$REPO/scripts/gpu_check.py" ${args[@]+"${args[@]}"}
