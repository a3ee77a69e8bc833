#!/usr/bin/env bash
# Ray Serve for the GPU image's Python 3.12 (the distributed mode, `serve --replicas`, and
# bench/serve_sessions.py's client there): the wheels of `ray[serve]` with their dependencies
# (aiohttp among them), ~130 MB, more than one call to the GPU machine carries (64 MiB in
# all), so they go as parts of 40 MiB in .dev-cluster/ (git-ignored through .git/info/exclude).
# Run here (it downloads from PyPI); then on the GPU machine, one call per part, each within
# the machine's warm time of the last, so that /tmp/cl stays:
#
#   carry [".dev-cluster/part-aa"]:  mkdir -p /tmp/cl && cp .dev-cluster/part-aa /tmp/cl/
#   carry [".dev-cluster/part-ab"]:  cp .dev-cluster/part-ab /tmp/cl/
#   ... every part, then in the call that carries the last one:
#     cat /tmp/cl/part-* | tar -x -C /tmp/cl && python3 -m pip install -q --no-index \
#         --find-links /tmp/cl/wheels "ray[serve]==2.60.0"
#
# (pip installs only what the image lacks.) Checked here by the same install into a fresh
# Python 3.12 virtual environment when one is at hand (PYTHON312=/path/to/python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.dev-cluster
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/wheels"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$tmp/wheels" "ray[serve]==2.60.0"
rm -rf "$dest"
mkdir -p "$dest"
tar -C "$tmp" -cf - wheels | split -b 40M - "$dest/part-"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >> "$exclude"
ls -l "$dest"
if [ -n "${PYTHON312:-}" ]; then
    "$PYTHON312" -m venv "$tmp/venv"
    mkdir -p "$tmp/cl"
    cat "$dest"/part-* | tar -x -C "$tmp/cl"
    "$tmp/venv/bin/python" -m pip install -q --no-index --find-links "$tmp/cl/wheels" "ray[serve]==2.60.0"
    "$tmp/venv/bin/python" -c "import ray, ray.serve, fastapi, aiohttp; print('installs from the parts:', ray.__version__)"
fi
