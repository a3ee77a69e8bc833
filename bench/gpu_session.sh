#!/usr/bin/env bash
# The whole GPU routine on the lent machine, in as few device calls as it allows
# (each call may run 10 minutes; MLX's CUDA build arrives in two parts, see
# ../shared/device/mlx-cuda-parts.sh). Here, once: ../shared/device/mlx-cuda-parts.sh,
# bench/pack_torch_deps.sh, bench/pack_gpu_test_deps.sh. Then on the GPU machine,
# back to back (it is given back after 30 s idle):
#   call 1  carry [".dev-mlx1"]                              bash .dev-mlx1/stage.sh
#   call 2  carry [".dev-mlx2", ".dev-pydeps"]               bash bench/gpu_session.sh build test
#   call 3  carry [".dev-mlx2", ".dev-torch"]                bash bench/gpu_session.sh official
#   call 4  carry [".dev-mlx2"]                              bash bench/gpu_session.sh build ours report
#   call 5  carry [".dev-mlx2"]                              bash bench/gpu_session.sh build kv8 report
# Seconds these took on the H200 (2026-12-01 evening), for planning the 30 minutes of a lease:
# build 127-140 (all fatbins), tests/gpu/test_matvec_gpu.py ~200, test_tick_gpu.py 20, the
# other tests/gpu files 266, official (4 batches, no --structure) 69, ours as tick_bench
# --batches 1,8,32,64 --formats 0,4 without --codec/--profile ~320 (engine start and the
# self-test included), kv8 at 64,128 ~80, dense-tc at 8,32,64 ~20. The night's lease: build 245
# (ring_attention.cu's fatbin the longest; since 776ca9c it compiles in ~60% of that time),
# tick + ring attention GPU tests 165, official 111 (with --structure), tick_bench of 8 rows
# (1,8,32,64 x bf16,q4, no profile) 59, parts 1-2 s each, ray 21, random-7b 29, serve 158-177.
# The late lease: build ~160, tick + ring + self-test GPU tests 168, pdl 53, official 92, ray 23 +
# serve at 112,128,136 with --kv-bits 8 177, ncu of 12 kernels in a B=64 tick_bench ~25 (a B=64
# bf16-cache run under ncu timed out: it backs up ~100 GB of device memory per replayed kernel).
# 2026-12-02: build 140-160, test_matvec_gpu + test_tick_gpu + test_selftest_gpu 309, ahead 60. A fresh
# machine's first engine start runs the kernels' self-test (about a minute) before any tick:
# a tick_bench given 60 s there timed out with nothing measured.
# 2026-12-02 later: a lease's first call (stage) held the machine ~38 s; build 132-149; tensor-core
# every-row-count + forced-split GPU tests 11-13; tick_bench 1,8,32,64 x bf16,q4 with --per-op-ticks 0
# ~110 on a fresh machine (the self-test included); official 4 batches 60-88; tick_bench --kv-bits 8
# 64,128 x 2 formats with --per-op-ticks 0 26 (the kv8 step runs the op-by-op engine too: minutes).
# 2026-12-02 lease F: build 114, tests/gpu whole 241 + 261 (in two calls), official 94 (with --structure),
# `table` 46 + 17, tc at 1,8,32,64 x bits 0,4,8 111 (it timed out at 110 s the first time: give it 180).
# Ticks are quick once the engine is up: spend a lease's seconds on builds and engine starts
# as little as possible (one tick_bench with many rows rather than several).
# `build` is a no-op when the sources did not change. GPU_TESTS="tests/gpu/test_x.py ..."
# runs a subset. Logs, JSON and the report (tables.md) go to $OUT (the device tool's
# return folder), else ./gpu-out; `report` reads the official loop's JSON from
# OFFICIAL_DIR (default: $out), so copy it back there when the calls' $OUT differ.
#   official   bench/official_loop.py (moshi's loop, its own process): full 7B and --structure
#   ours       bench/tick_bench.py: full (bf16, q4, per-op at B=1, codec, profiles) and --structure
#   table      issue 18's rows: bf16 and q4, the bf16 and the 8-bit KV cache, at BATCHES (parts timed in graphs
#              of their own), and the 8-bit cache at 128 sessions (ours.json, ours_kv8.json for `report`)
#   tc         bench/matvec_tc_bench.py: matvec's tensor-core path vs its streaming kernel vs MLX vs the
#              floor at the 7B's projection shapes, TC_BATCHES rows (default 1,8,32,64)
#   splits     matvec_tc_bench sweeping the split count along K (SPLITS) at SPLITS_BATCHES rows, and tick_bench
#              at BATCHES with the earlier split rule (PERSONAPLEX_MATVEC_TC_SPLITS=fill)
#   dense-tc   bench/tick_bench.py bf16 with PERSONAPLEX_DENSE_PROJ=tc (dense projections by the
#              tensor-core path instead of cuBLAS) at DENSE_TC_BATCHES (default 8,32,64)
#   ahead      matvec_tc_bench and tick_bench q4 at AHEAD_BATCHES (default 1,8) with PERSONAPLEX_MATVEC_TC_AHEAD=1, 0
#   pdl        bench/tick_bench.py bf16 and q4 at BATCHES with and without programmatic dependent launch
#              (--pdl 0,1), a line per row
#   ncu        Nsight Compute on NCU_KERNELS (regex, default the q4 tensor-core matvec and the 8-bit
#              attention) in tick_bench run with NCU_BENCH (default --batches 64 --formats 4 --kv-bits 8)
#   kv8        bench/tick_bench.py --kv-bits 8, bf16 and q4, at KV8_BATCHES (default 8,32,64,128)
#   report     tables.md, and tick.png where matplotlib imports (else: perf_report.py --plot here,
#              on the JSON brought back)
#   bench      the older per-level tables of bench/gpu_bench.py with torch_bench.py (H100 history)
#   parts      (nothing but what every call does first: the Ray Serve parts it carries, .dev-cluster/part-*,
#              copied to RAY_PARTS, default /tmp/cl, where the calls before left theirs)
#   ray        Ray Serve installed from the parts in RAY_PARTS (all of bench/pack_cluster_deps.sh's), once
#   random-7b  random weights of the official 7B's shape written to RANDOM_7B (default /root/random-7b; ~16 GB,
#              once a machine), and the kernels' self-test verdict cached, which each server would run first
#   serve      bench/serve_sessions.py: `serve` against `serve --replicas 1` (Ray Serve) on RANDOM_7B (else it
#              writes one itself, ~20-60 s more), SERVE_COUNTS sessions (default 64,68,72; ~76 fit in bf16),
#              SERVE_SECONDS measured (default 10), SERVE_ARGS added (e.g. "--kv-bits 8"), within
#              SERVE_TIMEOUT s (default 280); installs Ray first where `ray` has not run
# Serving (issue 16), after bench/pack_cluster_deps.sh here (parts aa, ab, ac of 40 MiB, ad of 13): the
# parts travel one a call (64 MiB a call), riding along with the calls above, each call within
# the machine's 30 s of warm time after the last (what /tmp/cl and /root hold goes with it):
#   call 1  carry [".dev-mlx1", ".dev-cluster/part-ad"]      bash .dev-mlx1/stage.sh && bash bench/gpu_session.sh parts
#   call 2  carry [".dev-mlx2", ".dev-pydeps"]               bash bench/gpu_session.sh build random-7b
#   call 3  carry [".dev-cluster/part-aa"]                   bash bench/gpu_session.sh parts
#   call 4  carry [".dev-cluster/part-ab"]                   bash bench/gpu_session.sh parts
#   call 5  carry [".dev-cluster/part-ac"]                   bash bench/gpu_session.sh ray
#   call 6  carry [".dev-pydeps"]                            bash bench/gpu_session.sh serve
# Calls after the second need not carry .dev-mlx2 (MLX stays unpacked in /root/mlxsite); `serve` needs
# .dev-pydeps (soundfile, soxr) where an earlier call's copy did not stay.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
here=$PWD
batches=${BATCHES:-1,8,32,64}

mlx_env() {
  if [ -f .dev-mlx2/env.sh ]; then
    # shellcheck disable=SC1091
    source .dev-mlx2/env.sh || exit 2
  elif [ -d /root/mlxsite/mlx ]; then  # unpacked by an earlier call
    export PYTHONPATH=/root/mlxsite${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "MLX CUDA is not staged on this machine: make the calls with .dev-mlx1, then .dev-mlx2, first" >&2; exit 2
  fi
  [ -d .dev-pydeps ] && export PYTHONPATH="$PYTHONPATH:$here/.dev-pydeps"
  export PYTHONUNBUFFERED=1
}

# Ray Serve (the version bench/pack_cluster_deps.sh packs) from the wheels in RAY_PARTS, into
# python3's environment, where the replicas' Ray workers (started with the same python3 and
# this PYTHONPATH) find it beside MLX and our package in /root/mlxsite.
cl=${RAY_PARTS:-/tmp/cl}
ray_install() {
  python3 -c "import ray.serve" 2>/dev/null && return 0
  if [ ! -d "$cl/wheels" ] && ! (cat "$cl"/part-* | tar -x -C "$cl") 2> "$out/ray_install.log"; then
    rm -rf "$cl/wheels"
    echo "ray: the parts in $cl ($(ls "$cl" 2>/dev/null | tr '\n' ' ')) are not all of .dev-cluster's: carry the others"
    return 1
  fi
  t0=$SECONDS
  python3 -m pip install -q --no-index --find-links "$cl/wheels" "ray[serve]==2.60.0" >> "$out/ray_install.log" 2>&1 ||
    { tail -5 "$out/ray_install.log"; return 1; }
  python3 -c "import ray, ray.serve; print('ray', ray.__version__, 'installed in $((SECONDS - t0)) s')"
}

if compgen -G ".dev-cluster/part-*" > /dev/null; then
  mkdir -p "$cl" && cp .dev-cluster/part-* "$cl/"
fi

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
        # shellcheck disable=SC2086
        timeout 480 python3 -m pytest -q ${GPU_TESTS:-tests/gpu} > "$out/gpu_tests.log" 2>&1
        grep -E "^(FAILED|ERROR)|passed|failed|Segmentation" "$out/gpu_tests.log" | tail -25 ) ;;
    official)
      ( export PYTHONUNBUFFERED=1
        timeout 330 python3 bench/official_loop.py --batches "$batches" --json "$out/official.json" > "$out/official.log" 2>&1
        timeout 200 python3 bench/official_loop.py --batches 1,8 --structure --json "$out/official_structure.json" \
          >> "$out/official.log" 2>&1
        grep "official loop" "$out/official.log" ) ;;
    ours)
      ( mlx_env
        timeout 380 python3 bench/tick_bench.py --batches "$batches" --formats 0,4 --codec --profile --matvec-small 4,8 \
          --json "$out/ours.json" > "$out/ours.log" 2>&1
        timeout 150 python3 bench/tick_bench.py --batches 1,8 --formats 0 --structure --profile --per-op-ticks 0 \
          --json "$out/ours_structure.json" >> "$out/ours.log" 2>&1
        grep -v '"profile"' "$out/ours.log" | tail -5; tail -c 600 "$out/ours.log" ) ;;
    table)
      # Issue 18's rows in one go: bf16 and q4, each with the bf16 and the 8-bit KV cache, at
      # BATCHES, every row's parts also timed each in a graph of its own (--profile:
      # graph_sections), then the 8-bit cache at TABLE_KV8_BATCHES (default 128, where the bf16
      # cache does not fit). Lease F (2026-12-02): 46 s and 17 s on a machine whose self-test
      # verdict was cached; `report` makes the tables and the picture from them.
      ( mlx_env
        timeout 300 python3 bench/tick_bench.py --batches "$batches" --formats 0,4 --kv-bits 16,8 --profile \
          --per-op-ticks 0 --json "$out/ours.json" > "$out/ours.log" 2>&1
        timeout 150 python3 bench/tick_bench.py --batches "${TABLE_KV8_BATCHES:-128}" --formats 0,4 --kv-bits 8 \
          --per-op-ticks 0 --json "$out/ours_kv8.json" > "$out/ours_kv8.log" 2>&1
        grep -h '"median"' "$out/ours.log" "$out/ours_kv8.log" | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(f\"{r['what']:18s} B={r['B']:<4d} {r['median']:7.2f} / {r['p99']:7.2f} ms\")" ) ;;
    tc)
      ( mlx_env
        timeout 240 python3 bench/matvec_tc_bench.py --batches "${TC_BATCHES:-1,8,32,64}" --json "$out/matvec_tc.json" \
          > "$out/matvec_tc.log" 2>&1
        tail -c 3000 "$out/matvec_tc.log" ) ;;
    ahead)
      # matvec_tc's 4-bit load-ahead (kernels/matvec_tc.cuh, Plan) against the default loop:
      # matvec_tc_bench (4-bit, AHEAD_BATCHES rows) and tick_bench q4 at AHEAD_BATCHES sessions,
      # each with PERSONAPLEX_MATVEC_TC_AHEAD=1 and 0.
      ( mlx_env
        for a in 1 0; do
          PERSONAPLEX_MATVEC_TC_AHEAD=$a timeout 200 python3 bench/matvec_tc_bench.py --bits 4 \
            --batches "${AHEAD_BATCHES:-1,8}" --json "$out/matvec_tc_ahead$a.json" > "$out/matvec_tc_ahead$a.log" 2>&1
          PERSONAPLEX_MATVEC_TC_AHEAD=$a timeout 200 python3 bench/tick_bench.py --batches "${AHEAD_BATCHES:-1,8}" \
            --formats 4 --per-op-ticks 0 --json "$out/ours_ahead$a.json" > "$out/ours_ahead$a.log" 2>&1
          echo "== ahead=$a"; grep -iE "q4|tc" "$out/matvec_tc_ahead$a.log" | tail -12; tail -3 "$out/ours_ahead$a.log"
        done ) ;;
    splits)
      # matvec_tc's split along K (matvec_tc_splits): matvec_tc_bench at the 7B's and the depformer's
      # shapes, bf16 and 4-bit, SPLITS_BATCHES rows, once per split count in SPLITS (0: the rule, fill:
      # the earlier rule), then tick_bench at BATCHES with the earlier rule (ours: the rule).
      ( mlx_env
        timeout 300 python3 bench/matvec_tc_bench.py --bits 0,4 --depformer --batches "${SPLITS_BATCHES:-8,32,64}" \
          --splits "${SPLITS:-0,fill,1,2,3,4,6,8,12,16}" --json "$out/matvec_tc_splits.json" > "$out/matvec_tc_splits.log" 2>&1
        tail -c 2500 "$out/matvec_tc_splits.log"
        PERSONAPLEX_MATVEC_TC_SPLITS=fill timeout 300 python3 bench/tick_bench.py --batches "$batches" --formats 0,4 \
          --per-op-ticks 0 --json "$out/ours_fill.json" > "$out/ours_fill.log" 2>&1
        echo "== the earlier rule (fill)"; tail -9 "$out/ours_fill.log" ) ;;
    dense-tc)
      ( mlx_env
        PERSONAPLEX_DENSE_PROJ=tc timeout 300 python3 bench/tick_bench.py --batches "${DENSE_TC_BATCHES:-8,32,64}" \
          --formats 0 --json "$out/ours_dense_tc.json" > "$out/ours_dense_tc.log" 2>&1
        tail -6 "$out/ours_dense_tc.log" ) ;;
    kv8)
      ( mlx_env
        timeout 420 python3 bench/tick_bench.py --batches "${KV8_BATCHES:-8,32,64,128}" --formats 0,4 --kv-bits 8 \
          --json "$out/ours_kv8.json" > "$out/ours_kv8.log" 2>&1
        tail -8 "$out/ours_kv8.log" ) ;;
    report)
      ( mlx_env
        dir=${OFFICIAL_DIR:-$out}
        extra=()
        [ -f "$out/ours_kv8.json" ] && extra+=(--ours "$out/ours_kv8.json")
        python3 -c "import matplotlib" 2>/dev/null && extra+=(--plot "$out/tick.png")
        [ -f "$out/ours_structure.json" ] && extra+=(--ours-structure "$out/ours_structure.json")
        [ -f "$dir/official_structure.json" ] && extra+=(--official-structure "$dir/official_structure.json")
        python3 bench/perf_report.py --ours "$out/ours.json" "${extra[@]}" --official "$dir/official.json" \
          > "$out/tables.md"
        tail -30 "$out/tables.md" ) ;;
    pdl)
      ( mlx_env
        timeout 420 python3 bench/tick_bench.py --batches "$batches" --formats 0,4 --pdl 0,1 --per-op-ticks 0 \
          --json "$out/ours_pdl.json" > "$out/ours_pdl.log" 2>&1
        python3 - "$out/ours_pdl.json" <<'PY'
import json, sys
rows = {(r["what"], r["B"]): r for r in json.load(open(sys.argv[1]))["rows"]}
for (what, B), r in sorted(rows.items(), key=lambda i: (i[0][0].replace(" no-pdl", ""), i[0][1])):
    print(f"{what:24s} B={B:<4d} median {r.get('median', float('nan')):7.2f}  p99 {r.get('p99', float('nan')):7.2f}")
PY
      ) ;;
    ncu)
      # Nsight Compute on some of one tick's kernels (hardware counters on this runtime; the
      # clocks left alone): NCU_KERNELS (a regex of kernel names), NCU_COUNT launches of them,
      # in tick_bench run with NCU_BENCH; the sections' text to $out/ncu-$NCU_TAG.txt.
      ( mlx_env
        ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
        [ -n "$ncu_bin" ] || { echo "ncu: not found"; exit 0; }
        tag=${NCU_TAG:-q4-kv8-64}
        # shellcheck disable=SC2086
        timeout "${NCU_TIMEOUT:-300}" "$ncu_bin" --clock-control none --target-processes all \
          --kernel-name "regex:${NCU_KERNELS:-matvec_tc_bf16_q4_n8|ring_attend_bf16_i8_d128_q1}" \
          --launch-count "${NCU_COUNT:-12}" --section SpeedOfLight --section Occupancy --section LaunchStats \
          --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
          python3 bench/tick_bench.py ${NCU_BENCH:---batches 64 --formats 4 --kv-bits 8} --ticks 2 --warmup 1 \
          --per-op-ticks 0 > "$out/ncu-$tag.txt" 2>&1
        echo "ncu $tag: exit status $?"
        grep -E "^  [a-z_0-9]+\(|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread" \
          "$out/ncu-$tag.txt" | head -${NCU_LINES:-40} ) ;;
    parts)
      echo "parts in $cl: $(ls "$cl" 2>/dev/null | tr '\n' ' ')" ;;
    ray)
      ray_install || exit 1 ;;
    random-7b)
      ( mlx_env
        dir=${RANDOM_7B:-/root/random-7b}
        if [ ! -f "$dir/config.json" ]; then
          rm -rf "$dir.part"
          t0=$SECONDS
          python3 -c "import sys; from personaplex_fast.tiny import make_random; make_random(sys.argv[1])" "$dir.part" \
            > "$out/random_7b.log" 2>&1 || { tail -5 "$out/random_7b.log"; df -h "$(dirname "$dir")"; exit 1; }
          mv "$dir.part" "$dir"
          echo "random-7b: $(du -sh "$dir" | cut -f1) written in $((SECONDS - t0)) s to $dir"
        fi
        t0=$SECONDS
        python3 -c "from personaplex_fast import selftest; print('self-test failures:', selftest.verdict() or 'none')"
        echo "self-test: $((SECONDS - t0)) s" ) || exit 1 ;;
    serve)
      ( mlx_env
        ray_install || exit 1
        dir=${RANDOM_7B:-/root/random-7b}
        model=(--random 7b)
        [ -f "$dir/config.json" ] && model=(--model "$dir")
        # shellcheck disable=SC2086
        timeout -k 20 "${SERVE_TIMEOUT:-280}" python3 bench/serve_sessions.py "${model[@]}" \
          --counts "${SERVE_COUNTS:-64,68,72}" --seconds "${SERVE_SECONDS:-10}" ${SERVE_ARGS:-} \
          --json "$out/serve_sessions.json" --logs "$out" > "$out/serve_sessions.log" 2>&1
        echo "serve_sessions: exit status $?"
        tail -12 "$out/serve_sessions.log" ) ;;
    bench)
      ( PYTHONUNBUFFERED=1 timeout 150 python3 bench/torch_bench.py --json "$out/torch.json" \
          > "$out/torch.log" 2>&1; tail -1 "$out/torch.log" )
      ( mlx_env
        timeout 400 python3 bench/gpu_bench.py --formats 0,4 --ref-batches 1 --iters 6 \
          --torch-json "$out/torch.json" --markdown "$out/perf.md" > "$out/bench.log" 2>&1
        tail -5 "$out/bench.log" ) ;;
    *) echo "gpu_session.sh: unknown step $step (build, test, official, ours, table, pdl, ncu, tc, splits, dense-tc, kv8, report, parts, ray, random-7b, serve, bench)" >&2; exit 2 ;;
  esac
done
