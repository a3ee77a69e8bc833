// The launches of kernels/cuda/rvq.cu run through the CPU emulator
// (portable_cpu.h) as csrc/rvq_cuda.cpp makes them: the launch sequence and the
// float32 workspace of partial argmins, each launch by kernels/rvq.cuh's plan. A
// C ABI for tests/test_codec_emulator.py (ctypes): each entry returns 0, or 1 with
// the reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "rvq.cuh"

extern "C" {

const char* emu_error() { return pp_emu::g_error.c_str(); }

// x [n, D] and books [n_q, bins, D] float32 (the host converts them first).
// The launch sequence of RvqEncode::eval_gpu: q = 0..n_q over grids
// (ceil(n / V), S), then (ceil(n / V), 1), one float32 workspace `part`
// [n, n_q, S, 2] (NaN at the start). vectors: V, or 0 for the host's choice on
// an H100 (132 multiprocessors).
int emu_rvq_encode(const float* x, const float* books, int* codes, const RvqArgs* a,
                   unsigned seed, int vectors) {
  return pp_emu::guarded([&] {
    if (a->n == 0) return;
    const int S = rvq_encode_splits(a->bins);
    const int V = vectors ? vectors : rvq_encode_vectors(a->n, S, a->n_q, a->D, 132);
    std::vector<float> part(long(a->n) * a->n_q * S * 2, NAN);
    // rvq.cu's extern __shared__ smem, NaN before every block.
    std::vector<float> smem(rvq_encode_smem_floats(V, a->n_q, a->D));
    for (int q = 0; q <= a->n_q; ++q) {
      pp_emu::launch(
          rvq_encode_launch(*a, V, S, q), smem,
          [&](int bx, int by, int, int tid) {
            float* p = part.data();
            switch (V) {
              case 1: return rvq::encode<1>(x, books, codes, p, *a, q, S, smem.data(), bx, by, tid);
              case 2: return rvq::encode<2>(x, books, codes, p, *a, q, S, smem.data(), bx, by, tid);
              case 4: return rvq::encode<4>(x, books, codes, p, *a, q, S, smem.data(), bx, by, tid);
              default: pp_emu::fail("emulator: no rvq_encode_v" + std::to_string(V));
            }
          },
          seed + q);
    }
  });
}

// codes [n, n_q] int32; out [n, D] float32.
int emu_rvq_decode(const int* codes, const float* books, float* out, const RvqArgs* a,
                   unsigned seed) {
  return pp_emu::guarded([&] {
    const long size = long(a->n) * a->D;
    if (size == 0) return;
    std::vector<float> no_smem;
    pp_emu::launch(
        rvq_decode_launch(*a), no_smem,
        [&](int bx, int, int, int tid) {
          rvq::decode(codes, books, out, *a, long(bx) * kRvqDecodeThreads + tid);
        },
        seed);
  });
}

}  // extern "C"
