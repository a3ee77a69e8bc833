// The launch of kernels/cuda/sample_topk.cu runs through the CPU emulator
// (portable_cpu.h) as csrc/sample_topk_cuda.cpp makes it (kernels/sample_topk.cuh's
// launch plan), with sample_topk::kShared floats of shared memory.
// A C ABI for tests/test_sampling_emulator.py (ctypes): the entry returns 0, or 1
// with the reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <vector>

#include "sample_topk.cuh"

namespace {

template <class F>
void sample_launch(const void* logits, const float* noise, const int* forced, int* out, int rows,
                   SampleArgs a, unsigned seed) {
  if (rows == 0) return;
  std::vector<float> red(sample_topk::kShared);
  pp_emu::launch(
      sample_topk_launch(rows), red,
      [&](int bx, int, int, int tid) {
        sample_topk::sample<F>(static_cast<const typename F::Elem*>(logits), noise, forced, out, a,
                               red.data(), bx, tid);
      },
      seed);
}

}  // namespace

extern "C" {

const char* emu_error() { return pp_emu::g_error.c_str(); }

// dtype: 0 float32, 1 bfloat16, 2 float16. logits [rows, V]; noise float32 [rows, V]
// and forced int32 [rows], null when absent; out int32 [rows]. The arguments are
// those sample_topk() (csrc/sample_topk.cpp) gives the primitive: greedy (or temp
// <= 0) as temp 0, top_k 0, no noise.
int emu_sample_topk(int dtype, const void* logits, const float* noise, const int* forced, int* out,
                    int rows, const SampleArgs* a, unsigned seed) {
  return pp_emu::guarded([&] {
    if (dtype == 0) sample_launch<pp::F32>(logits, noise, forced, out, rows, *a, seed);
    else if (dtype == 1) sample_launch<pp::BF16>(logits, noise, forced, out, rows, *a, seed);
    else sample_launch<pp::F16>(logits, noise, forced, out, rows, *a, seed);
  });
}

}  // extern "C"
