// The embed_add launch of csrc/depformer_frame_cuda.cpp (kernels/cuda/depformer_frame.cu)
// runs through the CPU emulator (portable_cpu.h), by its plan in
// kernels/depformer_frame.cuh: one thread per element of [B, D]. (DepformerFrame's
// other kernels are matvec's, ring_attention's and sample_topk's, which have drivers
// of their own.) A C ABI for tests/test_sampling_emulator.py (ctypes): the entry
// returns 0, or 1 with the reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <vector>

#include "depformer_frame.cuh"

namespace {

template <class F>
void embed_launch(const void* pre, const void* table, const int* tokens, void* out, EmbedArgs a,
                  unsigned seed) {
  using E = typename F::Elem;
  const long size = long(a.B) * a.D;
  if (size == 0) return;
  std::vector<float> no_smem;
  pp_emu::launch(
      embed_add_launch(a), no_smem,
      [&](int bx, int, int, int tid) {
        depformer_frame::embed_add<F>(static_cast<const E*>(pre), static_cast<const E*>(table), tokens,
                                      static_cast<E*>(out), a, long(bx) * kEmbedThreads + tid);
      },
      seed);
}

}  // namespace

extern "C" {

const char* emu_error() { return pp_emu::g_error.c_str(); }

// dtype: 0 float32, 1 bfloat16, 2 float16. pre, out [B, D]; table [rows, D]; tokens int32 [B].
int emu_embed_add(int dtype, const void* pre, const void* table, const int* tokens, void* out,
                  const EmbedArgs* a, unsigned seed) {
  return pp_emu::guarded([&] {
    if (dtype == 0) embed_launch<pp::F32>(pre, table, tokens, out, *a, seed);
    else if (dtype == 1) embed_launch<pp::BF16>(pre, table, tokens, out, *a, seed);
    else embed_launch<pp::F16>(pre, table, tokens, out, *a, seed);
  });
}

}  // extern "C"
