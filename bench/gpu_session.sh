#!/usr/bin/env bash
# The whole GPU routine on the lent machine, in as few device calls as it allows
# (each call may run 10 minutes; MLX's CUDA build arrives in two parts, see
# ../shared/device/mlx-cuda-parts.sh). Here, once: ../shared/device/mlx-cuda-parts.sh,
# bench/pack_torch_deps.sh, bench/pack_gpu_test_deps.sh. Then on the GPU machine:
#   call 1  carry [".dev-mlx1"]                 bash .dev-mlx1/stage.sh
#   call 2  carry [".dev-mlx2", ".dev-pydeps"]  bash bench/gpu_session.sh build test
#   call 3  carry [".dev-mlx2", ".dev-torch"]   bash bench/gpu_session.sh build bench
# (call 3 right after call 2, while the machine is warm: it is given back after 30 s
# idle; `build` is a no-op then). GPU_TESTS="tests/gpu/test_x.py ..." runs a subset.
# Logs and the table go to $OUT (the device tool's return folder), else ./gpu-out.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
here=$PWD

mlx_env() {
  # shellcheck disable=SC1091
  source .dev-mlx2/env.sh || exit 2
  [ -d .dev-pydeps ] && export PYTHONPATH="$PYTHONPATH:$here/.dev-pydeps"
}

for step in "$@"; do
  case $step in
    build)
      ( mlx_env
        # Rebuild only when the sources differ from the installed build's.
        stamp=$(find csrc kernels python cmake CMakeLists.txt pyproject.toml -type f -not -path '*/__pycache__/*' | sort | xargs md5sum | md5sum)
        built=/root/mlxsite/personaplex_fast/.sources-md5
        if [ "$(cat "$built" 2>/dev/null)" != "$stamp" ]; then
          python3 -m pip install --no-build-isolation --no-deps --target /root/mlxsite . -q > "$out/build.log" 2>&1 ||
            { tail -30 "$out/build.log"; exit 1; }
          echo "$stamp" > "$built"
        fi
        echo "build: ok" ) || exit 1 ;;
    test)
      ( mlx_env
        # GPU_TESTS: a subset (files or -k expressions) when the device time is short.
        # shellcheck disable=SC2086
        timeout 540 python3 -m pytest -q ${GPU_TESTS:-tests/gpu} > "$out/gpu_tests.log" 2>&1
        grep -E "^(FAILED|ERROR)|passed|failed|Segmentation" "$out/gpu_tests.log" | tail -25 ) ;;
    bench)
      # PyTorch in its own process first (the two frameworks never share the GPU's memory).
      ( PYTHONUNBUFFERED=1 timeout 150 python3 bench/torch_bench.py --json "$out/torch.json" \
          > "$out/torch.log" 2>&1; tail -1 "$out/torch.log" )
      ( mlx_env
        PYTHONUNBUFFERED=1 timeout 400 python3 bench/gpu_bench.py --formats 0,4 --ref-batches 1 --iters 6 \
          --torch-json "$out/torch.json" --markdown "$out/perf.md" > "$out/bench.log" 2>&1
        tail -5 "$out/bench.log" ) ;;
    *) echo "gpu_session.sh: unknown step $step (build, test, bench)" >&2; exit 2 ;;
  esac
done
