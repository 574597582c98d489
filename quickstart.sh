#!/usr/bin/env bash
# One command for a fresh machine: install everything, then fine-tune the bundled tiny model on a synthetic
# task (reverse a string of digits) and show the before/after answers. No cluster, no GPU, no downloads from
# a model hub.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$("$repo/scripts/bootstrap.sh")"
"$(dirname "$python")/whetstone" run "$repo/manifests/examples/sft-tiny-reverse.yaml" "$@"
