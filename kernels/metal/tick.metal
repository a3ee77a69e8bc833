// Metal instantiations of kernels/tick.cuh, the twin of kernels/cuda/tick.cu.
// Type-checked on Linux by tests/test_metal_check.py; never compiled by Apple's
// compiler nor run (no Metal eval_gpu of the tick program is wired up). Dispatch
// kTickThreads threads per threadgroup, the grids of csrc/tick_cuda.cpp. The GEMM
// forms (im2col, bias_rows, col2im around cuBLAS) have no Metal GEMM behind them yet.

#include "../tick.cuh"

#define TICK_DTYPE(DT, F)                                                                           \
  [[kernel]] void tick_norm_##DT(                                                                   \
      const device F::Elem* x [[buffer(0)]], const device F::Elem* w [[buffer(1)]],                 \
      const device F::Elem* b [[buffer(2)]], device F::Elem* out [[buffer(3)]],                     \
      constant NormArgs& a [[buffer(4)]], uint g [[threadgroup_position_in_grid]],                  \
      uint tid [[thread_index_in_threadgroup]]) {                                                   \
    threadgroup float smem[kTickThreads / 32];                                                      \
    tick::norm<F>(x, w, b, out, a, smem, g, tid);                                                   \
  }                                                                                                 \
  [[kernel]] void tick_gelu_##DT(const device F::Elem* x [[buffer(0)]], device F::Elem* out [[buffer(1)]], \
                                 constant RowsArgs& a [[buffer(2)]], uint g [[threadgroup_position_in_grid]], \
                                 uint tid [[thread_index_in_threadgroup]]) {                        \
    tick::gelu<F>(x, out, a, long(g) * kTickThreads + tid);                                         \
  }                                                                                                 \
  [[kernel]] void tick_scale_add_##DT(                                                              \
      const device F::Elem* x [[buffer(0)]], const device F::Elem* s [[buffer(1)]],                 \
      const device F::Elem* y [[buffer(2)]], device F::Elem* out [[buffer(3)]],                     \
      constant RowsArgs& a [[buffer(4)]], uint g [[threadgroup_position_in_grid]],                  \
      uint tid [[thread_index_in_threadgroup]]) {                                                   \
    tick::scale_add<F>(x, s, y, out, a, long(g) * kTickThreads + tid);                              \
  }                                                                                                 \
  [[kernel]] void tick_gate_##DT(const device F::Elem* in [[buffer(0)]], device F::Elem* out [[buffer(1)]], \
                                 constant RowsArgs& a [[buffer(2)]], uint g [[threadgroup_position_in_grid]], \
                                 uint tid [[thread_index_in_threadgroup]]) {                        \
    tick::gate<F>(in, out, a, long(g) * kTickThreads + tid);                                        \
  }                                                                                                 \
  [[kernel]] void tick_im2col_##DT(const device F::Elem* buf [[buffer(0)]], device F::Elem* cols [[buffer(1)]], \
                                   constant Im2colArgs& a [[buffer(2)]], uint g [[threadgroup_position_in_grid]], \
                                   uint tid [[thread_index_in_threadgroup]]) {                      \
    tick::im2col<F>(buf, cols, a, long(g) * kTickThreads + tid);                                    \
  }                                                                                                 \
  [[kernel]] void tick_bias_rows_##DT(const device F::Elem* bias [[buffer(0)]], device F::Elem* y [[buffer(1)]], \
                                      constant RowsArgs& a [[buffer(2)]], uint g [[threadgroup_position_in_grid]], \
                                      uint tid [[thread_index_in_threadgroup]]) {                   \
    tick::bias_rows<F>(bias, y, a, long(g) * kTickThreads + tid);                                   \
  }                                                                                                 \
  [[kernel]] void tick_col2im_##DT(                                                                 \
      const device F::Elem* z [[buffer(0)]], const device F::Elem* partial [[buffer(1)]],           \
      const device F::Elem* bias [[buffer(2)]], device F::Elem* y [[buffer(3)]],                    \
      device F::Elem* next [[buffer(4)]], constant Col2imArgs& a [[buffer(5)]],                     \
      uint g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {          \
    tick::col2im<F>(z, partial, bias, y, next, a, long(g) * kTickThreads + tid);                    \
  }

TICK_DTYPE(f32, pp::F32)
TICK_DTYPE(bf16, pp::BF16)
TICK_DTYPE(f16, pp::F16)

[[kernel]] void tick_frame_in(device int* tokens [[buffer(0)]], device int* forced [[buffer(1)]],
                              const device int* offsets [[buffer(2)]], const device int* delays [[buffer(3)]],
                              const device int* sem [[buffer(4)]], const device int* ac [[buffer(5)]],
                              constant int& n_ac [[buffer(6)]], device int* cur [[buffer(7)]],
                              device int* now [[buffer(8)]], constant FrameArgs& a [[buffer(9)]],
                              uint g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
  tick::frame_in(tokens, forced, offsets, delays, sem, ac, n_ac, cur, now, a, int(g) * kTickThreads + int(tid));
}

[[kernel]] void tick_frame_out(device int* tokens [[buffer(0)]], device int* offsets [[buffer(1)]],
                               const device int* delays [[buffer(2)]], const device int* gen [[buffer(3)]],
                               device int* out [[buffer(4)]], device int* sem [[buffer(5)]],
                               device int* ac [[buffer(6)]], device int* valid [[buffer(7)]],
                               constant FrameArgs& a [[buffer(8)]], uint g [[threadgroup_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]]) {
  tick::frame_out(tokens, offsets, delays, gen, out, sem, ac, valid, a, int(g) * kTickThreads + int(tid));
}

[[kernel]] void tick_gumbel(const device uint* seeds [[buffer(0)]], const device int* offsets [[buffer(1)]],
                            device float* out [[buffer(2)]], constant GumbelArgs& a [[buffer(3)]],
                            uint g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
  tick::gumbel(seeds, offsets, out, a, long(g) * kTickThreads + tid);
}

[[kernel]] void tick_fill_rows(device unsigned char* arena [[buffer(0)]],
                               const device FillRegion* regions [[buffer(1)]],
                               const device int* control [[buffer(2)]], constant int& control_cols [[buffer(3)]],
                               uint2 g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
  tick::fill_rows(arena, regions, control, control_cols, int(g.x), int(g.y), int(tid));
}

[[kernel]] void tick_update(device unsigned char* arena [[buffer(0)]], const device UpdateEntry* entries [[buffer(1)]],
                            constant int& n [[buffer(2)]], uint g [[threadgroup_position_in_grid]],
                            uint tid [[thread_index_in_threadgroup]]) {
  tick::update(arena, entries, n, long(g) * kTickThreads + tid);
}

[[kernel]] void tick_mute(const device float* x [[buffer(0)]], const device int* valid [[buffer(1)]],
                          device float* out [[buffer(2)]], constant RowsArgs& a [[buffer(3)]],
                          uint g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
  tick::mute(x, valid, out, a, long(g) * kTickThreads + tid);
}
