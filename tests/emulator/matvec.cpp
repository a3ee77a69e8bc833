// The launches of kernels/cuda/matvec.cu run through the CPU emulator
// (portable_cpu.h), as csrc/matvec_cuda.cpp makes them: the launch plan of
// kernels/matvec.cuh (grid, block, rows of x per block, workgroup memory). A C
// ABI for tests/test_kernel_emulator.py (ctypes): each entry returns 0, or 1 with
// the reason in emu_error().
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

struct MatvecPtrs {
  const void *x, *w, *scales, *biases, *alpha, *residual;
  void* out;
};

template <class F, class W, int MT>
void matvec_run(const MatvecPtrs& p, MatvecArgs a, unsigned seed) {
  using E = typename F::Elem;
  std::vector<float> smem(matvec_smem_floats(MT));
  pp_emu::launch(
      matvec_launch(a), smem,
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
  switch (matvec_x_rows(a.M)) {
    case 1: return matvec_run<F, W, 1>(p, a, seed);
    case 2: return matvec_run<F, W, 2>(p, a, seed);
    case 4: return matvec_run<F, W, 4>(p, a, seed);
    default: return matvec_run<F, W, 8>(p, a, seed);
  }
}

template <class F>
void matvec_format(int bits, const MatvecPtrs& p, MatvecArgs a, unsigned seed) {
  const int elem = static_cast<int>(sizeof(typename F::Elem));
  if (!matvec_k_supported(a.K, elem, bits)) {
    throw std::invalid_argument("matvec: K must be a multiple of " + std::to_string(16 / elem) +
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
  const MatvecPtrs p{.x = x, .w = w, .scales = scales, .biases = biases, .alpha = alpha,
                     .residual = residual, .out = out};
  return pp_emu::guarded([&] {
    if (dtype == 0) matvec_format<pp::F32>(bits, p, *a, seed);
    else if (dtype == 1) matvec_format<pp::BF16>(bits, p, *a, seed);
    else matvec_format<pp::F16>(bits, p, *a, seed);
  });
}

}  // extern "C"
