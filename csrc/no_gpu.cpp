// eval_gpu of every primitive in a build without our GPU kernels, one line each as
// in MLX's backend/no_gpu. A build with CUDA compiles csrc/*_cuda.cpp instead of
// this file (CMakeLists.txt); a build with Metal (macOS) compiles csrc/*_metal.cpp
// and this file for what has no Metal path yet: the tick program. A new primitive
// adds its line here.

#include <stdexcept>

#include "conv1d_stream.h"
#include "conv_transpose1d_stream.h"
#include "decoder_layers.h"
#include "depformer_frame.h"
#include "matvec.h"
#include "ring_attention.h"
#include "rvq.h"
#include "sample_topk.h"
#include "tick.h"

#define PERSONAPLEX_NO_GPU(Primitive, op)                                                     \
  void Primitive::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {          \
    throw std::runtime_error(op ": no GPU kernel for this device in this build");              \
  }

namespace personaplex {

#ifndef PERSONAPLEX_METAL_BUILD
PERSONAPLEX_NO_GPU(RingAttention, "ring_attention")
PERSONAPLEX_NO_GPU(Conv1dStream, "conv1d_stream")
PERSONAPLEX_NO_GPU(ConvTranspose1dStream, "conv_transpose1d_stream")
PERSONAPLEX_NO_GPU(RvqEncode, "rvq_encode")
PERSONAPLEX_NO_GPU(RvqDecode, "rvq_decode")
PERSONAPLEX_NO_GPU(Matvec, "matvec")
PERSONAPLEX_NO_GPU(DecoderLayers, "decoder_layers")
PERSONAPLEX_NO_GPU(SampleTopK, "sample_topk")
PERSONAPLEX_NO_GPU(DepformerFrame, "depformer_frame")
#endif
// No Metal tick program: on a Mac the engine runs op by op (tick.supported).
PERSONAPLEX_NO_GPU(Tick, "tick")

// The tick program's device side (tick_cuda.cpp): a GPU program cannot be made here
// (TickProgram's constructor refuses), so these only answer a misuse.
TickProgram::~TickProgram() = default;
void TickProgram::run_cuda(void*, const void*, const void*, void*, void*) {
  throw std::runtime_error("tick: no CUDA kernels in this build");
}
void TickProgram::write_cuda(int, long, const mx::array&) { run_cuda(nullptr, nullptr, nullptr, nullptr, nullptr); }
void TickProgram::read_cuda(int, long, void*, long) { run_cuda(nullptr, nullptr, nullptr, nullptr, nullptr); }
std::vector<double> TickProgram::profile_cuda() {
  run_cuda(nullptr, nullptr, nullptr, nullptr, nullptr);
  return {};
}

std::vector<double> TickProgram::time_range_cuda(int, int, int) {
  run_cuda(nullptr, nullptr, nullptr, nullptr, nullptr);
  return {};
}

int64_t ring_cache_waits() { return 0; }  // no CUDA: its waits never happen (Metal copies instead)

}  // namespace personaplex
