#!/usr/bin/env bash
# Set up .venv with torch and this project (tested versions from constraints.txt).
#   bash scripts/install.sh          runtime
#   bash scripts/install.sh --dev    + test tools (pytest, ruff, shellcheck) and the benchmark extra (trl)
# Environment:
#   PYTHON=python3.11                interpreter for the venv (default python3)
#   TORCH_INDEX_URL=URL              where torch comes from, e.g. https://download.pytorch.org/whl/cpu for a
#                                    CPU-only laptop (PyPI's default torch wheel on Linux is the CUDA build)
#   SFT_EXTRAS=flash                 extra features, comma-separated (flash = flash-attn, needs CUDA to build)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${SFT_EXTRAS:-}"
if [[ "${1:-}" == "--dev" ]]; then extras="dev,bench${extras:+,$extras}"; fi

[[ -x .venv/bin/python ]] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# torch first, pinned: an unpinned torch (or a dependency's looser range) would pull a multi-GB CUDA build.
torch_version=$(grep -E '^torch==' constraints.txt | cut -d= -f3)
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null
then
  "${pip[@]}" install -q "torch==$torch_version" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"${pip[@]}" install -q -c constraints.txt -e ".${extras:+[$extras]}"
# The linter the tests of slurm/ and scripts/ use (skipped without it): Debian's package where we may install it.
if [[ "${1:-}" == "--dev" ]] && ! command -v shellcheck >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck) \
      >/dev/null || echo "note: could not install shellcheck; the shell-script lint tests will be skipped" >&2
  else
    echo "note: shellcheck not found; install it (e.g. sudo apt-get install shellcheck) or the shell-script lint" \
      "tests are skipped" >&2
  fi
fi
# Render trainer/sft.py --help once for these versions, so that it shows in a fraction of a second from now on.
.venv/bin/python trainer/sft.py --help >/dev/null
echo "installed: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
