// See metal_common.h.

#include "metal_common.h"

#include <stdexcept>
#include <string>

#include "mlx/backend/metal/utils.h"
#include "ring_attention.h"  // cache_unobserved, count_cache_copy

namespace personaplex::metal {

MTL::ComputePipelineState* kernel(mx::metal::Device& d, const char* file, const char* source,
                                  const std::string& name) {
  MTL::Library* lib;
  try {
    // Safe math (MLX's default CompileOptions): no fast-math reassociation, as on the CPU.
    lib = d.get_library(std::string("personaplex_") + file, mx::CompileOptions{},
                        [source] { return std::string(source); });
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("kernels/metal/") + file + ".metal does not compile here: " +
                             e.what());
  }
  MTL::ComputePipelineState* p = d.get_kernel(name, lib);
  // The bodies' warp shuffles and reductions assume 32-wide SIMD groups (portable.h).
  if (p->threadExecutionWidth() != 32) {
    throw std::runtime_error(std::string(file) + ": kernel " + name + " runs " +
                             std::to_string(p->threadExecutionWidth()) +
                             "-wide SIMD groups here; the kernels need 32");
  }
  return p;
}

MTL::ComputePipelineState* use(mx::metal::CommandEncoder& enc, mx::metal::Device& d, const char* file,
                               const char* source, const std::string& name) {
  MTL::ComputePipelineState* p = kernel(d, file, source, name);
  enc.set_compute_pipeline_state(p);
  return p;
}

void bind_in(mx::metal::CommandEncoder& enc, const Buf& b, int idx, const mx::array& placeholder) {
  if (b.a) {
    enc.set_input_array(*b.a, idx, b.offset);
  } else {
    enc.set_input_array(placeholder, idx);
  }
}

void bind_out(mx::metal::CommandEncoder& enc, const Buf& b, int idx) {
  enc.set_output_array(const_cast<mx::array&>(*b.a), idx, b.offset);
}

void dispatch(mx::metal::CommandEncoder& enc, MTL::ComputePipelineState* pipeline, const PpLaunch& plan,
              const char* op) {
  if (pipeline->maxTotalThreadsPerThreadgroup() < plan.threads) {
    throw std::runtime_error(std::string(op) + " on Metal: a kernel takes at most " +
                             std::to_string(pipeline->maxTotalThreadsPerThreadgroup()) +
                             " threads per threadgroup here, its launch plan " + std::to_string(plan.threads));
  }
  enc.dispatch_threadgroups(MTL::Size(plan.grid_x, plan.grid_y, plan.grid_z), MTL::Size(plan.threads, 1, 1));
}

void alloc_output(mx::array& a) { a.set_data(mx::allocator::malloc(a.nbytes())); }

mx::array temporary(mx::metal::CommandEncoder& enc, mx::Shape shape, mx::Dtype dtype) {
  mx::array a(std::move(shape), dtype, nullptr, {});
  alloc_output(a);
  enc.add_temporary(a);
  return a;
}

int gpu_cores(mx::metal::Device& d) {
  // MLX's architecture names end in the class: applegpu_g15p (phone), g15g (base
  // M-series, 8-10 cores), g15s (Pro, 14-20), g15d (Max and Ultra, 30-80).
  const std::string& arch = d.get_architecture();
  const char cls = arch.empty() ? 'g' : arch.back();
  return cls == 'd' ? 40 : cls == 's' ? 16 : cls == 'p' ? 5 : 10;
}

bool cache_free(const mx::array& in, int siblings) {
  return cache_unobserved(in, siblings) && in.data_shared_ptr()->is_owned() &&
         in.data_shared_ptr().use_count() == 1;
}

bool take_cache(const mx::array& in, mx::array& out, bool free) {
  if (free) {
    out.copy_shared_buffer(in);
    return true;
  }
  alloc_output(out);
  count_cache_copy();
  return false;
}

}  // namespace personaplex::metal
