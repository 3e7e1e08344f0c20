#!/usr/bin/env bash
# Set up autopeft in a virtual environment.
#
#   bash scripts/setup.sh            # library + CLI
#   bash scripts/setup.sh --test     # ... plus what the test suite needs
#   bash scripts/setup.sh --bench    # ... plus what the benchmarks compare against (Hugging Face peft)
#
# Environment:
#   AUTOPEFT_VENV   the environment to install into (default: .venv beside this repo). Point it at
#                   an existing environment to keep the torch build you already have there.
#   AUTOPEFT_TORCH  the torch requirement to install when torch is missing (default below).
#
# torch: an installed torch is never replaced. When none is installed and no NVIDIA GPU is seen,
# the CPU build is wanted: pip installs "torch==2.13.0", which resolves to a local CPU wheel where
# one is provided (as on our CI machines). Elsewhere point pip at PyTorch's CPU index first, e.g.
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# With a GPU, install the CUDA build you need before running this script.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="${extras:+$extras,}test" ;;
    --bench) extras="${extras:+$extras,}bench" ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (valid: --test, --bench)" >&2; exit 2 ;;
  esac
done

venv="${AUTOPEFT_VENV:-$repo/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"

if "$py" -c "import torch" 2>/dev/null; then
  echo "setup.sh: keeping installed torch $("$py" -c 'import torch; print(torch.__version__)')"
else
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup.sh: a GPU is present; installing the default (CUDA) torch build" >&2
    "$py" -m pip install --quiet "${AUTOPEFT_TORCH:-torch}"
  else
    "$py" -m pip install --quiet "${AUTOPEFT_TORCH:-torch==2.13.0}"
  fi
fi

target="$repo"
[ -n "$extras" ] && target="$repo[$extras]"
"$py" -m pip install --quiet -e "$target"
echo "setup.sh: ready: $venv/bin/autopeft"
