// The launches of kernels/cuda/rvq.cu run through the CPU emulator
// (portable_cpu.h), with the host logic of csrc/rvq_cuda.cpp (grids, block sizes,
// the float32 residual workspace). A C ABI for tests/test_codec_emulator.py
// (ctypes): each entry returns 0, or 1 with the reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <algorithm>
#include <cmath>
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
int emu_rvq_encode(const float* x, const float* books, int* codes, const RvqArgs* a,
                   unsigned seed) {
  return pp_emu::guarded([&] {
    if (a->n == 0) return;
    std::vector<float> res(long(a->n) * a->D, NAN);
    // rvq.cu's __shared__ sd[kWarps] (NaN) and sj[kWarps]: an unwritten sj slot
    // reads as bin -1, which shows in the codes.
    std::vector<float> sd(rvq::kWarps);
    std::vector<int> sj(rvq::kWarps);
    pp_emu::launch(
        Dim3{blocks_for(a->n, 1), 1, 1}, kRvqEncodeThreads, sd,
        [&](int bx, int, int, int tid) {
          rvq::encode(x, books, codes, res.data(), *a, sd.data(), sj.data(), bx, tid);
        },
        seed, [&] { std::fill(sj.begin(), sj.end(), -1); });
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
