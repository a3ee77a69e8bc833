// A kernel launch as a plan: the grid in blocks and the threads per block. Each
// kernel's .cuh computes its launches from its args struct, beside the body
// (matvec_launch, ring_attend_launch, ...), and the hosts (csrc/*_cuda.cpp,
// csrc/*_metal.cpp: a plan's grid is Metal's grid of threadgroups) and the CPU
// emulator (tests/emulator) launch from that plan, so they cannot drift apart.
// Host C++ only (the CUDA and Metal hosts, nvcc's host pass, the emulator), never
// a Metal shader.

#pragma once

#include <climits>
#include <stdexcept>
#include <string>

struct PpLaunch {
  unsigned int grid_x, grid_y, grid_z;  // blocks
  unsigned int threads;                 // per block
};

// Blocks of `per_block` items for `items` items; throws std::invalid_argument
// naming `op` past what one launch's grid holds.
inline unsigned int pp_blocks_for(const char* op, long items, long per_block) {
  const long blocks = (items + per_block - 1) / per_block;
  if (blocks > INT_MAX) {
    throw std::invalid_argument(std::string(op) + " on the GPU: " + std::to_string(items) +
                                " outputs are more than one launch takes; split the batch");
  }
  return static_cast<unsigned int>(blocks);
}
