// Stand-in for <fmt/format.h> where fmt is not installed. MLX's CUDA headers
// include it for one error message (mlx/backend/cuda/lru_cache.h); only
// sequential "{}" fields are supported.
#pragma once

#include <sstream>
#include <string>

namespace fmt {

template <typename... Args>
std::string format(const std::string& pattern, const Args&... args) {
  std::ostringstream out;
  size_t at = 0;
  auto field = [&](const auto& value) {
    size_t next = pattern.find("{}", at);
    if (next == std::string::npos) return;
    out << pattern.substr(at, next - at) << value;
    at = next + 2;
  };
  (field(args), ...);
  out << pattern.substr(at);
  return out.str();
}

}  // namespace fmt
