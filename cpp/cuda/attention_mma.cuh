// Decode and multi-query attention on tensor cores, f16/bf16 queries: a block's rows are 8 of
// a KV head's (query, head) pairs (RowChunk: the GQA group of one query in decode).
//
// Each warp streams chunks of TK = 16 * NT keys of one (sequence, KV head) through shared
// memory (cp.async, kStages deep) and runs two mma.m16n8k16 products per 16 keys, with the
// keys as M so that the chunk's 8 rows (padded) are N:
//   S^T (16 keys x 8 rows)  = K (16 keys x dp)   . Q^T (dp x 8 rows)
//   O^T (dp x 8 rows)      += V^T (dp x 16 keys) . P^T (16 keys x 8 rows)
// Several queries in a block (speculative decoding, chunked prefill): a key chunk that the
// causal diagonal or the window edge crosses is masked per row (mask_rows); there the V of a
// key only some rows see enters the others' products at probability 0, so a NaN in it reaches
// them too, as in FlashAttention's tiles (docs/contract.md).
// A dot product does not care in which order its terms are summed, so each lane's k-slots
// of the first product are mapped to dp/4 *contiguous* dims of a K row (Q's fragment uses
// the same map), and each lane's m-slots of the second product to dp/8 contiguous dims of a
// V row (the output rows go back through the same map). A lane thus decodes short
// contiguous spans of packed rows -- one q4_0 block, a few bytes of turbo indices --
// straight into f16 fragments: nothing dequantised is ever written to memory.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16): lane = 4 * gr + tg.
//   A (16x16): {row gr, cols 2tg..+1}, {row gr+8, same}, {row gr, cols 2tg+8..+9}, {row gr+8, same}
//   B (16x8):  {rows 2tg..+1, col gr}, {rows 2tg+8..+9, col gr}
//   C (16x8):  {row gr, cols 2tg..+1}, {row gr+8, cols 2tg..+1}
#pragma once

#include "attention_params.cuh"
#include "warp_rotate.cuh"

namespace turbokv::cuda {

constexpr int kMmaStages = 2;

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d = A B + c: an mma that starts from other accumulators than it writes (no moves into d).
__device__ __forceinline__ void mma_16816_from(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1, const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// N (2 or 4) values [j0, j0 + N) of a packed row held in shared memory; j0 % N == 0, and
// the N values never straddle a block or turbo group (N divides 32 and the group sizes).
template <int N>
__device__ __forceinline__ void decode_n(const DeviceSide& s, const float* cb, const float2* pairs, const uint8_t* row,
                                         int j0, float (&out)[N]) {
  if (s.family == static_cast<int>(Family::kFloat)) {  // rows of 2 * dp bytes, dp % 16 == 0: aligned
    const uint32_t* w = reinterpret_cast<const uint32_t*>(row + 2 * j0);
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const uint32_t x = w[k];
      if (s.fmt == kFmt_bf16) {
        out[2 * k] = __uint_as_float(x << 16);
        out[2 * k + 1] = __uint_as_float(x & 0xffff0000u);
      } else {
        const __half2 h = *reinterpret_cast<const __half2*>(&x);
        const float2 f = __half22float2(h);
        out[2 * k] = f.x;
        out[2 * k + 1] = f.y;
      }
    }
    return;
  }
  if (s.family == static_cast<int>(Family::kTurbo)) {
    // Groups are 64 or 128 values: shifts, not divisions. Two values per lookup in `pairs`
    // (pairs[a | b << bits] = (c[a], c[b])), one byte of low bits (+ 4 high bits) per 4 values.
    const int gshift = s.g == 128 ? 7 : 6;
    const uint8_t* blk = row + (j0 >> gshift) * s.group_bytes;
    const int w = j0 & (s.g - 1);
    const float scale = __half2float(__ushort_as_half(static_cast<uint16_t>(blk[0] | (blk[1] << 8))));
    const uint8_t* idx = blk + 2;
    static_assert(N == 2 || N == 4, "decode_n: 2 or 4 values");
    uint32_t p[2];  // pair indices
    if (s.bits == 4) {
      p[0] = idx[w >> 1];
      p[1] = N == 4 ? idx[(w >> 1) + 1] : 0u;
    } else {
      const uint32_t lo = idx[w >> 2] >> (2 * (w & 3));
      if (s.bits == 2) {
        p[0] = lo & 15u;
        p[1] = (lo >> 4) & 15u;
      } else {
        const uint32_t hi = idx[(s.g >> 2) + (w >> 3)] >> (w & 7);
        // value k: (lo >> 2k) & 3 | ((hi >> k) & 1) << 2; a pair is a | b << 3
        p[0] = (lo & 3u) | ((hi & 1u) << 2) | (((lo >> 2) & 3u) << 3) | (((hi >> 1) & 1u) << 5);
        p[1] = ((lo >> 4) & 3u) | (((hi >> 2) & 1u) << 2) | (((lo >> 6) & 3u) << 3) | (((hi >> 3) & 1u) << 5);
      }
    }
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const float2 c = pairs[p[k]];
      out[2 * k] = scale * c.x;
      out[2 * k + 1] = scale * c.y;
    }
    return;
  }
  const uint8_t* blk = row + (j0 / 32) * s.group_bytes;
  const int w = j0 % 32;
  const float d = __half2float(__ushort_as_half(static_cast<uint16_t>(blk[0] | (blk[1] << 8))));
  if (s.fmt == kFmt_q8_0) {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<float>(static_cast<int8_t>(blk[2 + w + k])) * d;
    return;
  }
  if (s.fmt == kFmt_q4_0) {
    const int shift = w < 16 ? 0 : 4;
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = d * static_cast<float>(((blk[2 + w % 16 + k] >> shift) & 15) - 8);
    return;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = decode_at(s, cb, row, j0 + k);
}

// The two sides' codebooks (16 floats each) and, unless pk is null, turbo pair tables (256
// float2 each: (c[a], c[b]) at a | b << bits) in shared memory, for decode_n; the caller
// synchronises before use.
__device__ __forceinline__ void load_codebooks(const DeviceSide& ks, const DeviceSide& vs, float* cbk, float* cbv,
                                               float2* pk = nullptr, float2* pv = nullptr) {
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < 16) {
    cbk[tid] = ks.cb[tid];
    cbv[tid] = vs.cb[tid];
  }
  if (!pk) return;
  const bool tk = ks.family == static_cast<int>(Family::kTurbo), tv = vs.family == static_cast<int>(Family::kTurbo);
  for (int i = tid; i < 256; i += blockDim.x) {  // turbo codebooks have at most 16 entries
    const int nk = tk ? 1 << ks.bits : 1, nv = tv ? 1 << vs.bits : 1;
    pk[i] = make_float2(ks.cb[i & (nk - 1)], ks.cb[(i >> (tk ? ks.bits : 0)) & (nk - 1)]);
    pv[i] = make_float2(vs.cb[i & (nv - 1)], vs.cb[(i >> (tv ? vs.bits : 0)) & (nv - 1)]);
  }
}

// Shared memory of one block: kMmaStages chunk buffers per warp (K then V bytes, each with
// 32 bytes of slack for the 16-byte alignment of cp.async), reused by the final merge.
struct MmaLayout {
  int tk, kbuf, vbuf, stage;
  __host__ __device__ MmaLayout(int nt, int krb, int vrb)
      : tk(16 * nt), kbuf((16 * nt * krb + 47) / 16 * 16), vbuf((16 * nt * vrb + 47) / 16 * 16), stage(kbuf + vbuf) {}
};

// Byte offset of the rotated queries (8 x dp floats), codebooks (32 floats) and the turbo
// pair tables (2 x 256 float2).
__host__ __device__ inline size_t mma_q_offset(const MmaLayout& L, int dp) {
  const size_t stages = static_cast<size_t>(4) * kMmaStages * L.stage;
  const size_t merge = sizeof(float) * 4 * 8 * (dp + 2);
  return stages > merge ? stages : merge;
}
inline size_t mma_smem_bytes(const MmaLayout& L, int dp) {
  return mma_q_offset(L, dp) + sizeof(float) * (8 * dp + 32) + sizeof(float2) * 2 * 256;
}

// Where row t0 of `src` lands in a chunk buffer: copies start at the 16-byte boundary at or
// before it (the cache tensor itself is 16-byte aligned, so this stays inside its allocation).
__device__ __forceinline__ int stage_offset(const uint8_t* src, int row_bytes, int64_t t0) {
  return static_cast<int>(reinterpret_cast<uintptr_t>(src + t0 * row_bytes) & 15u);
}

// Copies rows [t0, t1) of `src` (row_bytes each) into `dst`, 16 bytes per cp.async, by `step`
// threads (a warp, or a block), this one the `at`-th.
__device__ __forceinline__ void stage_rows(uint8_t* dst, const uint8_t* src, int row_bytes, int64_t t0, int64_t t1,
                                           int at, int step = 32) {
  const int off = stage_offset(src, row_bytes, t0);
  const uint8_t* a16 = src + t0 * row_bytes - off;
  const int n16 = (off + static_cast<int>(t1 - t0) * row_bytes + 15) / 16;
  for (int i = at; i < n16; i += step) cp_async16(dst + 16 * i, a16 + 16 * i);
}

// ---- pieces shared by the tensor-core decode kernels (this one and attention_templated.cuh) ----

// The chunk's queries (RowChunk) as 8 rows of DP floats in shared memory (zero-padded rows and
// dims), rotated with the K side's rotation, in two steps: fetch() issues the global loads,
// into registers where a warp holds whole rows (and those of the rotation's signs), finish()
// rotates the rows into qs and synchronises the block. A kernel fetches before it issues its
// first key chunks and finishes after: loads issued behind a whole grid's prefetch wait for
// it, and a short decode call then spends much of its time in the query prologue.
template <int DP>
struct QueryRows {
  static constexpr int E = DP / 32;
  // One warp per query row, rotated in registers (warp_rotate.cuh): no block barrier per
  // butterfly stage in the prologue of every split. Rows of 96: the block rotates them in
  // shared memory.
  static constexpr bool kInWarp = DP % 32 == 0 && (E & (E - 1)) == 0;
  static constexpr int kRows = 8 / (kThreads / 32);  // rows per warp
  float v[kRows][kInWarp ? E : 1];
  // The rotation's sign words, loaded by fetch and used by finish (lane_sign_words): built in
  // fetch, the rotation kept the warp waiting on a cold constant cache before it requested
  // its first keys.
  LaneSignWords signs;

  // Value j of the chunk's row n (RowChunk); zeros past its rows and the head dim.
  __device__ static float load(const void* q, int q_bf16, const AttnParams& P, int64_t b, int64_t h, int n, int j) {
    const RowChunk rows(P);
    if (n >= rows.count || j >= P.d) return 0.0f;
    const int64_t at = rows.out_row(P, b, h, n) * P.d + j;
    return q_bf16 ? to_float(static_cast<const __nv_bfloat16*>(q)[at]) : to_float(static_cast<const __half*>(q)[at]);
  }
  __device__ void fetch(const void* q, int q_bf16, const AttnParams& P, int64_t b, int64_t h, const DeviceSide& ks) {
    if constexpr (kInWarp) {
      const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x / 32);
      signs = lane_sign_words<E>(ks, false);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int e = 0; e < E; ++e) v[r][e] = load(q, q_bf16, P, b, h, warp + r * (kThreads / 32), lane * E + e);
    }
  }
  __device__ void finish(float* qs, const void* q, int q_bf16, const AttnParams& P, int64_t b, int64_t h,
                         const DeviceSide& ks) {
    if constexpr (kInWarp) {
      const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x / 32);
      const LaneRotation<float> rotation = lane_rotation<E>(ks, signs, false);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        warp_rotate<E>(v[r], rotation);
        const int g = warp + r * (kThreads / 32);
#pragma unroll
        for (int e = 0; e < E; ++e) qs[g * DP + lane * E + e] = v[r][e];
      }
      __syncthreads();
    } else {
      for (int idx = threadIdx.x; idx < 8 * DP; idx += blockDim.x)
        qs[idx] = load(q, q_bf16, P, b, h, idx / DP, idx % DP);
      __syncthreads();
      if (ks.rot_group) rotate_side<float>(qs, 8 * DP, ks, false);
    }
  }
};

// Q^T (scaled) as B fragments: k-step s takes this lane's values 4s..4s+3 (slots 2tg, 2tg+1,
// 2tg+8, 2tg+9) of head gr; dim(i) = the dim of the lane's value i in the K fragments.
// weight(i): a factor of value i's slot (a power of two; 1 but for q4_0's block scores).
template <int DP, int KS, class Dim, class Weight>
__device__ __forceinline__ void query_fragments(uint32_t (&qf)[KS][2], const float* qs, int gr, float scale, Dim dim,
                                                Weight weight) {
  const float* qr = qs + gr * DP;
  const auto at = [&](int i) { return qr[dim(i)] * scale * weight(i); };
#pragma unroll
  for (int s = 0; s < KS; ++s) {
    qf[s][0] = pack_half2(at(4 * s), at(4 * s + 1));
    qf[s][1] = pack_half2(at(4 * s + 2), at(4 * s + 3));
  }
}
template <int DP, int KS, class Dim>
__device__ __forceinline__ void query_fragments(uint32_t (&qf)[KS][2], const float* qs, int gr, float scale, Dim dim) {
  query_fragments<DP, KS>(qf, qs, gr, scale, dim, [](int) { return 1.0f; });
}

// Softcap and the end-of-chunk mask on the scores of tile j (rows r0 = 16j + gr, r0 + 8).
template <int NT>
__device__ __forceinline__ void mask_scores(float (&sc)[NT][4], int j, int r0, int nvalid, float softcap) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float v = sc[j][c];
    if (softcap > 0.0f) v = softcap * tanhf(v / softcap);
    sc[j][c] = (c < 2 ? r0 : r0 + 8) < nvalid ? v : -INFINITY;
  }
}

// The per-row mask of tile j where a chunk of keys is seen by some rows only (RowChunk::
// partly_seen): this lane's scores are keys r0 / r0 + 8 (c < 2 / else) of the chunk starting at
// t0, for rows 2tg + (c & 1). (The query positions are worked out here, off the hot loop's
// registers: the format-specialised kernels have none to spare.)
template <int NT>
__device__ __forceinline__ void mask_rows(float (&sc)[NT][4], int j, int r0, int64_t t0, const RowChunk& rows,
                                          int64_t len, int tg, const AttnParams& P) {
  const int64_t qpos[2] = {rows.qpos(P, len, 2 * tg), rows.qpos(P, len, 2 * tg + 1)};
#pragma unroll
  for (int c = 0; c < 4; ++c)
    if (!sees(P, qpos[c & 1], t0 + (c < 2 ? r0 : r0 + 8))) sc[j][c] = -INFINITY;
}

// Online softmax of one chunk per head column (2tg + c; the 8 lanes of a column differ in gr):
// scores become probabilities, (m, l) move on, and the output accumulators are rescaled.
template <int NT, int KS>
__device__ __forceinline__ void chunk_softmax(float (&sc)[NT][4], float (&m)[2], float (&l)[2], float (&o)[KS][4]) {
  float alpha[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; ++j) mx = nan_max(mx, nan_max(sc[j][c], sc[j][c + 2]));
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float mn = nan_max(m[c], mx);  // NaN from here on: the row's output is NaN
    alpha[c] = mn == -INFINITY ? 1.0f : __expf(m[c] - mn);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float p0 = mn == -INFINITY ? 0.0f : __expf(sc[j][c] - mn);
      const float p1 = mn == -INFINITY ? 0.0f : __expf(sc[j][c + 2] - mn);
      sc[j][c] = p0;
      sc[j][c + 2] = p1;
      sum += p0 + p1;
    }
    l[c] = l[c] * alpha[c] + sum;
    m[c] = mn;
  }
  // Once the running maxima settle, most chunks leave them unchanged (alpha = exp(0) = 1
  // exactly): the warp skips the rescale of its KS x 4 accumulators then.
  if (__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) return;
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) {
    o[mt][0] *= alpha[0];
    o[mt][1] *= alpha[1];
    o[mt][2] *= alpha[0];
    o[mt][3] *= alpha[1];
  }
}

// P^T as B fragments of one tile: this lane needs keys 2tg, 2tg+1, 2tg+8, 2tg+9 of head gr,
// which lanes 8tg + gr/2 (+4) hold as the (gr & 1) half of their packed head pairs.
__device__ __forceinline__ void p_fragments(const float (&p)[4], int gr, int tg, uint32_t& p0, uint32_t& p1) {
  const uint32_t x0 = pack_half2(p[0], p[1]), x1 = pack_half2(p[2], p[3]);
  const int src = 8 * tg + (gr >> 1);
  const uint32_t a = __shfl_sync(0xffffffffu, x0, src), b = __shfl_sync(0xffffffffu, x0, src + 4);
  const uint32_t c = __shfl_sync(0xffffffffu, x1, src), d = __shfl_sync(0xffffffffu, x1, src + 4);
  const uint32_t sel = (gr & 1) ? 0x7632u : 0x5410u;
  p0 = __byte_perm(a, b, sel);
  p1 = __byte_perm(c, d, sel);
}

// End of a decode block: each warp's (o, m, l) into shared memory (`smem`, 4 x 8 x (DP + 2)
// floats; dim(mt, 0 / 1) = the output dims of this lane's m-tile rows gr / gr + 8), then the
// 4 warps merged into this split's partial rows of part_o / part_ml. Starts with a barrier.
template <int DP, int KS, class Dim>
__device__ void write_partials(const float (&o)[KS][4], const float (&m)[2], float (&l)[2], Dim dim, uint8_t* smem,
                               const AttnParams& P, int64_t b, int64_t h, int split, float* part_o, float* part_ml) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gr = lane >> 2, tg = lane & 3;
  const RowChunk rows(P);
  // Per-lane sums cover this lane's keys only: add the column's 8 lanes.
#pragma unroll
  for (int c = 0; c < 2; ++c)
    for (int off = 4; off < 32; off <<= 1) l[c] += __shfl_xor_sync(0xffffffffu, l[c], off);
  __syncthreads();  // the stage buffers become the merge buffer
  float* red = reinterpret_cast<float*>(smem);
  float* mw = red + warp * 8 * (DP + 2);
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) {
    const int d0 = dim(mt, 0), d1 = dim(mt, 1);
    mw[(2 * tg) * (DP + 2) + d0] = o[mt][0];
    mw[(2 * tg + 1) * (DP + 2) + d0] = o[mt][1];
    mw[(2 * tg) * (DP + 2) + d1] = o[mt][2];
    mw[(2 * tg + 1) * (DP + 2) + d1] = o[mt][3];
  }
  if (gr == 0) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      mw[(2 * tg + c) * (DP + 2) + DP] = m[c];
      mw[(2 * tg + c) * (DP + 2) + DP + 1] = l[c];
    }
  }
  __syncthreads();
  const int64_t rows_total = P.B * P.Hq * P.Sq;
  for (int idx = tid; idx < rows.count * DP; idx += blockDim.x) {
    const int g = idx / DP, j = idx % DP;
    float mx = -INFINITY;
    for (int w = 0; w < 4; ++w) mx = fmaxf(mx, red[(w * 8 + g) * (DP + 2) + DP]);
    float acc = 0.0f, sum = 0.0f;
    for (int w = 0; w < 4; ++w) {
      const float* r = red + (w * 8 + g) * (DP + 2);
      if (r[DP + 1] == 0.0f) continue;  // saw no key (a NaN sum, from a NaN score, does count)
      const float a = __expf(r[DP] - mx);
      acc += r[j] * a;
      sum += r[DP + 1] * a;
    }
    const int64_t row = rows.out_row(P, b, h, g);
    part_o[(split * rows_total + row) * DP + j] = acc;
    if (j == 0) {
      part_ml[(split * rows_total + row) * 2] = mx;
      part_ml[(split * rows_total + row) * 2 + 1] = sum;
    }
  }
}

// kMulti: as in attention_templated.cuh (the per-row masking of several query positions).
template <int NT, int DP, bool kMulti>
__global__ void __launch_bounds__(kThreads)
    decode_mma_kernel(const void* __restrict__ q, int q_bf16, const uint8_t* __restrict__ kc,
                      const uint8_t* __restrict__ vc, DeviceSide ks, DeviceSide vs, AttnParams P,
                      float* __restrict__ part_o, float* __restrict__ part_ml) {
  launch_dependents();         // the merge kernel may take SMs as this grid frees them
  constexpr int KS = DP / 16;  // k-steps of the QK product = m-tiles of the PV product
  constexpr int E = DP / 4;    // K dims per lane and key
  constexpr int F = DP / 8;    // V dims per lane and key
  extern __shared__ __align__(16) uint8_t smem[];
  const MmaLayout L(NT, ks.row_bytes, vs.row_bytes);
  float* qs = reinterpret_cast<float*>(smem + mma_q_offset(L, DP));
  float* cbk = qs + 8 * DP;
  float* cbv = cbk + 16;
  float2* pk = reinterpret_cast<float2*>(cbv + 16);  // (c[a], c[b]) at a | b << bits, K side
  float2* pv = pk + 256;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gr = lane >> 2, tg = lane & 3;
  const int split = blockIdx.x;
  const int64_t bh = blockIdx.y, b = bh / P.Hkv, h = bh % P.Hkv;
  load_codebooks(ks, vs, cbk, cbv, pk, pv);
  const int64_t len = min(max(P.lengths[b], int64_t(0)), P.T);
  const int64_t start = P.starts ? min(max(P.starts[b], int64_t(0)), len) : 0;
  QueryRows<DP> queries;
  queries.fetch(q, q_bf16, P, b, h, ks);
  queries.finish(qs, q, q_bf16, P, b, h, ks);
  uint32_t qf[KS][2];  // k-step s, this lane's slots 2tg..+1 / 2tg+8..+9 -> dims E*tg + 4s + 0..3
  query_fragments<DP, KS>(qf, qs, gr, P.scale, [&](int i) { return E * tg + i; });

  const RowChunk rows(P);
  int64_t lo, hi;
  rows.key_range(P, start, len, lo, hi);
  const int64_t s_lo = lo + split * P.span, s_hi = min(hi, s_lo + P.span);
  const int64_t base = bh * P.T;
  const uint8_t* krows = kc + base * ks.row_bytes;
  const uint8_t* vrows = vc + base * vs.row_bytes;
  uint8_t* my = smem + static_cast<size_t>(warp) * kMmaStages * L.stage;
  const int nchunks = s_hi > s_lo ? static_cast<int>((s_hi - s_lo + L.tk - 1) / L.tk) : 0;
  // This warp's chunks: warp, warp + 4, ... (interleaved so short spans keep all warps busy).
  const int mine = nchunks > warp ? (nchunks - warp + 3) / 4 : 0;
  auto issue = [&](int i) {
    if (i < mine) {
      const int64_t t0 = s_lo + static_cast<int64_t>(warp + 4 * i) * L.tk, t1 = min(s_hi, t0 + L.tk);
      uint8_t* st = my + (i % kMmaStages) * L.stage;
      stage_rows(st, krows, ks.row_bytes, t0, t1, lane);
      stage_rows(st + L.kbuf, vrows, vs.row_bytes, t0, t1, lane);
    }
    cp_async_commit();  // an empty group when nothing was issued keeps the wait counts uniform
  };
#pragma unroll
  for (int i = 0; i < kMmaStages - 1; ++i) issue(i);

  float o[KS][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < KS; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  for (int i = 0; i < mine; ++i) {
    issue(i + kMmaStages - 1);
    cp_async_wait<kMmaStages - 1>();
    __syncwarp();
    const int64_t t0 = s_lo + static_cast<int64_t>(warp + 4 * i) * L.tk;
    const uint8_t* st = my + (i % kMmaStages) * L.stage;
    const uint8_t* kt = st + stage_offset(krows, ks.row_bytes, t0);
    const uint8_t* vt = st + L.kbuf + stage_offset(vrows, vs.row_bytes, t0);
    const int nvalid = static_cast<int>(min(static_cast<int64_t>(L.tk), s_hi - t0));
    const bool partly = kMulti && rows.partly_seen(P, len, t0, t0 + nvalid);

    // Scores: S^T rows gr and gr + 8 of each 16-key tile, query rows 2tg and 2tg + 1.
    float sc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
      const int r0 = 16 * j + gr, r1 = r0 + 8;
      const uint8_t* k0 = kt + min(r0, nvalid - 1) * ks.row_bytes;  // rows past the end: any valid row, masked below
      const uint8_t* k1 = kt + min(r1, nvalid - 1) * ks.row_bytes;
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        float x0[4], x1[4];
        decode_n<4>(ks, cbk, pk, k0, E * tg + 4 * s, x0);
        decode_n<4>(ks, cbk, pk, k1, E * tg + 4 * s, x1);
        mma_16816(sc[j], pack_half2(x0[0], x0[1]), pack_half2(x1[0], x1[1]), pack_half2(x0[2], x0[3]),
                  pack_half2(x1[2], x1[3]), qf[s][0], qf[s][1]);
      }
      mask_scores<NT>(sc, j, r0, nvalid, P.softcap);
      if (partly) mask_rows<NT>(sc, j, r0, t0, rows, len, tg, P);
    }
    chunk_softmax<NT, KS>(sc, m, l, o);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint32_t p0, p1;
      p_fragments(sc[j], gr, tg, p0, p1);
      // V rows of keys 2tg, 2tg+1, 2tg+8, 2tg+9; rows past the end read as zeros (p is 0
      // there, but 0 * NaN garbage would not be).
      const int rk[4] = {16 * j + 2 * tg, 16 * j + 2 * tg + 1, 16 * j + 2 * tg + 8, 16 * j + 2 * tg + 9};
#pragma unroll
      for (int mt2 = 0; mt2 < KS / 2; ++mt2) {  // two m-tiles at a time: 4 dims per key
        float v[4][4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (rk[k] < nvalid) {
            decode_n<4>(vs, cbv, pv, vt + rk[k] * vs.row_bytes, F * gr + 4 * mt2, v[k]);
          } else {
            v[k][0] = v[k][1] = v[k][2] = v[k][3] = 0.0f;
          }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {  // m-tile 2 * mt2 + u: dims F*gr + 2*mt + 0 / 1
          const int e = 2 * u;
          mma_16816(o[2 * mt2 + u], pack_half2(v[0][e], v[1][e]), pack_half2(v[0][e + 1], v[1][e + 1]),
                    pack_half2(v[2][e], v[3][e]), pack_half2(v[2][e + 1], v[3][e + 1]), p0, p1);
        }
      }
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();

  // Output dims of m-tile mt: F*gr + 2mt (row gr) and + 1 (row gr + 8).
  write_partials<DP, KS>(
      o, m, l, [&](int mt, int half) { return F * gr + 2 * mt + half; }, smem, P, b, h, split, part_o, part_ml);
}

using MmaKernel = void (*)(const void*, int, const uint8_t*, const uint8_t*, DeviceSide, DeviceSide, AttnParams, float*,
                           float*);

// The kernel for rows of DP values, nt tiles per chunk, several queries per sequence (multi)
// or one; one .cu file per DP so the instantiations build in parallel (attention_mma<DP>.cu).
template <int DP>
MmaKernel mma_kernel(int nt, bool multi);
template <>
MmaKernel mma_kernel<64>(int nt, bool multi);
template <>
MmaKernel mma_kernel<96>(int nt, bool multi);
template <>
MmaKernel mma_kernel<128>(int nt, bool multi);
template <>
MmaKernel mma_kernel<256>(int nt, bool multi);

template <int DP>
MmaKernel mma_table(int nt, bool multi) {
  if (multi) return nt == 2 ? decode_mma_kernel<2, DP, true> : decode_mma_kernel<1, DP, true>;
  return nt == 2 ? decode_mma_kernel<2, DP, false> : decode_mma_kernel<1, DP, false>;
}

}  // namespace turbokv::cuda
