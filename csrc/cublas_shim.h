// The few cuBLAS entry points the tick program uses (cublas_api.h, CUDA 12 and 13
// alike), found in the process (libmlx loads cuBLAS) or opened by name, and declared
// here: nothing of the toolkit's cuBLAS is needed to build, and nothing links it.
// CUDA builds only (tick_cuda.cpp).

#pragma once

#include <cuda.h>
#include <dlfcn.h>
#include <library_types.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "mlx/dtype.h"

namespace personaplex {

namespace mx = mlx::core;

// The few cuBLAS entry points used (cublas_api.h, CUDA 12 and 13 alike).
struct Cublas {
  using Handle = void*;
  int (*create)(Handle*) = nullptr;
  int (*set_stream)(Handle, CUstream) = nullptr;
  int (*set_workspace)(Handle, void*, size_t) = nullptr;
  int (*gemm_ex)(Handle, int, int, int, int, int, const void*, const void*, cudaDataType_t, int, const void*,
                 cudaDataType_t, int, const void*, void*, cudaDataType_t, int, int, int) = nullptr;
  static constexpr int kOpN = 0, kOpT = 1, kCompute32F = 68, kGemmDefault = -1;

  static const Cublas& get() {
    static const Cublas c = [] {
      Cublas c;
      void* lib = dlopen(nullptr, RTLD_NOW);
      if (!dlsym(lib, "cublasGemmEx")) {
        for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
          if ((lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL))) break;
        }
      }
      if (!lib) throw std::runtime_error("tick (CUDA): cuBLAS (libcublas.so.13) is not loadable");
      auto sym = [&](auto& f, const char* name) {
        f = reinterpret_cast<std::remove_reference_t<decltype(f)>>(dlsym(lib, name));
        if (!f) throw std::runtime_error(std::string("tick (CUDA): cuBLAS has no ") + name);
      };
      sym(c.create, "cublasCreate_v2");
      sym(c.set_stream, "cublasSetStream_v2");
      sym(c.set_workspace, "cublasSetWorkspace_v2");
      sym(c.gemm_ex, "cublasGemmEx");
      return c;
    }();
    return c;
  }
};

inline void cublas_check(int status, const char* what) {
  if (status != 0) throw std::runtime_error(std::string("tick (CUDA): ") + what + ": cuBLAS status " + std::to_string(status));
}

inline cudaDataType_t cuda_type(mx::Dtype dt) {
  if (dt == mx::float32) return CUDA_R_32F;
  if (dt == mx::bfloat16) return CUDA_R_16BF;
  if (dt == mx::float16) return CUDA_R_16F;
  throw std::invalid_argument("tick (CUDA): GEMMs take float32, bfloat16 or float16");
}

constexpr size_t kCublasWorkspace = 32u << 20;

}  // namespace personaplex
