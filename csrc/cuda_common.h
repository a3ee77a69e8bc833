// What every primitive's CUDA path shares: loading our embedded fatbins as
// driver-API CUfunctions, and stream-ordered device allocations for outputs.
//
// Why CUfunctions: a kernel of our own .so added to MLX's CUDA graph by its
// runtime function pointer fails ("invalid resource handle"); a CUfunction from
// cuModuleLoadData, added with add_kernel_node_raw, is what MLX's own JIT
// kernels use. Why our own allocations: MLX's device allocator
// (cu::malloc_async) is not exported, and allocator::malloc hands out managed
// memory. Outputs are cuMemAllocAsync'd on MLX's stream and wrapped in an MLX
// buffer whose deleter frees them; MLX releases a buffer only after the work
// that uses it has completed.
//
// Compiled by g++ only (nvcc cannot compile MLX's headers).

#pragma once

#include <cuda.h>

#include <stdexcept>
#include <string>

#include "common.h"     // kernel_dtype
#include "launch.cuh"  // PpLaunch, pp_blocks_for
#include "mlx/array.h"
#include "mlx/backend/cuda/device.h"

namespace personaplex::cuda {

namespace mx = mlx::core;

// Throws std::runtime_error("<op> (CUDA): <what>: <driver message>") on failure.
void check(CUresult r, const char* op, const char* what);

// The kernel `name` of the embedded fatbin `image`, loaded once per device in
// its primary context (the one MLX's runtime uses).
CUfunction function(const unsigned char* image, const char* name, int device);

// Number of multiprocessors of `device`.
int sm_count(int device);

// A device buffer of `bytes` on the encoder's stream, freed when MLX releases it.
mx::allocator::Data device_malloc(size_t bytes, mx::cu::CommandEncoder& enc);

// Debug aid for the GPU tests: fill every buffer device_malloc hands out with
// 0xFF bytes (NaN for floats, -1 for int32) so an unwritten output shows.
void set_poison(bool on);

// Gives `a` a fresh device buffer from device_malloc.
void alloc_output(mx::array& a, mx::cu::CommandEncoder& enc);

// Whether `buffer` (an MLX buffer pointer) came from device_malloc.
bool is_ours(const void* buffer);

// Raw device pointer of an evaluated or output array.
inline void* ptr(const mx::array& a) { return mx::gpu_ptr<void>(a); }

// An empty array may have no device buffer at all: no pointer, no dependency.
inline void* ptr_or_null(const mx::array& a) { return a.size() ? ptr(a) : nullptr; }
inline void set_input_if_any(mx::cu::CommandEncoder& enc, const mx::array& a) {
  if (a.size()) enc.set_input_array(a);
}

using personaplex::kernel_dtype;  // common.h

// Blocks of `per_block` items for `items` items; throws (naming `op`) past one launch's grid.
inline unsigned int blocks_for(const char* op, long items, long per_block) {
  return pp_blocks_for(op, items, per_block);
}

// Adds kernel f to MLX's graph as `plan` (a kernel's launch plan, kernels/*.cuh) says,
// with `smem_bytes` of dynamic workgroup memory.
inline void add_launch(mx::cu::CommandEncoder& enc, CUfunction f, const PpLaunch& plan, void** params,
                       uint32_t smem_bytes = 0) {
  enc.add_kernel_node_raw(f, dim3(plan.grid_x, plan.grid_y, plan.grid_z), dim3(plan.threads), {},
                          smem_bytes, params);
}

}  // namespace personaplex::cuda
