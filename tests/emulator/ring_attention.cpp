// The launches of kernels/cuda/ring_attention.cu run through the CPU emulator
// (portable_cpu.h), as csrc/ring_attention_cuda.cpp makes them: the launch plans of
// kernels/ring_attention.cuh (grids, blocks, queries per block, workspace) with
// the window splits S from the caller (the test sweeps them). A C ABI for
// tests/test_kernel_emulator.py and tests/test_tick_emulator.py (ctypes; the 8-bit
// ring's kernels against the tick program's CPU path): each entry returns 0, or 1
// with the reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "ring_attention.cuh"

namespace {

struct RingPtrs {
  const void *q, *k, *v, *kc, *vc;
  const float *ks, *vs;  // 8-bit rings: the scales (else null)
  const int* pos;
  void *out, *kc_out, *vc_out;
  float *ks_out, *vs_out;
};

// C: the ring's format, ring::Plain<F> or ring::Int8Rows<F>.
template <class F, class C, int D, int TQ>
void ring_attend(const RingPtrs& p, float* ws, const RingArgs& a, unsigned seed) {
  using E = typename F::Elem;
  using Code = typename C::Code;
  std::vector<float> smem(ring_attend_smem_floats(D, TQ));
  pp_emu::launch(
      ring_attend_launch(a), smem,
      [&](int bx, int by, int bz, int tid) {
        ring::attend<F, C, D, TQ>(static_cast<const E*>(p.q), static_cast<const E*>(p.k),
                                  static_cast<const E*>(p.v), static_cast<const Code*>(p.kc),
                                  static_cast<const Code*>(p.vc), p.ks, p.vs, p.pos, ws, a, smem.data(), bx,
                                  by, bz, tid);
      },
      seed);
}

template <class F, class C, int D>
void ring_attend_q(const RingPtrs& p, float* ws, const RingArgs& a, unsigned seed) {
  if (ring_queries_per_block(a.T) == 1) ring_attend<F, C, D, 1>(p, ws, a, seed);
  else ring_attend<F, C, D, 4>(p, ws, a, seed);
}

// S (the window splits) comes from the caller: the host derives it from the
// GPU's multiprocessor count, so the test sweeps it.
template <class F, class C>
void ring_run(const RingPtrs& p, const RingArgs& a, unsigned seed) {
  using E = typename F::Elem;
  using Code = typename C::Code;
  std::vector<float> ws(ring_workspace_floats(a), NAN);
  if (a.D == 16) ring_attend_q<F, C, 16>(p, ws.data(), a, seed);
  else if (a.D == 32) ring_attend_q<F, C, 32>(p, ws.data(), a, seed);
  else if (a.D == 64) ring_attend_q<F, C, 64>(p, ws.data(), a, seed);
  else if (a.D == 128) ring_attend_q<F, C, 128>(p, ws.data(), a, seed);
  else throw std::invalid_argument("ring_attention: head dim must be 16, 32, 64 or 128");
  std::vector<float> no_smem;
  pp_emu::launch(
      ring_finish_launch(a), no_smem,
      [&](int bx, int by, int, int tid) {
        ring::finish<F, C>(ws.data(), static_cast<const E*>(p.k), static_cast<const E*>(p.v), p.pos,
                           static_cast<const Code*>(p.kc), static_cast<const Code*>(p.vc), p.ks, p.vs,
                           static_cast<E*>(p.out), static_cast<Code*>(p.kc_out), static_cast<Code*>(p.vc_out),
                           p.ks_out, p.vs_out, a, bx, by, tid);
      },
      seed + 1);
}

template <template <class> class C>
int by_dtype(int dtype, const RingPtrs& p, const RingArgs& a, unsigned seed) {
  return pp_emu::guarded([&] {
    if (dtype == 0) ring_run<pp::F32, C<pp::F32>>(p, a, seed);
    else if (dtype == 1) ring_run<pp::BF16, C<pp::BF16>>(p, a, seed);
    else ring_run<pp::F16, C<pp::F16>>(p, a, seed);
  });
}

}  // namespace

extern "C" {

const char* emu_error() { return pp_emu::g_error.c_str(); }

int emu_ring_attention(int dtype, const void* q, const void* k, const void* v, const void* kc,
                       const void* vc, const int* pos, void* out, void* kc_out, void* vc_out,
                       const RingArgs* a, unsigned seed) {
  const RingPtrs p{.q = q, .k = k, .v = v, .kc = kc, .vc = vc, .ks = nullptr, .vs = nullptr, .pos = pos,
                   .out = out, .kc_out = kc_out, .vc_out = vc_out, .ks_out = nullptr, .vs_out = nullptr};
  return by_dtype<ring::Plain>(dtype, p, *a, seed);
}

// An 8-bit ring: kc, vc int8 codes [B, H, W, D], ks, vs float32 scales [B, H, W].
int emu_ring_attention_i8(int dtype, const void* q, const void* k, const void* v, const void* kc,
                          const void* vc, const float* ks, const float* vs, const int* pos, void* out,
                          void* kc_out, void* vc_out, float* ks_out, float* vs_out, const RingArgs* a,
                          unsigned seed) {
  const RingPtrs p{.q = q, .k = k, .v = v, .kc = kc, .vc = vc, .ks = ks, .vs = vs, .pos = pos, .out = out,
                   .kc_out = kc_out, .vc_out = vc_out, .ks_out = ks_out, .vs_out = vs_out};
  return by_dtype<ring::Int8Rows>(dtype, p, *a, seed);
}

}  // extern "C"
