// The launches of kernels/cuda/rvq.cu run through the CPU emulator
// (portable_cpu.h), with the host logic of csrc/rvq_cuda.cpp (grids, block sizes,
// the launch sequence, the float32 workspace of partial argmins). A C ABI for
// tests/test_codec_emulator.py (ctypes): each entry returns 0, or 1 with the
// reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "codec_host.h"
#include "rvq.cuh"

namespace {

using codec_host::blocks_for;
using pp_emu::Dim3;

}  // namespace

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
          Dim3{blocks_for(a->n, V), q < a->n_q ? S : 1, 1}, kRvqEncodeThreads, smem,
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
        Dim3{blocks_for(size, kRvqDecodeThreads), 1, 1}, kRvqDecodeThreads, no_smem,
        [&](int bx, int, int, int tid) {
          rvq::decode(codes, books, out, *a, long(bx) * kRvqDecodeThreads + tid);
        },
        seed);
  });
}

}  // extern "C"
