// Host helpers of the codec drivers (conv1d_stream.cpp, conv_transpose1d_stream.cpp),
// copied from csrc/codec_common.h and csrc/*_cuda.cpp, which need MLX's headers.

#pragma once

#include <climits>
#include <stdexcept>
#include <string>

namespace codec_host {

// csrc/codec_common.h's conv_lanes: a power of two up to a warp, about 8 of the
// output's `products` each.
inline int conv_lanes(long products) {
  int g = 1;
  while (g < 32 && g * 8L < products) g *= 2;
  return g;
}

inline int blocks_for(long items, long per_block) {
  const long blocks = (items + per_block - 1) / per_block;
  if (blocks > INT_MAX) throw std::invalid_argument("emulator: too many blocks");
  return static_cast<int>(blocks);
}

}  // namespace codec_host
