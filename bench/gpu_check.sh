#!/usr/bin/env bash
# The GPU check in one call (see bench/gpu_check.py for what it measures):
#   bash bench/gpu_check.sh [RESULTS_DIR]            on a CUDA machine; default bench/results/
#   bash bench/gpu_check.sh --dry-run [RESULTS_DIR]  anywhere: the same code paths on CPU with tiny shapes
# On a machine without network, wheels made beforehand by `bash bench/gpu_wheels.sh` travel in .whl/: they are
# installed into a private folder (nothing of the image is changed) and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=()
if [ "${1:-}" = --dry-run ]; then dry_run=(--dry-run); shift; fi
out="${1:-bench/results}"
python="${PYTHON:-python3}"
if [ ${#dry_run[@]} -gt 0 ] && [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then python=.venv/bin/python; fi
if [ ${#dry_run[@]} -eq 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/sft-gpu-site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT_S:-470}" "$python" bench/gpu_check.py --out "$out" "${dry_run[@]}"
