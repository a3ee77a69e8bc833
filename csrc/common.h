// Helpers every primitive's host code shares: shape strings for error messages,
// argument checks and the floating-point dtype dispatch of the CPU paths.

#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace personaplex {

namespace mx = mlx::core;

// No std::ostringstream: it crashes the extension built by the GPU image's g++ 13
// (/opt/gcc; a libstdc++ mismatch with the interpreter's), so strings are concatenated.
inline std::string shape_str(const mx::array& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.shape().size(); ++i) s += (i ? ", " : "") + std::to_string(a.shape()[i]);
  return s + ")";
}

// Throws std::invalid_argument("<op>: <msg>") unless ok (a ValueError in Python).
inline void check(bool ok, const char* op, const std::string& msg) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + msg);
}

// A primitive's input as the kernels read it, row-contiguous: an evaluated array
// that already is (the weights, mostly) goes in as it is; anything else through
// mx::contiguous, which adds a graph node (and its per-evaluation cost) per call.
inline mx::array dense_input(const mx::array& a, mx::Stream st) {
  return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, st);
}

// A norm gain of any shape holding n values, as n values of dtype dt (no graph
// node when it already is: the kernels read the n values, whatever the shape).
inline mx::array gain_input(const mx::array& a, int n, mx::Dtype dt, mx::Stream st) {
  return dense_input(a.dtype() == dt ? a : mx::astype(mx::reshape(a, {n}, st), dt, st), st);
}

// What every eval_cpu opens with: the stream's CPU encoder, told about the
// primitive's inputs and outputs (whose buffers the caller sets: alloc_outputs,
// or a donated cache).
inline mx::cpu::CommandEncoder& cpu_encoder(mx::Stream s, const std::vector<mx::array>& inputs,
                                            std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(s);
  for (auto& a : inputs) enc.set_input_array(a);
  for (auto& a : outputs) enc.set_output_array(a);
  return enc;
}

// A fresh host buffer for every output.
inline void alloc_outputs(std::vector<mx::array>& outputs) {
  for (auto& a : outputs) a.set_data(mx::allocator::malloc(a.nbytes()));
}

// Suffix of a GPU kernel's name for the storage dtype (kernels/cuda/*.cu and
// kernels/metal/*.metal instantiate f32, bf16 and f16); throws
// std::invalid_argument naming `op` for any other.
inline const char* kernel_dtype(const char* op, mx::Dtype dtype) {
  if (dtype == mx::float32) return "f32";
  if (dtype == mx::bfloat16) return "bf16";
  if (dtype == mx::float16) return "f16";
  throw std::invalid_argument(std::string(op) + ": dtype must be float32, bfloat16 or float16");
}

// Calls f with a zero of the C++ type of a float32, bfloat16 or float16 dtype.
template <typename F>
void dispatch_float(const char* op, mx::Dtype dtype, F&& f) {
  if (dtype == mx::float32) {
    f(float{});
  } else if (dtype == mx::bfloat16) {
    f(mx::bfloat16_t{});
  } else if (dtype == mx::float16) {
    f(mx::float16_t{});
  } else {
    throw std::invalid_argument(std::string(op) + ": dtype must be float32, bfloat16 or float16");
  }
}

}  // namespace personaplex
