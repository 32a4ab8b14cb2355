#!/usr/bin/env bash
# Reproducible install of cs2acdc-uda into .venv (override with UDA_VENV):
#   1. every package from the hash-locked requirements/main.txt (pip verifies each file);
#   2. mmcv-full 1.7.2, built once from its hash-checked source release
#      (no wheels exist for torch 2.13 / CPU) and cached as a wheel in
#      $UDA_CACHE_DIR (default ~/.cache/cs2acdc-uda), so later installs take seconds;
#   3. this project, editable.
# Re-running is cheap: a stamp records the lock files the environment was built from.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${UDA_VENV:-.venv}
CACHE=${UDA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cs2acdc-uda}   # the same folder as uda/data/paths.py:cache_dir
log() { printf '[install] %s\n' "$*"; }
# pip's output without the noise of this machine's pip.conf; with pipefail a pip failure still fails the script
quiet() { sed -u -e '/^WARNING: Location/d' -e '/^Requirement already satisfied/d' -e '/^Obtaining/d'; }

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "cs2acdc-uda needs Python 3.11 (the lock and the mmcv-full build are for CPython 3.11)." >&2
  echo "Install it, or point PYTHON at a Python 3.11 interpreter." >&2
  exit 1
fi

stamp_value=$(cat requirements/main.txt requirements/mmcv.txt pyproject.toml | sha256sum | cut -c1-16)
stamp_file="$VENV/.cs2acdc-installed"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_value" ]; then
  log "environment $VENV is up to date"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

log "installing the hash-locked requirements (torch 2.13.0 + torchvision 0.28.0 from PyPI: ~5 GB on first install)"
"${PIP[@]}" install --progress-bar off --require-hashes --no-deps -r requirements/main.txt 2>&1 | quiet

torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
py_tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel_dir="$CACHE/wheels/mmcv-full-1.7.2-torch$torch_version-$py_tag-cpu"
if ! ls "$wheel_dir"/mmcv_full-1.7.2-*.whl >/dev/null 2>&1; then
  log "building mmcv-full 1.7.2 with CPU ops (once; ~10 min on 2 cores), cached in $wheel_dir"
  build_dir=$(mktemp -d)
  trap 'rm -rf "$build_dir"' EXIT
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "${PIP[@]}" wheel --progress-bar off --no-build-isolation --no-deps --require-hashes \
    -r requirements/mmcv.txt -w "$build_dir" 2>&1 | quiet
  ls "$build_dir"/mmcv_full-1.7.2-*.whl >/dev/null 2>&1 \
    || { echo "Building mmcv-full failed; see the output above." >&2; exit 1; }
  mkdir -p "$(dirname "$wheel_dir")"
  tmp_dir="$wheel_dir.tmp.$$"
  rm -rf "$tmp_dir"; mkdir -p "$tmp_dir"
  mv "$build_dir"/mmcv_full-1.7.2-*.whl "$tmp_dir"/
  rm -rf "$wheel_dir"; mv "$tmp_dir" "$wheel_dir"   # publish the cache entry atomically
else
  log "using the cached mmcv-full wheel from $wheel_dir"
fi
"${PIP[@]}" install --progress-bar off --no-deps --no-index --force-reinstall "$wheel_dir"/mmcv_full-1.7.2-*.whl 2>&1 | quiet

log "installing cs2acdc-uda (editable)"
"${PIP[@]}" install --progress-bar off --no-deps --no-build-isolation -e . 2>&1 | quiet
"$VENV/bin/python" -c "import mmcv, mmseg, uda; from mmcv.ops import nms" \
  || { echo "The environment does not import mmcv/mmseg/uda; see the output above." >&2; exit 1; }

echo "$stamp_value" > "$stamp_file"
log "done in $(( $(date +%s) - start )) s"
