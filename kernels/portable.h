// The few things CUDA and Metal spell differently, so that a kernel body
// (kernels/*.cuh) is written once and instantiated by a thin .cu and a thin
// .metal file. Both targets run 32-wide warps / SIMD groups (Apple GPUs and
// NVIDIA alike); the bodies assume it.
//
// Thread and block indices are not read here: the instantiating kernel passes
// them to the body as plain ints, because Metal only hands them out as kernel
// arguments. Workgroup memory is likewise declared in the kernel (Metal allows
// `threadgroup` variables in kernel scope only) and passed down as a pointer.

#pragma once

// Namespace- and class-scope constants are declared `PP_CONSTANT constexpr`: Metal
// keeps every program-scope variable in its `constant` address space. Host code
// reads the same constants (block sizes) through the .cuh files, so this part is
// for every compiler; a host compiler gets nothing else from this file.
#if defined(__METAL_VERSION__)
#define PP_CONSTANT constant
#else
#define PP_CONSTANT
#endif

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define PP_DEVICE __device__ __forceinline__
#define PP_GLOBAL           // address space of kernel buffers
#define PP_SHARED __shared__  // declares workgroup memory
#define PP_SHARED_PTR       // address space of a pointer into workgroup memory
#define PP_THREAD           // address space of thread-private arrays and references
#define PP_BARRIER() __syncthreads()

typedef unsigned int pp_u32;
typedef unsigned short pp_u16;
typedef unsigned char pp_u8;
typedef uint4 pp_u32x4;

PP_DEVICE float pp_shfl_xor(float x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }
PP_DEVICE float pp_bits_to_float(pp_u32 u) { return __uint_as_float(u); }
PP_DEVICE pp_u32 pp_float_to_bits(float f) { return __float_as_uint(f); }
PP_DEVICE float pp_half_to_float(pp_u16 h) { return __half2float(__ushort_as_half(h)); }
PP_DEVICE pp_u16 pp_float_to_half(float f) { return __half_as_ushort(__float2half_rn(f)); }
// Accurate (not fast-math) versions: RoPE angles must round like the CPU path.
PP_DEVICE float pp_exp(float x) { return expf(x); }
PP_DEVICE float pp_cos(float x) { return cosf(x); }
PP_DEVICE float pp_sin(float x) { return sinf(x); }
PP_DEVICE float pp_log(float x) { return logf(x); }
PP_DEVICE float pp_erf(float x) { return erff(x); }
PP_DEVICE float pp_rint(float x) { return rintf(x); }  // to nearest, ties to even
PP_DEVICE pp_u32 pp_mul_hi(pp_u32 a, pp_u32 b) { return __umulhi(a, b); }
PP_DEVICE float pp_max(float a, float b) { return fmaxf(a, b); }
// A product and a sum never fused into an FMA: where a kernel must round as a
// CPU loop does (the x86-64 baseline has no FMA, so g++ never fuses there).
PP_DEVICE float pp_mul_rn(float a, float b) { return __fmul_rn(a, b); }
PP_DEVICE float pp_add_rn(float a, float b) { return __fadd_rn(a, b); }
PP_DEVICE pp_u32x4 pp_load16(const PP_GLOBAL void* p) { return *static_cast<const uint4*>(p); }
PP_DEVICE pp_u32 pp_load4(const PP_GLOBAL void* p) { return *static_cast<const unsigned int*>(p); }
PP_DEVICE void pp_store16(PP_GLOBAL void* p, pp_u32x4 v) { *static_cast<uint4*>(p) = v; }
PP_DEVICE pp_u32x4 pp_zero16() { return make_uint4(0u, 0u, 0u, 0u); }
#define PP_NEG_INF (-__int_as_float(0x7f800000))
// First statement of every CUDA kernel (kernels/cuda/*.cu): programmatic dependent
// launch. The tick program launches a kernel that follows one of ours with
// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (csrc/tick_cuda.cpp), so it may be
// scheduled while its predecessor still runs; `wait` holds every thread until the
// predecessor has completed and its writes are visible (a no-op for a plain launch), so
// nothing is read or written early, and `launch_dependents` lets the next kernel be
// scheduled once every block of this one has started. What this saves is the launch
// latency between dependent kernels (hundreds a tick), not bytes. sm_90 and later.
PP_DEVICE void pp_grid_dependency() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// d += A B on the tensor cores (mma.m16n8k16, float32 accumulation), a warp-wide
// operation: A 16x16 row-major in 4 registers of 16-bit pairs, B 16x8 column-major
// in 2, d 16x8 in 4 floats, each lane holding the fragment the PTX ISA assigns it
// (kernels/matvec_tc.cuh relies on that layout). sm_80 and later; no Metal form.
PP_DEVICE void pp_mma_bf16(float* d, const pp_u32* a, pp_u32 b0, pp_u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// a * b + c on two 16-bit floats a register (low half with low half), each rounded
// once to nearest even. sm_80 and later; no Metal form.
PP_DEVICE pp_u32 pp_fma2_bf16(pp_u32 a, pp_u32 b, pp_u32 c) {
  pp_u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
PP_DEVICE pp_u32 pp_fma2_f16(pp_u32 a, pp_u32 b, pp_u32 c) {
  pp_u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
PP_DEVICE void pp_mma_f16(float* d, const pp_u32* a, pp_u32 b0, pp_u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#elif defined(__METAL_VERSION__)

#include <metal_stdlib>
using namespace metal;

#define PP_DEVICE inline
#define PP_GLOBAL device
#define PP_SHARED threadgroup
#define PP_SHARED_PTR threadgroup
#define PP_THREAD thread
#define PP_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device)

typedef uint pp_u32;
typedef ushort pp_u16;
typedef uchar pp_u8;
typedef uint4 pp_u32x4;

PP_DEVICE float pp_shfl_xor(float x, int mask) { return simd_shuffle_xor(x, ushort(mask)); }
PP_DEVICE float pp_bits_to_float(pp_u32 u) { return as_type<float>(u); }
PP_DEVICE pp_u32 pp_float_to_bits(float f) { return as_type<uint>(f); }
PP_DEVICE float pp_half_to_float(pp_u16 h) { return float(as_type<half>(h)); }
PP_DEVICE pp_u16 pp_float_to_half(float f) { return as_type<ushort>(half(f)); }
PP_DEVICE float pp_exp(float x) { return precise::exp(x); }
PP_DEVICE float pp_cos(float x) { return precise::cos(x); }
PP_DEVICE float pp_sin(float x) { return precise::sin(x); }
PP_DEVICE float pp_log(float x) { return precise::log(x); }
PP_DEVICE float pp_rint(float x) { return rint(x); }  // to nearest, ties to even
// Metal has no erf: Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
PP_DEVICE float pp_erf(float x) {
  const float t = 1.f / (1.f + 0.3275911f * fabs(x));
  const float y = 1.f - (((((1.061405429f * t - 1.453152027f) * t) + 1.421413741f) * t - 0.284496736f) * t +
                         0.254829592f) * t * precise::exp(-x * x);
  return x < 0.f ? -y : y;
}
PP_DEVICE pp_u32 pp_mul_hi(pp_u32 a, pp_u32 b) { return mulhi(a, b); }
PP_DEVICE float pp_max(float a, float b) { return fmax(a, b); }
// One correctly rounded fma each (Metal's fma is, per the MSL specification), so
// nothing can contract them: the kernels are compiled from source at run time
// (csrc/metal_common.cpp), where no -ffp-contract=off can be passed. a * b - 0 and
// a * 1 + b are exactly round(a * b) and round(a + b), signed zeros included.
PP_DEVICE float pp_mul_rn(float a, float b) { return fma(a, b, -0.f); }
PP_DEVICE float pp_add_rn(float a, float b) { return fma(a, 1.f, b); }
PP_DEVICE pp_u32x4 pp_load16(const PP_GLOBAL void* p) { return *(const device uint4*)p; }
PP_DEVICE pp_u32 pp_load4(const PP_GLOBAL void* p) { return *(const device uint*)p; }
PP_DEVICE void pp_store16(PP_GLOBAL void* p, pp_u32x4 v) { *(device uint4*)p = v; }
PP_DEVICE pp_u32x4 pp_zero16() { return uint4(0u); }
#define PP_NEG_INF (-INFINITY)

#endif
