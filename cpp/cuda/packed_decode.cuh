// Per-format decoders of the specialised tensor-core decode kernel (attention_templated.cuh).
//
// A row of DP values is cut into NP equal portions of n = DP / NP values; lane p of a group
// decodes portion p of a row straight into n / 2 f16x2 registers h[], with integer bit
// tricks on whole 32-bit words (prmt / lop3), no per-value branches, no float converts:
//   * f16: the words themselves.
//   * q8_0 / q4_0: the byte or nibble is put under the exponent bits of 1024.0 (0x6400),
//     which makes the f16 1024 + q exactly; subtracting the offset is exact, and one f16
//     multiply applies the block scale (q4_0 instead scales per block: its K scores, and
//     the probabilities its V rows are weighted by; see Q4).
//   * turbo2/3/4: codebook lookups with prmt, which picks 4 bytes out of 8 by 3-bit
//     selectors: one prmt gives the low bytes of 4 codebook entries, one the high bytes,
//     and two more interleave them into two f16x2. turbo4 (16 entries) uses the symmetry
//     c[15 - i] = -c[i]: 8 magnitudes plus a sign flip of the high byte.
// Which dims land in which register half is whatever is cheapest for the format; dim(p, i)
// says where value i of portion p comes from, and the kernel builds the query fragments and
// writes the outputs through that same map (a dot product does not care about order).
//
// The V side needs registers that pair two keys' values; formats with kPairs decode two
// rows at once straight into such pairs (turbo3: decode_pair; q4_0: block_pv, which also
// runs the block's products), the others are paired by the kernel with two prmt per pair
// of registers.
//
// Turbo rows of one group (DP = 64 or 128) leave their scale out (kScaleOut): the kernel
// multiplies the K row's score by it (fp32) and the V row's probability by it (fp16, p <= 1
// so p * scale stays finite), which saves one f16x2 multiply per 2 decoded values.
//
// Rows sit in shared memory with 2-byte alignment (turbo rows are 2 + k bytes long), so
// 32-bit words are read as two aligned words and a funnel shift (Row below).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "attention_mma.cuh"  // mma_16816 (q4_0 scores a block at a time)

namespace turbokv::cuda::packed {

// (a & M) | (b & ~M) in one LOP3 (the compiler's two-constant form takes two).
template <uint32_t M>
__device__ __forceinline__ uint32_t bit_select(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xe2;" : "=r"(r) : "r"(a), "n"(M), "r"(b));
  return r;
}
__device__ __forceinline__ uint32_t ld16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }

// A packed row in shared memory (2-byte aligned) and its address mod 4. Rows keep their
// alignment from chunk to chunk, so the kernel computes `mis` once and a word's alignment
// costs nothing per load: two aligned loads and a funnel shift by a loop-invariant amount.
// (The aligned address comes from pointer arithmetic on p, not through an integer, so the
// compiler keeps knowing it is shared memory: LDS, not generic loads.)
struct Row {
  const uint8_t* p;
  uint32_t mis;
  __device__ __forceinline__ uint32_t word(int at) const {
    const uint32_t m = (mis + static_cast<uint32_t>(at)) & 3u;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(p + at - m);
    return __funnelshift_r(w[0], w[1], 8u * m);
  }
  __device__ __forceinline__ uint32_t half(int at) const { return ld16(p + at); }
};

// (a & b) | c in one LOP3 (the compiler splits it in two when both b and c are constants).
template <uint32_t B, uint32_t C>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "n"(B), "n"(C));
  return r;
}
__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<const uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<const __half2*>(&u); }
// The row's fp16 scale, twice.
__device__ __forceinline__ __half2 scale2(const uint8_t* p) {
  const uint32_t s = ld16(p);
  return u2h(s | (s << 16));
}
__device__ __forceinline__ uint32_t hmul(uint32_t a, __half2 s) { return h2u(__hmul2(u2h(a), s)); }

// Codebook of up to 8 f16 entries as byte planes: lo[0..1] hold the low bytes of entries
// 0..7, hi[0..1] the high bytes (prmt's 8-byte table).
struct Planes {
  uint32_t lo0, lo1, hi0, hi1;
};
__device__ __forceinline__ Planes make_planes(const float* cb, int entries) {
  uint32_t lo[2] = {0, 0}, hi[2] = {0, 0};
  for (int i = 0; i < 8 && i < entries; ++i) {
    const uint32_t b = __half_as_ushort(__float2half_rn(cb[i]));
    lo[i / 4] |= (b & 0xffu) << (8 * (i % 4));
    hi[i / 4] |= (b >> 8) << (8 * (i % 4));
  }
  return {lo[0], lo[1], hi[0], hi[1]};
}
// Entries at the 4 selector nibbles of sel (low 16 bits) -> two f16x2 (nibbles 0,1 and 2,3).
__device__ __forceinline__ void lookup4(const Planes& t, uint32_t sel, uint32_t& r01, uint32_t& r23,
                                        uint32_t hi_flip = 0) {
  const uint32_t lo = prmt(t.lo0, t.lo1, sel);
  const uint32_t hi = prmt(t.hi0, t.hi1, sel) ^ hi_flip;
  r01 = prmt(lo, hi, 0x5140);
  r23 = prmt(lo, hi, 0x7362);
}

// ---- f16: chunks of 8 dims, arranged so the lanes of a phase hit distinct banks --------
// (rows are staged with a stride of 4 words mod 32; see attention_templated.cuh).
struct F16 {
  static constexpr bool kPairs = false;
  static constexpr bool kBlockScores = false;
  static constexpr bool kScaleOut = false;
  static constexpr int kFmt = kFmt_f16;
  static constexpr bool kPadRows = true;
  static constexpr int row_bytes(int dp) { return 2 * dp; }
  template <int DP, int NP>
  __device__ static int chunk(int p, int j) {
    if constexpr (NP == 4) return 2 * p + (j & 1) + 8 * (j >> 1);
    return p + 8 * j;
  }
  template <int DP, int NP>
  __device__ static int dim(int p, int i) {
    return 8 * chunk<DP, NP>(p, i / 8) + i % 8;
  }
  template <int DP, int NP>
  __device__ static void decode(const Row& row, int p, const Planes&, uint32_t (&h)[DP / NP / 2]) {
#pragma unroll
    for (int j = 0; j < DP / NP / 8; ++j) {
      const uint4 w = *reinterpret_cast<const uint4*>(row.p + 16 * chunk<DP, NP>(p, j));
      h[4 * j] = w.x;
      h[4 * j + 1] = w.y;
      h[4 * j + 2] = w.z;
      h[4 * j + 3] = w.w;
    }
  }
};

// ---- q8_0: blocks of 2 + 32 bytes; portion p = values [n p, n p + n), natural order -----
struct Q8 {
  static constexpr bool kPairs = false;
  static constexpr bool kBlockScores = false;
  static constexpr bool kScaleOut = false;
  static constexpr int kFmt = kFmt_q8_0;
  static constexpr bool kPadRows = false;
  static constexpr int row_bytes(int dp) { return dp / 32 * 34; }
  template <int DP, int NP>
  __device__ static int dim(int p, int i) {
    return DP / NP * p + i;
  }
  template <int DP, int NP>
  __device__ static void decode(const Row& row, int p, const Planes&, uint32_t (&h)[DP / NP / 2]) {
    constexpr int n = DP / NP;
    const __half2 off = __float2half2_rn(1152.0f);  // 1024 + 128 (the byte's sign bit is flipped)
#pragma unroll
    for (int v = 0; v < n; v += 4) {  // one word: 4 values, never across a block
      const int j = n * p + v;
      const int blk = (j / 32) * 34;
      const __half2 d = scale2(row.p + blk);
      const uint32_t w = row.word(blk + 2 + j % 32) ^ 0x80808080u;
      h[v / 2] = hmul(h2u(__hsub2(u2h(prmt(w, 0x64646464u, 0x4140)), off)), d);
      h[v / 2 + 1] = hmul(h2u(__hsub2(u2h(prmt(w, 0x64646464u, 0x4342)), off)), d);
    }
  }
};

// ---- q5_0: blocks of 2 + 4 + 16 bytes: scale, the 32 high bits, then q4_0's nibbles ----
// Portion p = values [n p, n p + n), natural order, as q8_0: four values' nibbles and high
// bits become one word of 5-bit bytes (the 4 high bits spread to bit 4 of each byte by one
// multiply), then the same 1024 + q trick, centred at 16.
struct Q5 {
  static constexpr bool kPairs = false;
  static constexpr bool kBlockScores = false;
  static constexpr bool kScaleOut = false;
  static constexpr int kFmt = kFmt_q5_0;
  static constexpr bool kPadRows = false;
  static constexpr int row_bytes(int dp) { return dp / 32 * 22; }
  template <int DP, int NP>
  __device__ static int dim(int p, int i) {
    return DP / NP * p + i;
  }
  template <int DP, int NP>
  __device__ static void decode(const Row& row, int p, const Planes&, uint32_t (&h)[DP / NP / 2]) {
    constexpr int n = DP / NP;
    const __half2 off = __float2half2_rn(1040.0f);  // 1024 + 16
#pragma unroll
    for (int v = 0; v < n; v += 4) {  // 4 values, never across a block
      const int j = n * p + v, jj = j % 32;
      const int blk = (j / 32) * 22;
      const __half2 d = scale2(row.p + blk);
      const uint32_t hb = (row.word(blk + 2) >> jj) & 0xfu;
      const uint32_t lo = (row.word(blk + 6 + jj % 16) >> (jj < 16 ? 0 : 4)) & 0x0f0f0f0fu;
      const uint32_t w = lo | ((hb * 0x00204081u) & 0x01010101u) << 4;
      h[v / 2] = hmul(h2u(__hsub2(u2h(prmt(w, 0x64646464u, 0x4140)), off)), d);
      h[v / 2 + 1] = hmul(h2u(__hsub2(u2h(prmt(w, 0x64646464u, 0x4342)), off)), d);
    }
  }
};

// ---- q4_0: blocks of 2 + 16 bytes, byte i = value i (low nibble) | value i+16 (high) ----
// A low nibble under the exponent bits of 1024 (0x6400) is the f16 1024 + q exactly; a high
// nibble (bits 4-7) is 1024 + 16 q. One LOP3 per register of two values, from the word and
// the word >> 8: per word of bytes i..i+3, registers (i, i+2), (i+16, i+18), (i+1, i+3),
// (i+17, i+19).
//
// K side, a block at a time (kBlockScores): the scores take the raw registers, centred and
// scaled per block outside the products. For block B of a key row,
//   q . k_B = d_B (sum_low q (1024 + q_i) + sum_high (q / 16) (1024 + 16 q_i) - off_B),
// off_B = 1032 sum_low q + 1152 sum_high (q / 16): the query fragments of high-nibble slots
// carry the 1 / 16 (query_weight), the mma of a block starts from -off_B (block_offsets, the
// same fragments through the same tensor cores), and its two scores are then scaled by the
// rows' d_B in fp32. Lane tg takes bytes 4tg..4tg+3 of every block, so a k-step (16 dims of
// 4 lanes) never straddles two blocks. Against decoding (q - 8) d_B into f16: no f16
// subtract and multiply per 2 values, and no f16 rounding of the values (q - 8) d_B (up to
// 2^-12 of each); the price is the fp32 cancellation of off_B, a few fp32 ulps of 1152
// sum |q| (about 2^-13 sum |q| per block, times d_B): no larger than the rounding it replaces.
struct Q4 {
  static constexpr bool kPairs = true;        // pair_dim, block_pv below
  static constexpr bool kBlockScores = true;  // block_scores, block_pv below
  static constexpr int kFmt = kFmt_q4_0;
  static constexpr bool kPadRows = false;
  static constexpr bool kScaleOut = false;
  static constexpr int row_bytes(int dp) { return dp / 32 * 18; }
  // The four raw registers of word x (see above): 1024 + q in 0 and 2, 1024 + 16 q in 1 and 3.
  __device__ static void raw(uint32_t x, uint32_t* o) {
    const uint32_t x8 = x >> 8;
    o[0] = and_or<0x000f000fu, 0x64006400u>(x);
    o[1] = and_or<0x00f000f0u, 0x64006400u>(x);
    o[2] = and_or<0x000f000fu, 0x64006400u>(x8);
    o[3] = and_or<0x00f000f0u, 0x64006400u>(x8);
  }
  // K value i of lane tg: block i / 8, register (i % 8) / 2 of its word, half i % 2.
  template <int DP, int NP>
  __device__ static int dim(int tg, int i) {
    static_assert(NP == 4, "the K side's map");
    constexpr int add[4] = {0, 16, 1, 17};
    return 32 * (i / 8) + 4 * tg + add[(i % 8) / 2] + 2 * (i % 2);
  }
  // Registers 1 and 3 of a word (high nibbles) hold 16 q: their query slots take 1 / 16.
  __device__ static float query_weight(int i) { return (i % 4) >= 2 ? 0.0625f : 1.0f; }
  // -off_B for this lane's two heads (2tg, 2tg + 1), per block: the query fragments times
  // the constant rows -1032 (low slots) / -1152 (high slots).
  template <int DP>
  __device__ static void block_offsets(const uint32_t (&qf)[DP / 16][2], float (&neg)[DP / 32][4]) {
    const uint32_t lo = h2u(__float2half2_rn(-1032.0f)), hi = h2u(__float2half2_rn(-1152.0f));
#pragma unroll
    for (int blk = 0; blk < DP / 32; ++blk) {
      // (Rows gr and gr + 8 alike: the 4 accumulators an mma starts from.)
      float* c = neg[blk];
      c[0] = c[1] = c[2] = c[3] = 0.0f;
      mma_16816(neg[blk], lo, lo, hi, hi, qf[2 * blk][0], qf[2 * blk][1]);
      mma_16816(neg[blk], lo, lo, hi, hi, qf[2 * blk + 1][0], qf[2 * blk + 1][1]);
    }
  }
  // Adds the scores of K rows a (sc[0], sc[1]) and b (sc[2], sc[3]) against heads 2tg, 2tg + 1.
  template <int DP>
  __device__ static void block_scores(const Row& a, const Row& b, int tg, const uint32_t (&qf)[DP / 16][2],
                                      const float (&neg)[DP / 32][4], float (&sc)[4]) {
#pragma unroll
    for (int blk = 0; blk < DP / 32; ++blk) {
      const int at = 18 * blk;
      uint32_t ra[4], rb[4];
      raw(a.word(at + 2 + 4 * tg), ra);
      raw(b.word(at + 2 + 4 * tg), rb);
      float c[4];
      mma_16816_from(c, ra[0], rb[0], ra[1], rb[1], qf[2 * blk][0], qf[2 * blk][1], neg[blk]);
      mma_16816(c, ra[2], rb[2], ra[3], rb[3], qf[2 * blk + 1][0], qf[2 * blk + 1][1]);
      const float da = __half2float(__ushort_as_half(static_cast<unsigned short>(a.half(at))));
      const float db = __half2float(__ushort_as_half(static_cast<unsigned short>(b.half(at))));
      sc[0] = __fmaf_rn(da, c[0], sc[0]);
      sc[1] = __fmaf_rn(da, c[1], sc[1]);
      sc[2] = __fmaf_rn(db, c[2], sc[2]);
      sc[3] = __fmaf_rn(db, c[3], sc[3]);
    }
  }
  // V side, a block at a time too: m-tiles 2B and 2B + 1 hold block B's 32 dims, so the
  // rows' block scales d_B go into the probabilities (keys are the mma's k: p times
  // {d_a, d_b} per key pair, two f16x2 multiplies a block) instead of into every value. Lane
  // gr takes bytes 2gr, 2gr + 1 of each block of its 4 keys' rows: two rows' halves side by
  // side give, through raw(), {a, b} of dims 2gr, 2gr + 16, 2gr + 1, 2gr + 17, centred
  // exactly (1024 + q - 1032; (1024 + 16 q) / 16 - 72). Register 2mt + half of the output
  // holds dim pair_dim(gr, 2mt + half).
  template <int DP>
  __device__ static int pair_dim(int gr, int i) {
    const int mt = i / 2;
    return 32 * (mt / 2) + 2 * gr + 16 * (mt % 2) + i % 2;
  }
  // o[mt] += V^T P^T for one 16-key tile: rows vk = keys 2tg, 2tg + 1, 2tg + 8, 2tg + 9 and
  // the probability fragments p0 (keys 2tg, 2tg + 1) and p1 (2tg + 8, 2tg + 9) of head gr.
  template <int DP>
  __device__ static void block_pv(const Row (&vk)[4], int gr, uint32_t p0, uint32_t p1, float (&o)[DP / 16][4]) {
    const __half2 off = __float2half2_rn(-1032.0f), sixteenth = __float2half2_rn(0.0625f),
                  off16 = __float2half2_rn(-72.0f);  // 1024 / 16 + 8
    const auto pairs = [&](const Row& a, const Row& b, int at, uint32_t* r) {
      raw(a.half(at) | (b.half(at) << 16), r);
      r[0] = h2u(__hadd2(u2h(r[0]), off));
      r[1] = h2u(__hfma2(u2h(r[1]), sixteenth, off16));
      r[2] = h2u(__hadd2(u2h(r[2]), off));
      r[3] = h2u(__hfma2(u2h(r[3]), sixteenth, off16));
    };
#pragma unroll
    for (int blk = 0; blk < DP / 32; ++blk) {
      const int at = 18 * blk;
      const uint32_t pa = hmul(p0, u2h(vk[0].half(at) | (vk[1].half(at) << 16)));
      const uint32_t pc = hmul(p1, u2h(vk[2].half(at) | (vk[3].half(at) << 16)));
      uint32_t ab[4], cd[4];
      pairs(vk[0], vk[1], at + 2 + 2 * gr, ab);
      pairs(vk[2], vk[3], at + 2 + 2 * gr, cd);
      mma_16816(o[2 * blk], ab[0], ab[2], cd[0], cd[2], pa, pc);
      mma_16816(o[2 * blk + 1], ab[1], ab[3], cd[1], cd[3], pa, pc);
    }
  }
};

// ---- turbo: groups of g = 128 (64 when DP = 64) values: fp16 scale, then the indices ----
template <int DP, int BITS, int FMT>
struct TurboRow {
  static constexpr int kFmt = FMT;
  static constexpr bool kPadRows = false;
  static constexpr int G = DP % 128 == 0 ? 128 : 64;
  static constexpr int kGroupBytes = 2 + G * BITS / 8;
  static constexpr int row_bytes(int dp) { return dp / G * kGroupBytes; }
  static constexpr bool kScaleOut = G == DP;  // one group per row: its scale is applied by the kernel
  static constexpr bool kPairs = false;       // Turbo3 overrides
  static constexpr bool kBlockScores = false;
  // The offset of the group holding value j0 (a portion never straddles two), and its
  // scale twice.
  __device__ static int group(const Row& row, int j0, __half2& s) {
    const int grp = (j0 / G) * kGroupBytes;
    s = kScaleOut ? __half2{} : scale2(row.p + grp);
    return grp;
  }
  // Decoded codebook values times the group's scale, unless the kernel applies it.
  template <int N>
  __device__ static void scale(uint32_t* h, __half2 s) {
    if constexpr (!kScaleOut) {
#pragma unroll
      for (int r = 0; r < N; ++r) h[r] = hmul(h[r], s);
    }
  }
};

// turbo3: 2 low bits per value (4 a byte), then 1 high bit per value (8 a byte). Per 16
// values (one word of low bits, 16 high bits): even values 0,2,..14 in nibble order, then the
// odd ones: (0,2) (4,6) (8,10) (12,14) (1,3) (5,7) (9,11) (13,15); 8-value units keep the
// first two of each.
template <int DP>
struct Turbo3 : TurboRow<DP, 3, kFmt_turbo3> {
  using TurboRow<DP, 3, kFmt_turbo3>::G;
  using TurboRow<DP, 3, kFmt_turbo3>::group;
  static constexpr bool kPairs = true;  // decode_pair below
  template <int DP_, int NP>
  __device__ static int dim(int p, int i) {
    constexpr int n = DP / NP, u = n < 16 ? n : 16;  // values per unit
    const int k = i % u, base = n * p + u * (i / u);
    constexpr int per = u / 4;  // registers per parity
    const int r = k / 2, odd = r >= per, within = (r % per) * 2 + k % 2;
    return base + 2 * within + odd;
  }
  // Selector words of the 16 values at w of a group whose low / high bits start at byte
  // lo / hi of the row: se holds the even values' 3-bit indices in nibbles 0..7, so the odd
  // ones'. (8 values: nibbles 0..3 of each.)
  template <int U>
  __device__ static void selectors(const Row& row, int lo, int hi, int w, uint32_t& se, uint32_t& so) {
    if constexpr (U == 16) {
      const uint32_t L = row.word(lo + w / 4), sp = spread16(row.half(hi + w / 8));
      se = (L & 0x33333333u) | ((sp << 2) & 0x44444444u);
      so = ((L >> 2) & 0x33333333u) | (sp & 0x44444444u);
    } else {
      const uint32_t L = row.half(lo + w / 4), sp = spread16(row.p[hi + w / 8]);
      se = (L & 0x3333u) | ((sp << 2) & 0x4444u);
      so = ((L >> 2) & 0x3333u) | (sp & 0x4444u);
    }
  }
  template <int DP_, int NP>
  __device__ static void decode(const Row& row, int p, const Planes& t, uint32_t (&h)[DP / NP / 2]) {
    constexpr int n = DP / NP;
    const int j0 = n * p;
    __half2 s;
    const int lo = group(row, j0, s) + 2, hi = lo + G / 4;
    if constexpr (n >= 16) {
#pragma unroll
      for (int u = 0; u < n / 16; ++u) {
        uint32_t se, so;
        selectors<16>(row, lo, hi, j0 % G + 16 * u, se, so);
        uint32_t* o = h + 8 * u;
        lookup4(t, se, o[0], o[1]);
        lookup4(t, se >> 16, o[2], o[3]);
        lookup4(t, so, o[4], o[5]);
        lookup4(t, so >> 16, o[6], o[7]);
        Turbo3::template scale<8>(o, s);
      }
    } else {
      uint32_t se, so;
      selectors<8>(row, lo, hi, j0 % G, se, so);
      lookup4(t, se, h[0], h[1]);
      lookup4(t, so, h[2], h[3]);
      Turbo3::template scale<4>(h, s);
    }
  }
  // The V side's pairs: the n = DP / 8 values of portion p of two rows a and b (keys k and
  // k + 1 of the mma), straight as n f16x2 {a value, b value}. The two rows' selector
  // nibbles are interleaved (one LOP3 per 8) before the lookups, so each lookup gives two
  // finished registers: no prmt per register to pair the rows afterwards. Register i holds
  // value 4 (i % per) + {0, 2, 1, 3}[i / per] of its unit of u = min(n, 16), per = u / 4.
  template <int DP_>
  __device__ static int pair_dim(int p, int i) {
    constexpr int n = DP / 8, u = n < 16 ? n : 16, per = u / 4;
    constexpr int perm[4] = {0, 2, 1, 3};
    const int k = i % u;
    return n * p + u * (i / u) + 4 * (k % per) + perm[k / per];
  }
  template <int DP_>
  __device__ static void decode_pair(const Row& a, const Row& b, int p, const Planes& t, uint32_t (&h)[DP / 8]) {
    constexpr int n = DP / 8, u = n < 16 ? n : 16;
    constexpr uint32_t even = u == 16 ? 0x0f0f0f0fu : 0x0f0fu;  // nibbles 0, 2, 4, 6
    const int j0 = n * p;
    __half2 sa, sb;
    const int lo = group(a, j0, sa) + 2, hi = lo + G / 4;
    group(b, j0, sb);
#pragma unroll
    for (int v = 0; v < n / u; ++v) {
      uint32_t ea, oa, eb, ob;
      selectors<u>(a, lo, hi, j0 % G + u * v, ea, oa);
      selectors<u>(b, lo, hi, j0 % G + u * v, eb, ob);
      // Nibbles a0 b0 a4 b4 ... (values 0, 4, 8, 12 of both rows), then 2, 6, .., 1, 5, .., 3, 7, ..
      const uint32_t sel[4] = {bit_select<even>(ea, eb << 4), bit_select<even>(ea >> 4, eb),
                               bit_select<even>(oa, ob << 4), bit_select<even>(oa >> 4, ob)};
      uint32_t* o = h + u * v;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if constexpr (u == 16) {
          lookup4(t, sel[q], o[4 * q], o[4 * q + 1]);
          lookup4(t, sel[q] >> 16, o[4 * q + 2], o[4 * q + 3]);
        } else {
          lookup4(t, sel[q], o[2 * q], o[2 * q + 1]);
        }
      }
      Turbo3::template scale<u>(o, __halves2half2(__low2half(sa), __low2half(sb)));
    }
  }
};

// turbo2: 2 bits per value, 4 entries: one prmt per 2 values, with the low bytes of the
// entries in the first table word and the high bytes in the second (selector j, j + 4).
// Per word of 16 values: (0,4) (8,12) (1,5) (9,13) (2,6) (10,14) (3,7) (11,15).
template <int DP>
struct Turbo2 : TurboRow<DP, 2, kFmt_turbo2> {
  using TurboRow<DP, 2, kFmt_turbo2>::G;
  using TurboRow<DP, 2, kFmt_turbo2>::group;
  template <int DP_, int NP>
  __device__ static int dim(int p, int i) {
    constexpr int n = DP / NP, u = n < 16 ? n : 16;
    const int k = i % u, base = n * p + u * (i / u);
    if constexpr (u == 16) return base + (k / 4) + 8 * ((k / 2) % 2) + 4 * (k % 2);
    return base + k / 2 + 4 * (k % 2);
  }
  template <int DP_, int NP>
  __device__ static void decode(const Row& row, int p, const Planes& t, uint32_t (&h)[DP / NP / 2]) {
    constexpr int n = DP / NP;
    const int j0 = n * p;
    __half2 s;
    const int grp = group(row, j0, s);
    const uint32_t tl = t.lo0, th = t.hi0;  // entries 0..3
#pragma unroll
    for (int u = 0; u < (n + 15) / 16; ++u) {
      const int w = j0 % G + 16 * u;
      const uint32_t L = n >= 16 ? row.word(grp + 2 + w / 4) : row.half(grp + 2 + w / 4);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t x = (L >> (2 * q)) & 0x03030303u;
        const uint32_t sel = x | (x << 4) | 0x40404040u;
        if constexpr (n >= 16) {
          h[8 * u + 2 * q] = prmt(tl, th, sel);
          h[8 * u + 2 * q + 1] = prmt(tl, th, sel >> 16);
        } else {
          h[q] = prmt(tl, th, sel);
        }
      }
      Turbo2::template scale<(n >= 16 ? 8 : 4)>(h + 8 * u, s);
    }
  }
};

// turbo4: 4 bits per value (2 a byte, low nibble first): natural order. Entry i >= 8 is
// -entry (15 - i): look up (i & 7) ^ (7 if bit 3) among the first 8, flip the sign by bit 3.
template <int DP>
struct Turbo4 : TurboRow<DP, 4, kFmt_turbo4> {
  using TurboRow<DP, 4, kFmt_turbo4>::G;
  using TurboRow<DP, 4, kFmt_turbo4>::group;
  template <int DP_, int NP>
  __device__ static int dim(int p, int i) {
    return DP / NP * p + i;
  }
  template <int DP_, int NP>
  __device__ static void decode(const Row& row, int p, const Planes& t, uint32_t (&h)[DP / NP / 2]) {
    constexpr int n = DP / NP;
    const int j0 = n * p;
    __half2 s;
    const int grp = group(row, j0, s);
#pragma unroll
    for (int v = 0; v < n; v += 8) {
      const uint32_t W = row.word(grp + 2 + (j0 % G + v) / 2);
      const uint32_t b3 = (W >> 3) & 0x11111111u;
      const uint32_t sel = (W ^ (b3 * 7u)) & 0x77777777u;
      // Byte k of the flips: 0x80 when value k (of the 4 looked up) has bit 3 set. Bit 3
      // of nibble 2k is bit 7 of byte k of (W << 4); of nibble 2k + 1, of byte k of W.
      const uint32_t e = W << 4;
      const uint32_t f0 = prmt(e, W, 0x5140) & 0x80808080u;  // values 0..3: bytes 0, 1 of e and W
      const uint32_t f1 = prmt(e, W, 0x7362) & 0x80808080u;  // values 4..7: bytes 2, 3
      lookup4(t, sel, h[v / 2], h[v / 2 + 1], f0);
      lookup4(t, sel >> 16, h[v / 2 + 2], h[v / 2 + 3], f1);
      Turbo4::template scale<4>(h + v / 2, s);
    }
  }
};

}  // namespace turbokv::cuda::packed
