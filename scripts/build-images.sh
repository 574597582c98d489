#!/usr/bin/env bash
# Build (and optionally push) the two images: the operator (no torch) and the trainer (CUDA torch, DeepSpeed).
#
#   scripts/build-images.sh [--registry R] [--tag T] [--platform P] [--push] [--dry-run]
#   scripts/build-images.sh --base-digest     print the current digest of the pinned base image
#
# Defaults: registry ghcr.io/whetstone-dev, tag = the chart's appVersion (helm/whetstone/Chart.yaml), so the
# images are the ones the chart's defaults name; platform linux/amd64. Needs Docker with buildx.
# --dry-run prints the commands instead of running them (tests/test_images.py checks them).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
registry="ghcr.io/whetstone-dev"
tag="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$repo/helm/whetstone/Chart.yaml")"
platform="linux/amd64"
push=0
dry=0
base="python:3.11-slim-bookworm"

while (($#)); do
  case "$1" in
    --registry) registry="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --platform) platform="$2"; shift 2 ;;
    --push) push=1; shift ;;
    --dry-run) dry=1; shift ;;
    --base-digest)
      docker buildx imagetools inspect "$base" --format '{{json .Manifest.Digest}}' | tr -d '"'
      exit 0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$tag" ]] || { echo "no appVersion in helm/whetstone/Chart.yaml; pass --tag" >&2; exit 2; }

output=(--load)
((push)) && output=(--push)
for image in operator trainer; do
  dockerfile="$repo/operator/Dockerfile"
  [[ "$image" == trainer ]] && dockerfile="$repo/trainer-image/Dockerfile"
  cmd=(docker buildx build --file "$dockerfile" --platform "$platform" --tag "$registry/whetstone-$image:$tag"
       --label "org.opencontainers.image.version=$tag" "${output[@]}" "$repo")
  if ((dry)); then
    printf '%q ' "${cmd[@]}"; echo
  else
    echo "[build-images] $registry/whetstone-$image:$tag" >&2
    "${cmd[@]}"
  fi
done
