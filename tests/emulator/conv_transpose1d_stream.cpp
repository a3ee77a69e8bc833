// The launches of kernels/cuda/conv_transpose1d_stream.cu run through the CPU
// emulator (portable_cpu.h) as csrc/conv_transpose1d_stream_cuda.cpp makes them:
// the ELU node and its temporary, then convtr, each launched by its plan
// (kernels/codec.cuh, kernels/conv_transpose1d_stream.cuh: grids, blocks, lanes).
// A C ABI for tests/test_codec_emulator.py (ctypes): each entry returns 0, or 1
// with the reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <cmath>
#include <vector>

#include "conv_transpose1d_stream.cuh"

namespace {

struct ConvTrPtrs {
  const void *x, *partial, *w, *bias;
  void *y, *partial_out;
};

// a.lanes: 0 for the host's choice, else a G to force.
template <class F>
void convtr_run(const ConvTrPtrs& p, ConvTrArgs a, int elu, unsigned seed) {
  using E = typename F::Elem;
  std::vector<float> no_smem;
  // ELU once per input sample, into a temporary the conv reads instead of x.
  const void* xin = p.x;
  const long x_size = long(a.B) * a.T * a.C_in;
  std::vector<E> tmp;
  if (elu && x_size > 0) {
    tmp.assign(x_size, F::store(NAN));
    xin = tmp.data();
    const GatherArgs g{.B = a.B, .T = a.T, .C = a.C_in, .elu = 1};
    pp_emu::launch(
        gather_launch("conv_transpose1d_stream", g), no_smem,
        [&](int bx, int, int, int tid) {
          codec::gather<F>(static_cast<const E*>(p.x), nullptr, nullptr, tmp.data(), nullptr, g,
                           long(bx) * kGatherThreads + tid);
        },
        seed);
  }
  // One output per row of the full transposed conv and channel: y, then partial'.
  if (convtr_outputs(a) == 0) return;
  if (a.lanes == 0) a.lanes = convtr_lanes(a);
  pp_emu::launch(
      convtr_launch(a), no_smem,
      [&](int bx, int, int, int tid) {
        convtr::convtr<F>(static_cast<const E*>(xin), static_cast<const E*>(p.partial),
                          static_cast<const E*>(p.w), static_cast<const E*>(p.bias),
                          static_cast<E*>(p.y), static_cast<E*>(p.partial_out), a, bx, tid);
      },
      seed + 1);
}

}  // namespace

extern "C" {

const char* emu_error() { return pp_emu::g_error.c_str(); }

// dtype: 0 float32, 1 bfloat16, 2 float16. A null pointer for an absent bias.
int emu_conv_transpose1d_stream(int dtype, const void* x, const void* partial, const void* w,
                                const void* bias, void* y, void* partial_out, const ConvTrArgs* a,
                                int elu, unsigned seed) {
  const ConvTrPtrs p{.x = x, .partial = partial, .w = w, .bias = bias, .y = y, .partial_out = partial_out};
  return pp_emu::guarded([&] {
    if (dtype == 0) convtr_run<pp::F32>(p, *a, elu, seed);
    else if (dtype == 1) convtr_run<pp::BF16>(p, *a, elu, seed);
    else convtr_run<pp::F16>(p, *a, elu, seed);
  });
}

}  // extern "C"
