// The launches of kernels/cuda/conv1d_stream.cu run through the CPU emulator
// (portable_cpu.h) as csrc/conv1d_stream_cuda.cpp makes them: the gather node and
// its temporary, then the conv, each launched by its plan (kernels/codec.cuh,
// kernels/conv1d_stream.cuh: grids, blocks, lanes). A C ABI for
// tests/test_codec_emulator.py (ctypes): each entry returns 0, or 1 with the
// reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <cmath>
#include <vector>

#include "conv1d_stream.cuh"

namespace {

struct Conv1dPtrs {
  const void *x, *prev, *w, *bias;
  const unsigned char* first;
  void *y, *prev_out;
};

// lanes: 0 for the host's choice (conv_lanes), else a G to force.
template <class F>
void conv1d_run(const Conv1dPtrs& p, Conv1dArgs a, int elu, int has_first, unsigned seed) {
  using E = typename F::Elem;
  std::vector<float> no_smem;
  // The conv reads x itself when there is nothing to put in front or to ELU.
  const void* buf = p.x;
  const long buf_size = long(a.B) * (a.context + a.T) * a.C_in;
  std::vector<E> tmp;
  if (a.context > 0 || elu) {
    tmp.assign(buf_size, F::store(NAN));  // a temporary: unwritten reads show as NaN
    buf = tmp.data();
    if (buf_size > 0) {
      const GatherArgs g{.B = a.B, .T = a.T, .C = a.C_in, .context = a.context, .elu = elu,
                         .has_first = has_first};
      pp_emu::launch(
          gather_launch("conv1d_stream", g), no_smem,
          [&](int bx, int, int, int tid) {
            codec::gather<F>(static_cast<const E*>(p.x), static_cast<const E*>(p.prev), p.first,
                             tmp.data(), static_cast<E*>(p.prev_out), g,
                             long(bx) * kGatherThreads + tid);
          },
          seed);
    }
  }
  if (conv1d_outputs(a) == 0) return;
  if (a.lanes == 0) a.lanes = conv1d_lanes(a);
  pp_emu::launch(
      conv1d_launch(a), no_smem,
      [&](int bx, int, int, int tid) {
        conv1d::conv<F>(static_cast<const E*>(buf), static_cast<const E*>(p.w),
                        static_cast<const E*>(p.bias), static_cast<E*>(p.y), a, bx, tid);
      },
      seed + 1);
}

}  // namespace

extern "C" {

const char* emu_error() { return pp_emu::g_error.c_str(); }

// dtype: 0 float32, 1 bfloat16, 2 float16. Null pointers for absent bias / first.
int emu_conv1d_stream(int dtype, const void* x, const void* prev, const void* w, const void* bias,
                      const unsigned char* first, void* y, void* prev_out, const Conv1dArgs* a,
                      int elu, unsigned seed) {
  const Conv1dPtrs p{.x = x, .prev = prev, .w = w, .bias = bias, .first = first, .y = y,
                     .prev_out = prev_out};
  const int has_first = first != nullptr;
  return pp_emu::guarded([&] {
    if (dtype == 0) conv1d_run<pp::F32>(p, *a, elu, has_first, seed);
    else if (dtype == 1) conv1d_run<pp::BF16>(p, *a, elu, has_first, seed);
    else conv1d_run<pp::F16>(p, *a, elu, has_first, seed);
  });
}

}  // extern "C"
