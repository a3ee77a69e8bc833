// CUDA instantiations of kernels/tick.cuh, loaded as CUfunctions (see
// csrc/cuda_common.h). Names: tick_norm_<dtype>, tick_gelu_<dtype>,
// tick_scale_add_<dtype>, tick_frame_in, tick_frame_out, tick_gumbel,
// tick_fill_rows, tick_update, tick_mute.

#include "../tick.cuh"

#define TICK_DTYPE(DT, F)                                                                          \
  extern "C" __global__ void __launch_bounds__(kTickThreads) tick_norm_##DT(                       \
      const F::Elem* x, const F::Elem* w, const F::Elem* b, F::Elem* out, NormArgs a) {            \
    pp_grid_dependency();                                                                          \
    __shared__ float smem[kTickThreads / 32];                                                      \
    tick::norm<F>(x, w, b, out, a, smem, blockIdx.x, threadIdx.x);                                 \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(kTickThreads) tick_gelu_##DT(const F::Elem* x,      \
                                                                            F::Elem* out, RowsArgs a) { \
    pp_grid_dependency();                                                                          \
    tick::gelu<F>(x, out, a, long(blockIdx.x) * kTickThreads + threadIdx.x);                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(kTickThreads) tick_scale_add_##DT(                  \
      const F::Elem* x, const F::Elem* s, const F::Elem* y, F::Elem* out, RowsArgs a) {            \
    pp_grid_dependency();                                                                          \
    tick::scale_add<F>(x, s, y, out, a, long(blockIdx.x) * kTickThreads + threadIdx.x);            \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(kTickThreads) tick_gate_##DT(const F::Elem* in,      \
                                                                            F::Elem* out, RowsArgs a) { \
    pp_grid_dependency();                                                                           \
    tick::gate<F>(in, out, a, long(blockIdx.x) * kTickThreads + threadIdx.x);                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(kTickThreads) tick_im2col_##DT(                     \
      const F::Elem* buf, F::Elem* cols, Im2colArgs a) {                                           \
    pp_grid_dependency();                                                                          \
    tick::im2col<F>(buf, cols, a, long(blockIdx.x) * kTickThreads + threadIdx.x);                  \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(kTickThreads) tick_bias_rows_##DT(                  \
      const F::Elem* bias, F::Elem* y, RowsArgs a) {                                               \
    pp_grid_dependency();                                                                          \
    tick::bias_rows<F>(bias, y, a, long(blockIdx.x) * kTickThreads + threadIdx.x);                 \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(kTickThreads) tick_col2im_##DT(                     \
      const F::Elem* z, const F::Elem* partial, const F::Elem* bias, F::Elem* y, F::Elem* next,    \
      Col2imArgs a) {                                                                              \
    pp_grid_dependency();                                                                          \
    tick::col2im<F>(z, partial, bias, y, next, a, long(blockIdx.x) * kTickThreads + threadIdx.x);  \
  }

TICK_DTYPE(f32, pp::F32)
TICK_DTYPE(bf16, pp::BF16)
TICK_DTYPE(f16, pp::F16)

extern "C" __global__ void __launch_bounds__(kTickThreads)
    tick_frame_in(int* tokens, int* forced, const int* offsets, const int* delays, const int* sem, const int* ac,
                  int n_ac, int* cur, int* now, FrameArgs a) {
  pp_grid_dependency();
  tick::frame_in(tokens, forced, offsets, delays, sem, ac, n_ac, cur, now, a, blockIdx.x * kTickThreads + threadIdx.x);
}

extern "C" __global__ void __launch_bounds__(kTickThreads)
    tick_frame_out(int* tokens, int* offsets, const int* delays, const int* gen, int* out, int* sem, int* ac,
                   int* valid, FrameArgs a) {
  pp_grid_dependency();
  tick::frame_out(tokens, offsets, delays, gen, out, sem, ac, valid, a, blockIdx.x * kTickThreads + threadIdx.x);
}

extern "C" __global__ void __launch_bounds__(kTickThreads)
    tick_gumbel(const unsigned int* seeds, const int* offsets, float* out, GumbelArgs a) {
  pp_grid_dependency();
  tick::gumbel(seeds, offsets, out, a, long(blockIdx.x) * kTickThreads + threadIdx.x);
}

extern "C" __global__ void __launch_bounds__(kTickThreads)
    tick_fill_rows(unsigned char* arena, const FillRegion* regions, const int* control, int control_cols) {
  pp_grid_dependency();
  tick::fill_rows(arena, regions, control, control_cols, blockIdx.x, blockIdx.y, threadIdx.x);
}

extern "C" __global__ void __launch_bounds__(kTickThreads)
    tick_update(unsigned char* arena, const UpdateEntry* entries, int n) {
  pp_grid_dependency();
  tick::update(arena, entries, n, long(blockIdx.x) * kTickThreads + threadIdx.x);
}

extern "C" __global__ void __launch_bounds__(kTickThreads)
    tick_mute(const float* x, const int* valid, float* out, RowsArgs a) {
  pp_grid_dependency();
  tick::mute(x, valid, out, a, long(blockIdx.x) * kTickThreads + threadIdx.x);
}
