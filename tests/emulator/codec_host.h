// Host helper of the codec drivers (conv1d_stream.cpp, conv_transpose1d_stream.cpp,
// rvq.cpp), copied from csrc/cuda_common.h, which needs MLX's headers. The lane
// count, conv_lanes, is the host's own (kernels/codec.cuh).

#pragma once

#include <climits>
#include <stdexcept>
#include <string>

namespace codec_host {

inline int blocks_for(long items, long per_block) {
  const long blocks = (items + per_block - 1) / per_block;
  if (blocks > INT_MAX) throw std::invalid_argument("emulator: too many blocks");
  return static_cast<int>(blocks);
}

}  // namespace codec_host
