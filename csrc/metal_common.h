// What every primitive's Metal path shares (csrc/*_metal.cpp, built on macOS when
// MLX has its Metal backend; checked on Linux by tests/test_metal_host.py).
//
// Kernels: each kernels/metal/NAME.metal, flattened into one source text at build
// time (cmake/metal_source.py) and embedded, is compiled on first use through
// MLX's library cache (Device::get_library with a builder), in MLX's safe math
// mode. Why not a .metallib built at install: `xcrun metal` needs Xcode's Metal
// toolchain, which the Command Line Tools lack (and recent Xcodes download
// separately; ml-explore/mlx#103), so `pip install .` would fail on many Macs;
// every Mac compiles Metal source at run time. The cost is one compile per library
// and process.
//
// Launches use the kernels' launch plans (kernels/*.cuh, as CUDA does): a plan's
// grid is Metal's grid of threadgroups, its threads a threadgroup. Buffers are
// MLX arrays bound with a byte offset (a view into another array, as CUDA's
// raw pointers are); outputs and temporaries come from MLX's allocator (unified
// memory). Ordering is MLX's: the encoder puts a barrier before a dispatch that
// reads what an earlier one wrote, and fences between command encoders.
//
// Compiled by clang only: metal-cpp needs -fblocks.

#pragma once

#include <cstdint>
#include <string>

#include "common.h"     // kernel_dtype
#include "launch.cuh"  // PpLaunch
#include "mlx/array.h"
#include "mlx/backend/metal/device.h"

namespace personaplex::metal {

namespace mx = mlx::core;

// An array bound at a byte offset; `a` null: the argument is absent.
struct Buf {
  const mx::array* a = nullptr;
  int64_t offset = 0;
};
inline Buf at(const mx::array& a, int64_t offset = 0) { return {&a, offset}; }

// The compute pipeline of kernel `name` in the library of kernels/metal/`file`.metal,
// whose flattened text is `source` (the generated personaplex_metal_`file`),
// compiled on first use (throws std::runtime_error naming the file on a compile
// error, and the kernel when it is not there or does not run 32-wide SIMD groups).
MTL::ComputePipelineState* kernel(mx::metal::Device& d, const char* file, const char* source,
                                  const std::string& name);
// kernel(...), set as enc's pipeline for the arguments and the dispatch that follow.
MTL::ComputePipelineState* use(mx::metal::CommandEncoder& enc, mx::metal::Device& d, const char* file,
                               const char* source, const std::string& name);

// Binds b at index idx as a read; an absent b binds `placeholder` (Metal wants every
// argument bound; the kernels never read an absent one: their args say what is
// given). An empty array binds no buffer, which Metal allows.
void bind_in(mx::metal::CommandEncoder& enc, const Buf& b, int idx, const mx::array& placeholder);
inline void bind_in(mx::metal::CommandEncoder& enc, const Buf& b, int idx) { bind_in(enc, b, idx, *b.a); }
// Binds b at index idx as written (a read too: MLX orders it after earlier readers).
void bind_out(mx::metal::CommandEncoder& enc, const Buf& b, int idx);

// Dispatches the pipeline set on enc as `plan` says; throws (naming `op`) when the
// pipeline takes fewer threads per threadgroup than the plan's.
void dispatch(mx::metal::CommandEncoder& enc, MTL::ComputePipelineState* pipeline, const PpLaunch& plan,
              const char* op);

// A fresh buffer from MLX's allocator for a.
void alloc_output(mx::array& a);

// A temporary of this shape, kept alive by the encoder until its work has run.
mx::array temporary(mx::metal::CommandEncoder& enc, mx::Shape shape, mx::Dtype dtype);

// Roughly how many GPU cores the device has, for the launch plans that size their
// grids by the processor count (ring_splits, rvq_encode_vectors): Metal does not
// say, the architecture name's class letter does (base, Pro, Max / Ultra).
int gpu_cores(mx::metal::Device& d);

// Whether input cache `in` (of a primitive with `siblings` outputs) may be taken over
// by its output in place. Unlike CUDA's (cuda_nodes.h), no wait: a Metal command
// buffer in flight holds references to what it reads, and MLX cannot be made to
// wait for it inside an eval; such a cache is copied (and counted) instead.
bool cache_free(const mx::array& in, int siblings);
// out takes in's buffer (true) or a fresh one that the attention fills with a copy.
bool take_cache(const mx::array& in, mx::array& out, bool free);

}  // namespace personaplex::metal
