// The launches of kernels/cuda/matvec.cu run through the CPU emulator
// (portable_cpu.h), with the host logic of csrc/matvec_cuda.cpp (grids, block
// sizes, shared memory). A C ABI for tests/test_kernel_emulator.py (ctypes):
// each entry returns 0, or 1 with the reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "matvec.cuh"

namespace {

using pp_emu::Dim3;

struct MatvecPtrs {
  const void *x, *w, *scales, *biases, *alpha, *residual;
  void* out;
};

template <class F, class W, int MT>
void matvec_launch(const MatvecPtrs& p, MatvecArgs a, unsigned seed) {
  using E = typename F::Elem;
  const int units = a.gate ? PP_MATVEC_ROWS / 2 : PP_MATVEC_ROWS;  // outputs per block
  std::vector<float> smem(matvec::kWarps * matvec::kRows * MT + MT);
  pp_emu::launch(
      Dim3{(a.n_out + units - 1) / units, (a.M + MT - 1) / MT, 1}, matvec::kThreads, smem,
      [&](int bx, int by, int, int tid) {
        matvec::matvec<F, W, MT>(static_cast<const E*>(p.x), static_cast<const pp_u32*>(p.w),
                                 static_cast<const E*>(p.scales), static_cast<const E*>(p.biases),
                                 static_cast<const E*>(p.alpha), static_cast<const E*>(p.residual),
                                 static_cast<E*>(p.out), a, smem.data(), bx, by, tid);
      },
      seed);
}

template <class F, class W>
void matvec_rows(const MatvecPtrs& p, MatvecArgs a, unsigned seed) {
  const int mt = a.M <= 1 ? 1 : a.M <= 2 ? 2 : a.M <= 4 ? 4 : 8;
  if (mt == 1) matvec_launch<F, W, 1>(p, a, seed);
  if (mt == 2) matvec_launch<F, W, 2>(p, a, seed);
  if (mt == 4) matvec_launch<F, W, 4>(p, a, seed);
  if (mt == 8) matvec_launch<F, W, 8>(p, a, seed);
}

template <class F>
void matvec_format(int bits, const MatvecPtrs& p, MatvecArgs a, unsigned seed) {
  const int per_vec = 16 / static_cast<int>(sizeof(typename F::Elem));
  if (a.K % per_vec != 0 || (bits == 4 && a.K % 32 != 0)) {
    throw std::invalid_argument("matvec: K must be a multiple of " + std::to_string(per_vec) +
                                " (of 32 for 4-bit weights)");
  }
  if (bits == 0) matvec_rows<F, matvec::Dense<F>>(p, a, seed);
  else if (bits == 4) matvec_rows<F, matvec::Affine<4>>(p, a, seed);
  else if (bits == 8) matvec_rows<F, matvec::Affine<8>>(p, a, seed);
  else throw std::invalid_argument("matvec: bits must be 0, 4 or 8");
}

}  // namespace

extern "C" {

const char* emu_error() { return pp_emu::g_error.c_str(); }

// dtype: 0 float32, 1 bfloat16, 2 float16. Null pointers for absent operands.
int emu_matvec(int dtype, int bits, const void* x, const void* w, const void* scales,
               const void* biases, const void* alpha, const void* residual, void* out,
               const MatvecArgs* a, unsigned seed) {
  const MatvecPtrs p{x, w, scales, biases, alpha, residual, out};
  return pp_emu::guarded([&] {
    if (dtype == 0) matvec_format<pp::F32>(bits, p, *a, seed);
    else if (dtype == 1) matvec_format<pp::BF16>(bits, p, *a, seed);
    else matvec_format<pp::F16>(bits, p, *a, seed);
  });
}

}  // extern "C"
