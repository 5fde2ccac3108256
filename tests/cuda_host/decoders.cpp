// cpp/cuda/decode_span.cuh's decoders, compiled for the CPU with the stand-ins of common.cuh
// beside this file, against codec.h's decode_element (the CPU kernels' decoder, itself tested
// against reference.py): every format, rows of 64 / 128 / 256 values at every 2-byte alignment,
// random bytes (non-finite scales included), spans of 4, 8, 16 and 32 values, and the f16
// chunks of q8_0 / q4_0 against the reference value rounded to f16. Prints "checked N
// mismatches M" (tests/test_cuda_decoders_host.py).
#include <cstdio>
#include <random>

#include "decode_span.cuh"

using namespace turbokv;
using namespace turbokv::cuda;

namespace {

int mismatches = 0;
long checked = 0;

bool same(float got, float want, bool fused) {
  if (std::isnan(got) || std::isnan(want)) return std::isnan(got) && std::isnan(want);
  // q4_1 / q5_1: d q + m fused here, the reference may round the product first.
  return got == want || (fused && std::fabs(got - want) <= 2e-7f * std::fabs(want));
}

void expect(const char* what, int fmt, int dp, int j, float got, float want, bool fused) {
  ++checked;
  if (same(got, want, fused)) return;
  if (mismatches++ < 20)
    std::printf("%s: format %d, dp %d, value %d: %.9g, expected %.9g\n", what, fmt, dp, j, got, want);
}

DeviceSide side(int fmt, int dp) {
  const bool turbo = fmt == kFmt_turbo2 || fmt == kFmt_turbo3 || fmt == kFmt_turbo4;
  const bool flt = fmt == kFmt_f16 || fmt == kFmt_bf16;
  DeviceSide s{};
  s.fmt = fmt;
  s.family = static_cast<int>(flt ? Family::kFloat : turbo ? Family::kTurbo : Family::kBlock);
  s.d = s.dp = dp;
  s.bits = fmt == kFmt_turbo2 ? 2 : fmt == kFmt_turbo3 ? 3 : 4;
  s.g = turbo ? (dp % 128 == 0 ? 128 : 64) : 32;
  const int block_bytes = fmt == kFmt_q8_0   ? 34
                          : fmt == kFmt_q5_1 ? 24
                          : fmt == kFmt_q5_0 ? 22
                          : fmt == kFmt_q4_1 ? 20
                                             : 18;
  s.group_bytes = flt ? 2 * dp : turbo ? 2 + s.g * s.bits / 8 : block_bytes;
  s.row_bytes = flt ? 2 * dp : dp / s.g * s.group_bytes;
  return s;
}

template <int E>
void spans(const DeviceSide& s, const float* cb, const uint8_t* row) {
  for (int e0 = 0; e0 < s.dp; e0 += E) {
    float got[E];
    decode_span<E, false>(s, cb, row, e0, got);
    for (int k = 0; k < E; ++k) {
      const float want = decode_at(s, cb, row, e0 + k);
      expect("decode_span", s.fmt, s.dp, e0 + k, got[k], want, s.fmt == kFmt_q4_1 || s.fmt == kFmt_q5_1);
    }
  }
}

template <int FMT>
void f16_chunks(const DeviceSide& s, const float* cb, const uint8_t* row) {
  for (int j0 = 0; j0 < s.dp; j0 += 8) {
    const uint4 h = span::block8_f16<FMT>(row + j0 / 32 * s.group_bytes, j0 % 32);
    const uint32_t w[4] = {h.x, h.y, h.z, h.w};
    for (int k = 0; k < 8; ++k) {
      const uint16_t bits = static_cast<uint16_t>(w[k / 2] >> (16 * (k % 2)));
      const float got = __half2float(__ushort_as_half(bits));
      const float want = static_cast<float>(static_cast<_Float16>(decode_at(s, cb, row, j0 + k)));
      expect("block8_f16", FMT, s.dp, j0 + k, got, want, false);
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(12345);
  const int formats[] = {kFmt_f16,  kFmt_bf16, kFmt_q8_0,   kFmt_q5_1,   kFmt_q5_0,
                         kFmt_q4_1, kFmt_q4_0, kFmt_turbo2, kFmt_turbo3, kFmt_turbo4};
  for (int fmt : formats) {
    for (int dp : {64, 128, 256}) {
      const DeviceSide s = side(fmt, dp);
      float cb[16];
      for (float& c : cb) c = std::ldexp(static_cast<float>(static_cast<int>(rng() % 2001) - 1000), -9);
      for (int trial = 0; trial < 64; ++trial) {
        alignas(16) uint8_t buf[600];
        for (uint8_t& b : buf) b = static_cast<uint8_t>(rng());
        // Every 2-byte alignment mod 16 (float rows: their 16-byte words); odd trials keep the
        // scales (and q4_1 / q5_1 mins) finite, even ones leave the random NaN / inf ones.
        const bool flt = s.family == static_cast<int>(Family::kFloat);
        uint8_t* row = buf + (flt ? 0 : 2 * (trial % 8));
        if (trial % 2)
          for (int g = 0; g < s.row_bytes / s.group_bytes; ++g) {
            uint8_t* blk = row + g * s.group_bytes;
            if (!flt) blk[1] &= 0x3f;
            if (fmt == kFmt_q4_1 || fmt == kFmt_q5_1) blk[3] &= 0x3f;
          }
        spans<4>(s, cb, row);
        spans<8>(s, cb, row);
        spans<16>(s, cb, row);
        spans<32>(s, cb, row);
        if (fmt == kFmt_q8_0) f16_chunks<kFmt_q8_0>(s, cb, row);
        if (fmt == kFmt_q4_0) f16_chunks<kFmt_q4_0>(s, cb, row);
      }
    }
  }
  std::printf("checked %ld mismatches %d\n", checked, mismatches);
  return mismatches ? 1 : 0;
}
