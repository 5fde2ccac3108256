// Several queries per sequence on tensor cores, FlashAttention-2 style (attention.cu: Path::kFlash):
// speculative decoding, chunked prefill, a chat's next turn, left-padded batches.
//
// A block holds 64 (query, head) rows of one KV head's group (RowChunkOf<64>: with GQA the
// group's heads x consecutive queries), 16 per warp as the M of mma.m16n8k16, and streams its
// keys in tiles of BN. Each tile's packed K and V rows are copied into shared memory (cp.async,
// two buffers: the next tile's bytes are in flight while this one is worked on), decoded once by
// the whole block into f16 rows, and read by every warp through ldmatrix:
//   S (16 rows x BN keys)  = Q (16 x DP) . K^T     Q rotated (K side) and scaled in the prologue
//   O (16 rows x DP)      += P (16 x BN) . V       V stays rotated: the merge un-rotates O once
// with the online softmax in registers and the scores' accumulators reused as P's A fragments.
// The templated / mma kernels (keys as M, 8 rows as N) decode every key once per 8 rows; this one once
// per 64, so it wins from a few dozen rows on (attention.cu: kFlashMinRows). Partial rows go to
// the same split-K workspace, so merge_kernel finishes the job (sink_logits, inverse rotation).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16): lane = 4 * gr + tg.
//   A (16x16): {row gr, cols 2tg..+1}, {row gr+8, same}, {row gr, cols 2tg+8..+9}, {row gr+8, same}
//   B (16x8):  {rows 2tg..+1, col gr}, {rows 2tg+8..+9, col gr}
//   C (16x8):  {row gr, cols 2tg..+1}, {row gr+8, cols 2tg..+1}
// ldmatrix.x4 gives lane (gr, tg) row gr, cols 2tg..+1 of four 8x8 matrices whose rows lanes
// 0-7, 8-15, 16-23, 24-31 address (.trans: col gr, rows 2tg..+1): Q as A from (rows, dims), K as
// B from (keys, dims), V as B from (keys, dims) transposed.
#pragma once

#include "attention_mma.cuh"
#include "decode_span.cuh"

namespace turbokv::cuda {

constexpr int kFlashRows = 64;  // 4 warps x 16 rows

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Shared memory of one block: the f16 query rows, the decoded K and V tiles (rows of DP + 8
// halves: 16 bytes of pad put the 8 rows of an ldmatrix on distinct banks), the two codebooks,
// then two buffers of packed K and V rows.
template <int DP, int BN>
struct FlashLayout {
  static constexpr int kStride = DP + 8;
  static constexpr int kQBytes = kFlashRows * kStride * 2, kTileBytes = BN * kStride * 2;
  static constexpr int kTables = 32 * 4;
  static constexpr int kStageAt = kQBytes + 2 * kTileBytes + kTables;
  static_assert(kStageAt % 16 == 0, "cp.async buffers are 16-byte aligned");
  // One side's packed rows: from the 16-byte boundary at or before the first, 16 bytes of slack.
  __host__ __device__ static int stage_bytes(int row_bytes) { return (BN * row_bytes + 47) / 16 * 16; }
  __host__ __device__ static int smem(int krb, int vrb) { return kStageAt + 2 * (stage_bytes(krb) + stage_bytes(vrb)); }
};

// Rows [0, nvalid) of a staged tile of packed rows into f16 rows of dst (stride DP + 8), by the
// whole block, 8 values a thread at a time (chunk(row, j0) -> one 16-byte store); rows from
// nvalid on are zeros (the tile's end: a V row there meets probability 0, and 0 times stale
// bytes might be NaN).
template <int DP, int BN, class Chunk>
__device__ __forceinline__ void tile_rows(const uint8_t* rows, int row_bytes, int nvalid, __half* dst, Chunk&& chunk) {
  constexpr int kChunks = DP / 8;
#pragma unroll 2
  for (int idx = static_cast<int>(threadIdx.x); idx < BN * kChunks; idx += kThreads) {
    const int r = idx / kChunks, j0 = 8 * (idx % kChunks);
    *reinterpret_cast<uint4*>(dst + r * (DP + 8) + j0) = r < nvalid ? chunk(rows + r * row_bytes, j0) : uint4{};
  }
}

// One side's staged tile into f16 rows: f16 rows copied, q8_0 / q4_0 in f16 arithmetic, the
// other formats through decode_span's fp32 values.
template <int DP, int BN>
__device__ __forceinline__ void decode_tile(const DeviceSide& s, const float* cb, const uint8_t* rows, int nvalid,
                                            __half* dst) {
  const int rb = s.row_bytes;
  if (s.fmt == kFmt_f16) {
    tile_rows<DP, BN>(rows, rb, nvalid, dst, [](const uint8_t* row, int j0) {
      return *reinterpret_cast<const uint4*>(row + 2 * j0);  // rows of 2 DP bytes, 16-byte aligned
    });
  } else if (s.fmt == kFmt_q4_0) {
    tile_rows<DP, BN>(rows, rb, nvalid, dst, [](const uint8_t* row, int j0) {
      return span::block8_f16<kFmt_q4_0>(row + j0 / 32 * 18, j0 % 32);
    });
  } else if (s.fmt == kFmt_q8_0) {
    tile_rows<DP, BN>(rows, rb, nvalid, dst, [](const uint8_t* row, int j0) {
      return span::block8_f16<kFmt_q8_0>(row + j0 / 32 * 34, j0 % 32);
    });
  } else {
    tile_rows<DP, BN>(rows, rb, nvalid, dst, [&](const uint8_t* row, int j0) {
      float x[8];
      decode_span<8, /*kGlobal=*/false>(s, cb, row, j0, x);
      return make_uint4(pack_half2(x[0], x[1]), pack_half2(x[2], x[3]), pack_half2(x[4], x[5]), pack_half2(x[6], x[7]));
    });
  }
}

template <int DP, int BN>
__global__ void __launch_bounds__(kThreads, 2)
    flash_kernel(const void* __restrict__ q, int q_bf16, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                 DeviceSide ks, DeviceSide vs, AttnParams P, float* __restrict__ part_o, float* __restrict__ part_ml) {
  using L = FlashLayout<DP, BN>;
  constexpr int KS = DP / 16, NS = BN / 8, ND = DP / 8, E = DP / 32, S = L::kStride;
  static_assert(KS % 2 == 0 && BN % 16 == 0 && (E & (E - 1)) == 0, "k-steps in pairs, key tiles of 16");
  launch_dependents();  // the merge kernel may take SMs as this grid frees them
  extern __shared__ __align__(16) uint8_t smem[];
  __half* qh = reinterpret_cast<__half*>(smem);
  __half* kd = reinterpret_cast<__half*>(smem + L::kQBytes);
  __half* vd = reinterpret_cast<__half*>(smem + L::kQBytes + L::kTileBytes);
  float* cbk = reinterpret_cast<float*>(smem + L::kQBytes + 2 * L::kTileBytes);
  float* cbv = cbk + 16;
  uint8_t* stage = smem + L::kStageAt;
  const int kbuf = L::stage_bytes(ks.row_bytes), vbuf = L::stage_bytes(vs.row_bytes);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gr = lane >> 2, tg = lane & 3;
  const int split = blockIdx.x;
  const int64_t bh = blockIdx.y, b = bh / P.Hkv, h = bh % P.Hkv;
  load_codebooks(ks, vs, cbk, cbv);

  // Lengths are validated on the host outside graph capture; clamped so nothing reads out of bounds.
  const int64_t len = min(max(P.lengths[b], int64_t(0)), P.T);
  const int64_t start = P.starts ? min(max(P.starts[b], int64_t(0)), len) : 0;
  const RowChunkOf<kFlashRows> rows(P);
  int64_t lo, hi;
  rows.key_range(P, start, len, lo, hi);
  const int64_t s_lo = lo + split * P.span, s_hi = min(hi, s_lo + P.span);
  const int ntiles = s_hi > s_lo ? static_cast<int>((s_hi - s_lo + BN - 1) / BN) : 0;
  const int64_t base = bh * P.T;
  const uint8_t* krows = kc + base * ks.row_bytes;
  const uint8_t* vrows = vc + base * vs.row_bytes;
  const auto issue = [&](int i) {
    if (i < ntiles) {
      const int64_t t0 = s_lo + static_cast<int64_t>(i) * BN, t1 = min(s_hi, t0 + BN);
      uint8_t* st = stage + (i & 1) * (kbuf + vbuf);
      stage_rows(st, krows, ks.row_bytes, t0, t1, tid, kThreads);
      stage_rows(st + kbuf, vrows, vs.row_bytes, t0, t1, tid, kThreads);
    }
    cp_async_commit();
  };
  issue(0);

  // Prologue (while the first tile is in flight): each warp rotates its 16 query rows with the K
  // side's rotation in registers, scales them and stores them as f16. Rows past the chunk's
  // count repeat its last row (RowChunkOf); their results are not written.
  {
    const LaneRotation<float> rot = lane_rotation<E>(ks, false);
    for (int r = 0; r < 16; ++r) {
      const int n = warp * 16 + r;
      const int64_t at = rows.out_row(P, b, h, n) * P.d;
      float v[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int j = lane * E + e;
        v[e] = j >= P.d ? 0.0f
               : q_bf16 ? to_float(static_cast<const __nv_bfloat16*>(q)[at + j])
                        : to_float(static_cast<const __half*>(q)[at + j]);
      }
      warp_rotate<E>(v, rot);
#pragma unroll
      for (int e = 0; e < E; ++e) qh[n * S + lane * E + e] = __float2half_rn(v[e] * P.scale);
    }
  }
  // This lane's two rows (C fragments: gr and gr + 8 of the warp's 16) and their query positions.
  const int row_a = warp * 16 + gr;
  const int64_t qpos[2] = {rows.qpos(P, len, row_a), rows.qpos(P, len, row_a + 8)};
  // ldmatrix addresses: Q rows (lane & 7) + 8 ((lane >> 3) & 1), dims 8 (lane >> 4) of k-step 0;
  // K keys (lane & 7), dims 8 (lane >> 3) of n-tile 0 and k-steps 0, 1; V keys as Q's rows, dims
  // as Q's, of key step 0 and n-tiles 0, 1.
  const uint32_t sh = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t q_at = sh + 2 * ((warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * S + 8 * (lane >> 4));
  const uint32_t k_at = sh + L::kQBytes + 2 * ((lane & 7) * S + 8 * (lane >> 3));
  const uint32_t v_at =
      sh + L::kQBytes + L::kTileBytes + 2 * (((lane & 7) + 8 * ((lane >> 3) & 1)) * S + 8 * (lane >> 4));

  float o[ND][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < ND; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

  for (int i = 0; i < ntiles; ++i) {
    cp_async_wait<0>();
    __syncthreads();  // tile i's bytes are in for every thread, and every warp is done with tile i - 1
    issue(i + 1);
    const int64_t t0 = s_lo + static_cast<int64_t>(i) * BN;
    const int nvalid = static_cast<int>(min(static_cast<int64_t>(BN), s_hi - t0));
    const uint8_t* st = stage + (i & 1) * (kbuf + vbuf);
    decode_tile<DP, BN>(ks, cbk, st + stage_offset(krows, ks.row_bytes, t0), nvalid, kd);
    decode_tile<DP, BN>(vs, cbv, st + kbuf + stage_offset(vrows, vs.row_bytes, t0), nvalid, vd);
    __syncthreads();

    float sc[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
    for (int s = 0; s < KS; s += 2) {
      uint32_t qa[4], qb[4];
      ldmatrix_x4(qa, q_at + 32 * s);
      ldmatrix_x4(qb, q_at + 32 * (s + 1));
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_at + 2 * (8 * n * S + 16 * s));
        mma_16816(sc[n], qa[0], qa[1], qa[2], qa[3], kb[0], kb[1]);
        mma_16816(sc[n], qb[0], qb[1], qb[2], qb[3], kb[2], kb[3]);
      }
    }
    // Softcap, then the mask where the tile ends early or the causal diagonal / window edge
    // crosses it: score c of n-tile n is key t0 + 8n + 2tg + (c & 1) of row gr (c < 2) or gr + 8.
    const bool edge = nvalid < BN || rows.partly_seen(P, len, t0, t0 + nvalid);
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float v = sc[n][c];
        if (P.softcap > 0.0f) v = P.softcap * tanhf(v / P.softcap);
        if (edge) {
          const int t = 8 * n + 2 * tg + (c & 1);
          if (t >= nvalid || !sees(P, qpos[c >> 1], t0 + t)) v = -INFINITY;
        }
        sc[n][c] = v;
      }
    // Online softmax per row (its 4 lanes tg hold its scores); NaN spreads to the row's output.
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < NS; ++n) mx = nan_max(mx, nan_max(sc[n][2 * r], sc[n][2 * r + 1]));
      mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = nan_max(m[r], mx);
      alpha[r] = mn == -INFINITY ? 1.0f : __expf(m[r] - mn);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = mn == -INFINITY ? 0.0f : __expf(sc[n][2 * r + e] - mn);
          sc[n][2 * r + e] = p;
          sum += p;
        }
      l[r] = l[r] * alpha[r] + sum;
      m[r] = mn;
    }
#pragma unroll
    for (int n = 0; n < ND; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    // O += P V, 16 keys a k-step: P's A fragments are the scores' C fragments of n-tiles 2j, 2j + 1.
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      const uint32_t a0 = pack_half2(sc[2 * j][0], sc[2 * j][1]), a1 = pack_half2(sc[2 * j][2], sc[2 * j][3]);
      const uint32_t a2 = pack_half2(sc[2 * j + 1][0], sc[2 * j + 1][1]);
      const uint32_t a3 = pack_half2(sc[2 * j + 1][2], sc[2 * j + 1][3]);
#pragma unroll
      for (int n2 = 0; n2 < ND / 2; ++n2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_at + 2 * (16 * j * S + 16 * n2));
        mma_16816(o[2 * n2], a0, a1, a2, a3, vb[0], vb[1]);
        mma_16816(o[2 * n2 + 1], a0, a1, a2, a3, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();

  // This split's partial rows: unnormalised output, max and sum (the row's 4 lanes' sums added).
  // A row that saw no key here (max still -inf) writes zeros, as the merge expects: its products
  // took probability 0 times the V of keys other rows of the block see, NaN if one of them is.
  const int64_t rows_total = P.B * P.Hq * P.Sq;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if (row_a + 8 * r >= rows.count) continue;
    const int64_t row = split * rows_total + rows.out_row(P, b, h, row_a + 8 * r);
    float* po = part_o + row * DP + 2 * tg;
    const bool saw = m[r] != -INFINITY;  // NaN counts as seen: the row's output is NaN
#pragma unroll
    for (int n = 0; n < ND; ++n)
      *reinterpret_cast<float2*>(po + 8 * n) =
          saw ? make_float2(o[n][2 * r], o[n][2 * r + 1]) : make_float2(0.0f, 0.0f);
    if (tg == 0) {
      part_ml[row * 2] = m[r];
      part_ml[row * 2 + 1] = l[r];
    }
  }
}

// A flash kernel and its keys per tile: 64 where a tile of K and V rows takes at most 16 KiB
// and the rows are at most 128 values (the scores' and output's registers), else 32.
struct FlashKernel {
  MmaKernel fn = nullptr;
  int bn = 0, smem = 0;
};

template <int DP>
FlashKernel flash_entry(int krb, int vrb) {
  if constexpr (DP <= 128)
    if (64 * (krb + vrb) <= 16384) return {flash_kernel<DP, 64>, 64, FlashLayout<DP, 64>::smem(krb, vrb)};
  return {flash_kernel<DP, 32>, 32, FlashLayout<DP, 32>::smem(krb, vrb)};
}

// Built in attention_flash.cu for rows of 64, 128 and 256 values ({} for others).
FlashKernel flash_kernel_for(int dp, int krb, int vrb);

}  // namespace turbokv::cuda
