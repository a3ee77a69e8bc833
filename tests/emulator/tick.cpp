// The tick program's own kernels (kernels/tick.cuh) through the CPU emulator
// (portable_cpu.h), launched as csrc/tick_cuda.cpp launches them: norm one block
// of kTickThreads per row, frame_in / frame_out one thread per session, fill_rows
// a block per (region, session), the rest one thread per element. A C ABI for
// tests/test_tick_emulator.py (ctypes): each entry returns 0, or 1 with the
// reason in emu_error().
//
// Built by the test: g++ -std=c++20 -O1 -ffp-contract=off -U_FORTIFY_SOURCE -DPP_EMULATE
// -shared -fPIC, with kernels/*.cuh and portable_cpu.h (as portable.h) in one
// include directory.

#include <vector>

#include "tick.cuh"

namespace {

template <class Body>
void flat(long n, Body body, unsigned seed) {
  if (n <= 0) return;
  std::vector<float> no_smem;
  pp_emu::launch(tick_flat_launch(n), no_smem, [&](int bx, int, int, int tid) { body(long(bx) * kTickThreads + tid); },
                 seed);
}

template <class Fn>
int by_dtype(int dtype, Fn fn) {
  return pp_emu::guarded([&] {
    if (dtype == 0) fn(pp::F32{});
    else if (dtype == 1) fn(pp::BF16{});
    else fn(pp::F16{});
  });
}

}  // namespace

extern "C" {

const char* emu_error() { return pp_emu::g_error.c_str(); }

// dtype: 0 float32, 1 bfloat16, 2 float16.
int emu_tick_norm(int dtype, const void* x, const void* w, const void* b, void* out, const NormArgs* a,
                  unsigned seed) {
  return by_dtype(dtype, [&](auto f) {
    using F = decltype(f);
    using E = typename F::Elem;
    std::vector<float> smem(kTickThreads / 32);
    pp_emu::launch(tick_norm_launch(*a), smem,
                   [&](int bx, int, int, int tid) {
                     tick::norm<F>(static_cast<const E*>(x), static_cast<const E*>(w), static_cast<const E*>(b),
                                   static_cast<E*>(out), *a, smem.data(), bx, tid);
                   },
                   seed);
  });
}

int emu_tick_gelu(int dtype, const void* x, void* out, const RowsArgs* a, unsigned seed) {
  return by_dtype(dtype, [&](auto f) {
    using F = decltype(f);
    using E = typename F::Elem;
    flat(long(a->rows) * a->cols,
         [&](long i) { tick::gelu<F>(static_cast<const E*>(x), static_cast<E*>(out), *a, i); }, seed);
  });
}

int emu_tick_scale_add(int dtype, const void* x, const void* s, const void* y, void* out, const RowsArgs* a,
                       unsigned seed) {
  return by_dtype(dtype, [&](auto f) {
    using F = decltype(f);
    using E = typename F::Elem;
    flat(long(a->rows) * a->cols, [&](long i) {
      tick::scale_add<F>(static_cast<const E*>(x), static_cast<const E*>(s), static_cast<const E*>(y),
                         static_cast<E*>(out), *a, i);
    }, seed);
  });
}

int emu_tick_gate(int dtype, const void* in, void* out, const RowsArgs* a, unsigned seed) {
  return by_dtype(dtype, [&](auto f) {
    using F = decltype(f);
    using E = typename F::Elem;
    flat(long(a->rows) * a->cols, [&](long i) { tick::gate<F>(static_cast<const E*>(in), static_cast<E*>(out), *a, i); },
         seed);
  });
}

int emu_tick_im2col(int dtype, const void* buf, void* cols, const Im2colArgs* a, unsigned seed) {
  return by_dtype(dtype, [&](auto f) {
    using F = decltype(f);
    using E = typename F::Elem;
    flat(long(a->B) * a->T_out * a->K * a->C_in,
         [&](long i) { tick::im2col<F>(static_cast<const E*>(buf), static_cast<E*>(cols), *a, i); }, seed);
  });
}

int emu_tick_bias_rows(int dtype, const void* bias, void* y, const RowsArgs* a, unsigned seed) {
  return by_dtype(dtype, [&](auto f) {
    using F = decltype(f);
    using E = typename F::Elem;
    flat(long(a->rows) * a->cols, [&](long i) { tick::bias_rows<F>(static_cast<const E*>(bias), static_cast<E*>(y), *a, i); },
         seed);
  });
}

int emu_tick_col2im(int dtype, const void* z, const void* partial, const void* bias, void* y, void* next,
                    const Col2imArgs* a, unsigned seed) {
  return by_dtype(dtype, [&](auto f) {
    using F = decltype(f);
    using E = typename F::Elem;
    flat(col2im_outputs(*a), [&](long i) {
      tick::col2im<F>(static_cast<const E*>(z), static_cast<const E*>(partial), static_cast<const E*>(bias),
                      static_cast<E*>(y), static_cast<E*>(next), *a, i);
    }, seed);
  });
}

int emu_tick_frame_in(int* tokens, int* forced, const int* offsets, const int* delays, const int* sem,
                      const int* ac, int n_ac, int* cur, int* now, const FrameArgs* a, unsigned seed) {
  return pp_emu::guarded([&] {
    flat(a->B, [&](long b) { tick::frame_in(tokens, forced, offsets, delays, sem, ac, n_ac, cur, now, *a, int(b)); },
         seed);
  });
}

int emu_tick_frame_out(int* tokens, int* offsets, const int* delays, const int* gen, int* out, int* sem, int* ac,
                       int* valid, const FrameArgs* a, unsigned seed) {
  return pp_emu::guarded([&] {
    flat(a->B, [&](long b) { tick::frame_out(tokens, offsets, delays, gen, out, sem, ac, valid, *a, int(b)); },
         seed);
  });
}

int emu_tick_gumbel(const unsigned* seeds, const int* offsets, float* out, const GumbelArgs* a, unsigned seed) {
  return pp_emu::guarded([&] {
    flat(long(a->streams) * a->B * a->V, [&](long i) { tick::gumbel(seeds, offsets, out, *a, i); }, seed);
  });
}

int emu_tick_fill_rows(unsigned char* arena, const FillRegion* regions, int n, const int* control, int cols, int B,
                       unsigned seed) {
  return pp_emu::guarded([&] {
    std::vector<float> no_smem;
    pp_emu::launch(tick_fill_launch(n, B), no_smem,
                   [&](int bx, int by, int, int tid) { tick::fill_rows(arena, regions, control, cols, bx, by, tid); },
                   seed);
  });
}

int emu_tick_update(unsigned char* arena, const UpdateEntry* entries, int n, int count, unsigned seed) {
  return pp_emu::guarded([&] { flat(count, [&](long i) { tick::update(arena, entries, n, i); }, seed); });
}

int emu_tick_mute(const float* x, const int* valid, float* out, const RowsArgs* a, unsigned seed) {
  return pp_emu::guarded([&] {
    flat(long(a->rows) * a->cols, [&](long i) { tick::mute(x, valid, out, *a, i); }, seed);
  });
}

}  // extern "C"
