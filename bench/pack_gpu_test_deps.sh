#!/usr/bin/env bash
# The wheels the GPU tests need beyond the GPU image (soundfile with its bundled
# libsndfile, soxr, cffi, pycparser: audio I/O of the engine and CLI tests), unpacked for
# the image's Python 3.12 into .dev-pydeps/ at the repo root (git-ignored through
# .git/info/exclude). Run here (it downloads from PyPI), then on the GPU machine carry
# ".dev-pydeps" and `export PYTHONPATH=$PYTHONPATH:$PWD/.dev-pydeps` before
# `python -m pytest tests/gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.dev-pydeps
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$tmp" soundfile soxr cffi pycparser
rm -rf "$dest"
mkdir -p "$dest"
for wheel in "$tmp"/*.whl; do (cd "$dest" && python3 -m zipfile -e "$wheel" .); done
grep -qx "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
du -sh "$dest"
