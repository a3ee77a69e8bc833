#!/usr/bin/env bash
# Copy the pure-Python packages bench/torch_bench.py needs, and the GPU image may lack, into
# .dev-torch/ at the repo root (git-ignored through .git/info/exclude); torch_bench.py puts it
# first on sys.path. Run here, where moshi is installed:
#   bench/pack_torch_deps.sh            # or PYTHON=/path/to/python bench/pack_torch_deps.sh
# then carry .dev-torch to the GPU machine (run's carry=[".dev-torch"]).
#
# moshi: Kyutai's reference implementation (installed here with --no-deps).
# einops: moshi's transformer and quantizer import it at module level.
# Not carried: huggingface_hub, safetensors, sentencepiece (moshi.models.loaders imports them
# for downloads and the text tokenizer; torch_bench.py stubs them where they are missing, and
# two are compiled), numpy and torch (in the image).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dest=.dev-torch
limit_kb=$((30 * 1024))

rm -rf "$dest"
mkdir -p "$dest"
for package in moshi einops; do
    # find_spec locates a package without importing it (moshi's imports need more than it).
    src=$("$python" -c 'import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
print(os.path.dirname(spec.origin) if spec and spec.origin else "")' "$package")
    if [ -z "$src" ]; then
        echo "pack_torch_deps.sh: $python cannot find $package; install it (pip install --no-deps moshi==0.2.13 einops) or set PYTHON" >&2
        exit 2
    fi
    cp -R "$src" "$dest/$package"
done
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
"$python" -c 'import importlib.metadata as m; print("moshi", m.version("moshi"), "einops", m.version("einops"))' \
    > "$dest/VERSIONS" || true

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.dev-torch/' "$exclude" 2>/dev/null || echo '/.dev-torch/' >> "$exclude"

size_kb=$(du -sk "$dest" | cut -f1)
if [ "$size_kb" -gt "$limit_kb" ]; then
    echo "pack_torch_deps.sh: $dest is ${size_kb} KB, over the 30 MB limit" >&2
    exit 1
fi
echo "$dest: ${size_kb} KB ($(tr '\n' ' ' < "$dest/VERSIONS"))"
