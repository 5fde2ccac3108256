// Decode and multi-query attention on tensor cores, specialised per format at compile time
// (f16/bf16 queries, rows of 64/128/256 values): the K rows are read through one format's
// decoder, the V rows through another's (any pair of templated_table's formats).
//
// Same products, fragment layouts and row chunks as attention_mma.cuh (keys as M, 8 (query,
// head) rows as N), with three differences that decide the speed:
//  * decoding: the format is a template parameter and each lane decodes its whole portion of
//    a row straight into f16x2 registers with word-wide bit tricks (packed_decode.cuh), in
//    whatever dim order is cheapest; the query fragments and the output use the same order;
//  * the V fragments pair two keys per register: decoded so directly where the format can
//    (turbo3: decode_pair; q4_0: block_pv), else two prmt per pair of decoded registers;
//    q4_0 also scores its K rows a ggml block at a time (block_scores);
//  * deeper pipelining: up to 4 stages of 16 or 32 keys per warp in flight (cp.async, one
//    instruction a copy: Stager), rows padded in shared memory where that removes bank
//    conflicts (f16).
// The partial results (unnormalised output, max, sum per split) go to the same workspace as
// the other kernels', so merge_kernel (attention.cu) finishes the job.
#pragma once

#include <type_traits>

#include "attention_mma.cuh"
#include "packed_decode.cuh"

namespace turbokv::cuda {

// Compile-time shape of one kernel: tiles per chunk, stages, shared-memory layout. kWide:
// where a stage is large (f16 rows of 128: 8.7 KB), 3 blocks of 2 stages per SM instead of 2
// of 3 -- more warps to hide the loop's latencies, for long key streams (see templated_table).
template <class KF, class VF, int DP, bool kWide = false>
struct TemplatedConfig {
  static constexpr int kRowK = KF::row_bytes(DP), kRowV = VF::row_bytes(DP);
  // Padded rows (16-byte multiples only): a stride of 4 words mod 32 banks.
  static constexpr int kStrideK = KF::kPadRows ? kRowK + 16 : kRowK;
  static constexpr int kStrideV = VF::kPadRows ? kRowV + 16 : kRowV;
  static constexpr int NT = 32 * (kRowK + kRowV) <= 6144 ? 2 : 1;
  static constexpr int TK = 16 * NT;
  // Contiguous copies start at the 16-byte boundary before the first row: 16 bytes of lead,
  // and 16 of slack for the word reads past a row's end.
  static constexpr int buf(int rows, int stride, bool pad) {
    return pad ? rows * stride : (rows * stride + 47) / 16 * 16;
  }
  static constexpr int kBufK = buf(TK, kStrideK, KF::kPadRows), kBufV = buf(TK, kStrideV, VF::kPadRows);
  static constexpr int kStage = kBufK + kBufV;
  // Stages per warp: 4 blocks of 4 warps per SM when they fit in shared memory (56 KiB a
  // block on Hopper), else 3 blocks, else fewer stages. More blocks with fewer registers are
  // no faster: the decoders are bound by the ALU pipe, not by latency.
  static constexpr int stages() {
    for (int blocks : {4, 3, 2})
      for (int st : {4, 3, 2})
        if ((st > 2 || (kWide && blocks == 3)) && 4 * st * kStage <= 233472 / blocks - 1024) return st;
    return 2;
  }
  static constexpr int kStages = stages();
  static constexpr int kMergeBytes = 4 * 8 * (DP + 2) * 4;
  static constexpr int kSmem = 4 * kStages * kStage > kMergeBytes ? 4 * kStages * kStage : kMergeBytes;
  // Buffers are stage-major (stage s of warp w at (4 s + w) * kStage): the last stage of all
  // warps, not in flight during the prologue, holds the rotated queries (8 x DP floats).
  static constexpr int kQOffset = 4 * (kStages - 1) * kStage;
  static_assert(4 * kStage >= 4 * 8 * DP, "the query rows must fit in one stage of the 4 warps");
};

// cp.async of 16 bytes from global g + G to shared s + S: both offsets immediates of the
// instruction.
template <int S, int G>
__device__ __forceinline__ void cp_async16_at(uint32_t s, const uint8_t* g) {
  asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%3], 16;\n" ::"r"(s), "l"(g), "n"(S), "n"(G));
}

// f(std::integral_constant<int, R>) for R in [R0, N).
template <int R0, int N, class F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (R0 < N) {
    f(std::integral_constant<int, R0>{});
    static_for<R0 + 1, N>(f);
  }
}

// The copies of one side's chunks (up to kRows rows of kRow bytes) into a warp's stage
// buffers. A warp's chunks start 4 chunks apart and land at the same place in their buffers
// (a chunk is a multiple of 16 bytes), so a lane keeps the global address of its first copy
// of the warp's first chunk and which of its copies a full chunk has: a copy is then one
// predicated cp.async with immediate offsets (an address computed per copy cost ~150
// instructions per chunk of 32 q4_0 keys, an eighth of the decode loop).
//  * contiguous rows (kPad false): 16-byte words from the boundary at or before the first
//    row (up to 15 bytes of lead), word i = lane + 32 r;
//  * padded rows (kPad: rows of 16-byte multiples to a stride of kStride): a row is kPer
//    words (kPer divides 32), so copy r of a lane is word lane % kPer of row
//    lane / kPer + r (32 / kPer).
template <int kRow, int kStride, int kRows, bool kPad>
struct Stager {
  static constexpr int kPer = kRow / 16, kRowsPerIter = kPad ? 32 / kPer : 0;
  static_assert(!kPad || (kRow % 16 == 0 && 32 % kPer == 0), "padded rows: whole words, a divisor of 32 a row");
  static constexpr int kIters = kPad ? kRows / kRowsPerIter : ((15 + kRows * kRow + 15) / 16 + 31) / 32;
  static constexpr int kStepS = kPad ? kRowsPerIter * kStride : 512, kStepG = kPad ? kRowsPerIter * kRow : 512;
  const uint8_t* g;  // this lane's copy 0 of the warp's first chunk
  uint32_t full;     // bit r: the lane's copy r exists in a full chunk
  int lead;          // where a chunk's first row lands in its buffer (0 for padded rows)

  // Copies r < count(n) where n is the number of words (contiguous) or rows (padded).
  __device__ static uint32_t first(int n, int lane) {
    const int at = kPad ? lane / kPer : lane, per = kPad ? kRowsPerIter : 32;
    const int count = n > at ? (n - at + per - 1) / per : 0;
    return count >= 32 ? ~0u : (1u << count) - 1u;
  }
  __device__ static int words(int lead, int nrows) { return (lead + nrows * kRow + 15) / 16; }
  // rows: the side's rows; t0: the warp's first chunk (the same lead as the split's first).
  __device__ Stager(const uint8_t* rows, int64_t t0, int lane) : lead(kPad ? 0 : stage_offset(rows, kRow, t0)) {
    if constexpr (kPad) {
      g = rows + (t0 + lane / kPer) * kRow + 16 * (lane % kPer);
      full = first(kRows, lane);
    } else {
      g = rows + t0 * kRow - lead + 16 * lane;
      full = first(words(lead, kRows), lane);
    }
  }
  // The lane's shared offset of its copy 0 within a stage buffer.
  __device__ static uint32_t shared_at(int lane) {
    return kPad ? static_cast<uint32_t>((lane / kPer) * kStride + 16 * (lane % kPer)) : 16u * lane;
  }
  // The warp's next chunk (its chunks go in order, each 4 chunks of kRows rows after the
  // previous one), nrows <= kRows of its rows, into the buffer at shared address buf (+
  // shared_at).
  __device__ void copy_next(uint32_t buf, int nrows, int lane) {
    const uint32_t m = nrows == kRows ? full : first(kPad ? nrows : words(lead, nrows), lane);
    static_for<0, kIters>([&](auto r) {
      constexpr int R = decltype(r)::value;
      if ((m >> R) & 1u) cp_async16_at<R * kStepS, R * kStepG>(buf, g);
    });
    g += 4 * kRows * kRow;
  }
};

// kMulti: built for several queries per sequence (rows of a chunk at different positions, so
// chunks seen by some rows and not others are masked per row); decode (Sq = 1) takes the
// kernel without that code in its key loop.
template <class KF, class VF, int DP, bool kWide, bool kMulti>
__global__ void __launch_bounds__(kThreads, DP >= 256 ? 2 : 4)
    templated_attention_kernel(const void* __restrict__ q, int q_bf16, const uint8_t* __restrict__ kc,
                               const uint8_t* __restrict__ vc, DeviceSide ks, DeviceSide vs, AttnParams P,
                               float* __restrict__ part_o, float* __restrict__ part_ml) {
  using C = TemplatedConfig<KF, VF, DP, kWide>;
  launch_dependents();  // the merge kernel may take SMs as this grid frees them
  constexpr int KS = DP / 16, E = DP / 4, F = DP / 8, NT = C::NT, TK = C::TK, S = C::kStages;
  extern __shared__ __align__(16) uint8_t smem[];
  float* qs = reinterpret_cast<float*>(smem + C::kQOffset);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gr = lane >> 2, tg = lane & 3;
  const int split = blockIdx.x;
  const int64_t bh = blockIdx.y, b = bh / P.Hkv, h = bh % P.Hkv;
  // Each side's codebook in registers (only turbo decoders read them).
  const packed::Planes tk = packed::make_planes(ks.cb, 8), tv = packed::make_planes(vs.cb, 8);
  const int64_t base = bh * P.T;
  const uint8_t* krows = kc + base * C::kRowK;
  const uint8_t* vrows = vc + base * C::kRowV;
  using StageK = Stager<C::kRowK, C::kStrideK, TK, KF::kPadRows>;
  using StageV = Stager<C::kRowV, C::kStrideV, TK, VF::kPadRows>;
  const uint32_t stages = static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + warp * C::kStage;
  const uint32_t sk_at = stages + StageK::shared_at(lane), sv_at = stages + C::kBufK + StageV::shared_at(lane);
  // This warp's chunks of keys [s_lo, s_hi): n in all, the first `full` of them whole.
  struct Chunks {
    int64_t s_lo, s_hi;
    int n, full;
  };
  const auto chunks = [&](int64_t s_lo, int64_t s_hi) {
    const int64_t first = s_lo + static_cast<int64_t>(warp) * TK, keys = s_hi - first;
    const int n = keys > 0 ? static_cast<int>((keys + 4 * TK - 1) / (4 * TK)) : 0;
    const int full = keys >= TK ? static_cast<int>((keys - TK) / (4 * TK)) + 1 : 0;
    return Chunks{s_lo, s_hi, n, full};
  };
  // Issues chunk i of c into its stage; every i in turn, once (the stagers and the stage
  // offset move on a chunk at each call).
  uint32_t next_stage = 0;
  const auto issue = [&](auto& sk, auto& sv, int i, const Chunks& c) {
    if (i < c.n) {
      const int nrows = i < c.full ? TK : static_cast<int>(c.s_hi - c.s_lo - static_cast<int64_t>(warp + 4 * i) * TK);
      sk.copy_next(sk_at + next_stage, nrows, lane);
      sv.copy_next(sv_at + next_stage, nrows, lane);
    }
    cp_async_commit();  // an empty group when nothing was issued keeps the wait counts uniform
    next_stage = next_stage == (S - 1) * 4 * C::kStage ? 0u : next_stage + 4 * C::kStage;
  };
  // The query prologue (load, rotate, fragments) runs while the first chunks are in flight;
  // its loads go first (see QueryRows).
  QueryRows<DP> queries;
  queries.fetch(q, q_bf16, P, b, h, ks);
  // The sequence's length and start are requested before the key prefetch below: a load
  // issued after it waits behind the whole grid's prefetch (tens of MB at long contexts) in
  // the memory pipeline, and the prologue with it.
  const int64_t len_in = load_before_copies(P.lengths + b);
  const int64_t start_in = P.starts ? load_before_copies(P.starts + b) : 0;
  // Without starts or a window a split begins at split * span whatever the length, so the
  // first chunks are requested before the length arrives, as if it were T (rows up to T
  // exist; those past the length are zeroed or masked like any last chunk's).
  const bool early = P.starts == nullptr && P.window <= 0;
  int64_t s_lo = split * P.span;
  StageK sk(krows, s_lo + warp * TK, lane);
  StageV sv(vrows, s_lo + warp * TK, lane);
  if (early) {
    const Chunks guess = chunks(s_lo, min(P.T, s_lo + P.span));
#pragma unroll
    for (int i = 0; i < S - 1; ++i) issue(sk, sv, i, guess);
  }
  const int64_t len = min(max(len_in, int64_t(0)), P.T);
  const int64_t start = min(max(start_in, int64_t(0)), len);
  const RowChunk rows(P);
  int64_t lo, hi;
  rows.key_range(P, start, len, lo, hi);
  if (!early) {
    s_lo = lo + split * P.span;
    sk = StageK(krows, s_lo + warp * TK, lane);
    sv = StageV(vrows, s_lo + warp * TK, lane);
  }
  const int64_t s_hi = min(hi, s_lo + P.span);
  const Chunks mine_c = chunks(s_lo, s_hi);
  const int mine = mine_c.n;
  if (!early) {
#pragma unroll
    for (int i = 0; i < S - 1; ++i) issue(sk, sv, i, mine_c);
  }
  queries.finish(qs, q, q_bf16, P, b, h, ks);
  uint32_t qf[KS][2];  // in the K decoder's dim order
  query_fragments<DP, KS>(
      qf, qs, gr, P.scale, [&](int i) { return KF::template dim<DP, 4>(tg, i); },
      [](int i) {
        if constexpr (KF::kBlockScores) return KF::query_weight(i);
        return 1.0f;
      });
  float koff[DP / 32][4];  // formats scored a block at a time: each block's offset (see Q4)
  if constexpr (KF::kBlockScores) KF::template block_offsets<DP>(qf, koff);
  __syncthreads();  // the query rows' buffer becomes the warps' last stage

  float o[KS][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < KS; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  // Where the first row of a chunk lands in its stage buffer: the same for every chunk of
  // the split (a chunk's bytes are a multiple of 16), and so is each row's address mod 4 --
  // K rows 16j + gr (+ 8) of this lane, V rows 2tg + (0, 1) (+ 8, + 16j).
  const int k_at = sk.lead, v_at = C::kBufK + sv.lead;
  const uint32_t kmis = static_cast<uint32_t>(k_at + gr * C::kStrideK) & 3u;
  const uint32_t vmis[2] = {static_cast<uint32_t>(v_at + 2 * tg * C::kStrideV) & 3u,
                            static_cast<uint32_t>(v_at + (2 * tg + 1) * C::kStrideV) & 3u};

  for (int i = 0; i < mine; ++i) {
    issue(sk, sv, i + S - 1, mine_c);
    cp_async_wait<S - 1>();
    __syncwarp();
    const int64_t t0 = s_lo + static_cast<int64_t>(warp + 4 * i) * TK;
    uint8_t* st = smem + static_cast<size_t>(4 * (i % S) + warp) * C::kStage;
    const uint8_t* kt = st + k_at;
    const uint8_t* vt = st + v_at;
    const int nvalid = static_cast<int>(min(static_cast<int64_t>(TK), s_hi - t0));
    const bool partly = kMulti && rows.partly_seen(P, len, t0, t0 + nvalid);
    if (nvalid < TK) {
      // The split's last chunk: the V rows past the end are zeroed, so that they decode as
      // zeros in every format (p is 0 there, but 0 times stale bytes might be NaN). K rows
      // past the end are read as they are: their scores are masked to -inf.
      uint8_t* z = st + v_at + nvalid * C::kStrideV;
#pragma unroll 1
      for (int x = lane; x < (TK - nvalid) * C::kStrideV; x += 32) z[x] = 0;
      __syncwarp();
    }

    // Scores: S^T rows gr and gr + 8 of each 16-key tile, query rows 2tg and 2tg + 1.
    float sc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
      const int r0 = 16 * j + gr, r1 = r0 + 8;
      const packed::Row ka{kt + r0 * C::kStrideK, kmis}, kb{kt + r1 * C::kStrideK, kmis};
      if constexpr (KF::kBlockScores) {
        KF::template block_scores<DP>(ka, kb, tg, qf, koff, sc[j]);
      } else {
        uint32_t ha[E / 2], hb[E / 2];
        KF::template decode<DP, 4>(ka, tg, tk, ha);
        KF::template decode<DP, 4>(kb, tg, tk, hb);
#pragma unroll
        for (int s = 0; s < KS; ++s)
          mma_16816(sc[j], ha[2 * s], hb[2 * s], ha[2 * s + 1], hb[2 * s + 1], qf[s][0], qf[s][1]);
      }
      if constexpr (KF::kScaleOut) {  // q . (scale c) = scale (q . c)
        const float sa = __half2float(__ushort_as_half(ka.half(0)));
        const float sb = __half2float(__ushort_as_half(kb.half(0)));
        sc[j][0] *= sa;
        sc[j][1] *= sa;
        sc[j][2] *= sb;
        sc[j][3] *= sb;
      }
      mask_scores<NT>(sc, j, r0, nvalid, P.softcap);
      if (partly) mask_rows<NT>(sc, j, r0, t0, rows, len, tg, P);
    }
    chunk_softmax<NT, KS>(sc, m, l, o);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint32_t p0, p1;
      p_fragments(sc[j], gr, tg, p0, p1);
      // This lane's portion gr of the 4 keys' V rows (keys 2tg, 2tg + 1, 2tg + 8, 2tg + 9,
      // those of p0 and p1).
      packed::Row vk[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) vk[k] = {vt + (16 * j + 2 * tg + (k & 1) + 8 * (k >> 1)) * C::kStrideV, vmis[k & 1]};
      if constexpr (VF::kScaleOut) {  // (p scale) c: p <= 1, so the f16 product stays finite
        p0 = packed::hmul(p0, packed::u2h(vk[0].half(0) | (vk[1].half(0) << 16)));
        p1 = packed::hmul(p1, packed::u2h(vk[2].half(0) | (vk[3].half(0) << 16)));
      }
      // m-tile mt: row gr <- value 2mt, row gr + 8 <- value 2mt + 1 of each key's portion,
      // as f16x2 of two keys' values: decoded so by the format (kPairs), or paired here.
      if constexpr (VF::kBlockScores) {
        VF::template block_pv<DP>(vk, gr, p0, p1, o);
      } else if constexpr (VF::kPairs) {
        uint32_t ab[F], cd[F];
        VF::template decode_pair<DP>(vk[0], vk[1], gr, tv, ab);
        VF::template decode_pair<DP>(vk[2], vk[3], gr, tv, cd);
#pragma unroll
        for (int mt = 0; mt < KS; ++mt)
          mma_16816(o[mt], ab[2 * mt], ab[2 * mt + 1], cd[2 * mt], cd[2 * mt + 1], p0, p1);
      } else {
        uint32_t hv[4][F / 2];
#pragma unroll
        for (int k = 0; k < 4; ++k) VF::template decode<DP, 8>(vk[k], gr, tv, hv[k]);
#pragma unroll
        for (int mt = 0; mt < KS; ++mt)
          mma_16816(o[mt], __byte_perm(hv[0][mt], hv[1][mt], 0x5410), __byte_perm(hv[0][mt], hv[1][mt], 0x7632),
                    __byte_perm(hv[2][mt], hv[3][mt], 0x5410), __byte_perm(hv[2][mt], hv[3][mt], 0x7632), p0, p1);
      }
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();

  write_partials<DP, KS>(
      o, m, l,
      [&](int mt, int half) {
        if constexpr (VF::kPairs)
          return VF::template pair_dim<DP>(gr, 2 * mt + half);
        else
          return VF::template dim<DP, 8>(gr, 2 * mt + half);
      },
      smem, P, b, h, split, part_o, part_ml);
}

// One specialised kernel: its entry point, dynamic shared memory and keys per chunk.
struct TemplatedKernel {
  MmaKernel fn = nullptr;
  int smem = 0, tk = 0;
};

template <class KF, class VF, int DP, bool kMulti, bool kWide = false>
TemplatedKernel templated_entry() {
  using C = TemplatedConfig<KF, VF, DP, kWide>;
  return {templated_attention_kernel<KF, VF, DP, kWide, kMulti>, C::kSmem, C::TK};
}

// The K decoder of format kfmt (a packed::* type given to f), or false when none is built.
template <int DP, class Fn>
bool with_decoder(int fmt, Fn&& f) {
  using namespace packed;
  switch (fmt) {
    case kFmt_f16:
      f(F16{});
      return true;
    case kFmt_q8_0:
      f(Q8{});
      return true;
    case kFmt_q5_0:
      f(Q5{});
      return true;
    case kFmt_q4_0:
      f(Q4{});
      return true;
    case kFmt_turbo2:
      f(Turbo2<DP>{});
      return true;
    case kFmt_turbo3:
      f(Turbo3<DP>{});
      return true;
    case kFmt_turbo4:
      f(Turbo4<DP>{});
      return true;
    default:
      return false;
  }
}

// The kernel for K rows of format KF and V rows of format vfmt, DP values, or {} when none
// is built: every pair of the packed formats, and f16 with f16. long_keys: the call streams
// many keys per sequence (f16 rows of 128 then take the kWide shape: more blocks of fewer
// stages, for long key streams; short splits keep the deeper pipeline).
template <class KF, int DP, bool kMulti>
TemplatedKernel templated_table(int vfmt, bool long_keys) {
  TemplatedKernel out;
  if constexpr (std::is_same_v<KF, packed::F16>) {
    if (vfmt != kFmt_f16) return out;
    if constexpr (DP == 128)
      if (long_keys) return templated_entry<KF, KF, DP, kMulti, true>();
    return templated_entry<KF, KF, DP, kMulti>();
  } else {
    with_decoder<DP>(vfmt, [&](auto vf) {
      using VF = decltype(vf);
      if constexpr (!std::is_same_v<VF, packed::F16>) out = templated_entry<KF, VF, DP, kMulti>();
    });
    return out;
  }
}

// Built one file per (DP, kMulti, K format) so that they compile in parallel: the files in
// templated/ (tools/gen_templated_instances.py writes them), each a specialisation of this.
template <int DP, bool kMulti, int KFMT>
TemplatedKernel templated_kernel_for(int vfmt, bool long_keys);
#define TURBOKV_TEMPLATED_K(DP, MULTI, KFMT) \
  template <>                                \
  TemplatedKernel templated_kernel_for<DP, MULTI, KFMT>(int vfmt, bool long_keys);
#define TURBOKV_TEMPLATED_DP(DP, MULTI)       \
  TURBOKV_TEMPLATED_K(DP, MULTI, kFmt_f16)    \
  TURBOKV_TEMPLATED_K(DP, MULTI, kFmt_q8_0)   \
  TURBOKV_TEMPLATED_K(DP, MULTI, kFmt_q5_0)   \
  TURBOKV_TEMPLATED_K(DP, MULTI, kFmt_q4_0)   \
  TURBOKV_TEMPLATED_K(DP, MULTI, kFmt_turbo2) \
  TURBOKV_TEMPLATED_K(DP, MULTI, kFmt_turbo3) \
  TURBOKV_TEMPLATED_K(DP, MULTI, kFmt_turbo4)
TURBOKV_TEMPLATED_DP(64, false)
TURBOKV_TEMPLATED_DP(128, false)
TURBOKV_TEMPLATED_DP(256, false)
TURBOKV_TEMPLATED_DP(64, true)
TURBOKV_TEMPLATED_DP(128, true)
TURBOKV_TEMPLATED_DP(256, true)
#undef TURBOKV_TEMPLATED_DP
#undef TURBOKV_TEMPLATED_K

// The kernel for K rows of kfmt and V rows of vfmt, or {} where none is built.
template <int DP, bool kMulti>
TemplatedKernel templated_kernel(int kfmt, int vfmt, bool long_keys) {
  switch (kfmt) {
    case kFmt_f16:
      return templated_kernel_for<DP, kMulti, kFmt_f16>(vfmt, long_keys);
    case kFmt_q8_0:
      return templated_kernel_for<DP, kMulti, kFmt_q8_0>(vfmt, long_keys);
    case kFmt_q5_0:
      return templated_kernel_for<DP, kMulti, kFmt_q5_0>(vfmt, long_keys);
    case kFmt_q4_0:
      return templated_kernel_for<DP, kMulti, kFmt_q4_0>(vfmt, long_keys);
    case kFmt_turbo2:
      return templated_kernel_for<DP, kMulti, kFmt_turbo2>(vfmt, long_keys);
    case kFmt_turbo3:
      return templated_kernel_for<DP, kMulti, kFmt_turbo3>(vfmt, long_keys);
    case kFmt_turbo4:
      return templated_kernel_for<DP, kMulti, kFmt_turbo4>(vfmt, long_keys);
    default:
      return {};
  }
}

}  // namespace turbokv::cuda
