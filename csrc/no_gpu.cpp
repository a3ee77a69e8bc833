// eval_gpu of every primitive in a build without our GPU kernels (CPU only; on
// macOS until the Metal kernels are wired in), one line each as in MLX's
// backend/no_gpu. A build with CUDA compiles csrc/*_cuda.cpp instead of this
// file (CMakeLists.txt); a new primitive adds its line here.

#include <stdexcept>

#include "conv1d_stream.h"
#include "conv_transpose1d_stream.h"
#include "decoder_layers.h"
#include "depformer_frame.h"
#include "matvec.h"
#include "ring_attention.h"
#include "rvq.h"
#include "sample_topk.h"

#define PERSONAPLEX_NO_GPU(Primitive, op)                                                     \
  void Primitive::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {          \
    throw std::runtime_error(op ": no GPU kernel in this build (CPU only)");                   \
  }

namespace personaplex {

PERSONAPLEX_NO_GPU(RingAttention, "ring_attention")
PERSONAPLEX_NO_GPU(Conv1dStream, "conv1d_stream")
PERSONAPLEX_NO_GPU(ConvTranspose1dStream, "conv_transpose1d_stream")
PERSONAPLEX_NO_GPU(RvqEncode, "rvq_encode")
PERSONAPLEX_NO_GPU(RvqDecode, "rvq_decode")
PERSONAPLEX_NO_GPU(Matvec, "matvec")
PERSONAPLEX_NO_GPU(DecoderLayers, "decoder_layers")
PERSONAPLEX_NO_GPU(SampleTopK, "sample_topk")
PERSONAPLEX_NO_GPU(DepformerFrame, "depformer_frame")

int64_t ring_cache_waits() { return 0; }  // no GPU: the CUDA path's waits never happen

}  // namespace personaplex
