// Random sign diagonals of the seeded Hadamard rotation R = diag(s2) H/sqrt(n) diag(s1).
//
// Sign i of a seed is the top bit of the i-th output (0-based) of splitmix64
// started at `seed`: output i = mix(seed + (i + 1) * golden). It is stateless
// per index, so a kernel can compute any sign without a table. s1 uses
// outputs 0..n-1 and s2 outputs n..2n-1. python/turbokv/rotation.py mirrors this.
#pragma once

#include <cstdint>

#include "turbokv/host_device.h"

namespace turbokv {

inline constexpr uint64_t kSplitmixGolden = 0x9E3779B97F4A7C15ull;

TKV_HD uint64_t splitmix64_at(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * kSplitmixGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// +1.0f or -1.0f: element i of the 2n-long sign stream (s1 = [0, n), s2 = [n, 2n)).
TKV_HD float sign_at(uint64_t seed, uint64_t i) { return (splitmix64_at(seed, i) >> 63) ? -1.0f : 1.0f; }

}  // namespace turbokv
