// Weight-only int4 / int8 GEMV and small-M GEMM for CPU decode rows (kvserve::q4_gemm,
// kvserve::q8_gemm), in the style of llama.cpp's Q4_1 x Q8 and Q8_0 x Q8 dot products.
//
// The activation rows are quantized inside the op per block of 32 to two int8 levels (a coarse
// one with scale amax / 127 and the rounding error on a 256 times finer scale, see
// QuantizedRows; plus the block's float sum for the int4 zero term); the dot products run on
// integers (AVX2: maddubs + madd; AVX-512 VNNI: dpbusd) and each block's int32 sum is scaled
// in float.
//
// Weight layout (made by kvserve/kernels/cpu/gemv.py): output rows in groups of 4, one record
// per group, read front to back (one linear stream per thread). The K inputs of a row are taken
// in pairs of 32-blocks (64 values); position p (0..63) of a pair holds value
// j = (p / 8) * 4 + p % 4 of block (p / 4) % 2 of the pair, so every 4-byte lane of a vector
// belongs to one block and the lanes alternate between the pair's two blocks: the two float
// scales, broadcast as one 64-bit value, scale a whole vector. The activations are permuted the
// same way when they are quantized.
//   int4: record = d [4][K / 32] float16, m [4][K / 32] float16, then for each pair, for each of
//         the 4 rows, 32 bytes: byte i holds position i in its low nibble and 32 + i in its
//         high nibble. w = d * q + m with q in 0..15 (a GGUF Q4_1 block as stored; Q4_0 has
//         m = -8 d).
//   int8: record = for each pair, for each of the 4 rows, 64 int8 values; w = s * q with one
//         float32 scale s per row (a separate [N] tensor).
//
// q4_gemm takes torch's copy of the weight as well (optional) and hands steps of more than
// fallback_above rows to torch's kernel, where this one is slower (gemv.py: int4_max_rows).
//
// The ISA is picked per call (isa: 0 = the best this CPU has, 1 = AVX2, 2 = AVX-512 VNNI); the
// AVX2 and AVX-512 code is compiled with per-function target pragmas, so the rest of the file
// (and the choice) runs on any x86-64 CPU.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace kvserve_gemv {

constexpr int64_t kBlock = 32;
constexpr int64_t kPair = 64;
constexpr int64_t kTileRows = 32;  // output rows per tile: their weights stay in L1 across m chunks

enum Isa : int64_t { kAuto = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

int64_t best_isa() { return cpu_has_avx512() ? kAvx512 : (cpu_has_avx2() ? kAvx2 : kAuto); }

int64_t resolve_isa(int64_t isa) {
  if (isa == kAuto) {
    isa = best_isa();
    TORCH_CHECK(isa != kAuto, "kvserve gemv: this CPU has no AVX2/FMA/F16C; use torch's kernels");
  }
  TORCH_CHECK(isa == kAvx2 || isa == kAvx512, "kvserve gemv: isa must be 0, 1 or 2, got ", isa);
  TORCH_CHECK(isa != kAvx2 || cpu_has_avx2(), "kvserve gemv: AVX2 asked for, CPU lacks it");
  TORCH_CHECK(isa != kAvx512 || cpu_has_avx512(),
              "kvserve gemv: AVX-512 VNNI asked for, CPU lacks it");
  return isa;
}

// Activation rows quantized per 32-block in two int8 levels, x ~ dx * q1 + dx / 256 * q2:
// q1 = round(x / dx) with dx = amax / 127, q2 = round((x - dx * q1) / (dx / 256)), so the
// error is at most dx / 512 (one level alone, dx / 2, cost 1.4% of perplexity on the test text).
// The kernels form 256 * (q1 . w) + (q2 . w) in int32 and scale it by dx / 256.
// Values in pair order; for each pair, q1's 64 values then q2's (one buffer per thread).
struct QuantizedRows {
  int64_t rows = 0, k = 0;
  std::vector<int8_t> q;     // [rows, k / 64, 2 levels, 64]
  std::vector<float> scale;  // [rows, k / 32]: dx / 256
  std::vector<float> sum;    // [rows, k / 32]: the block's float sum (int4's zero term)
  const int8_t* pair(int64_t row, int64_t p) const { return q.data() + row * 2 * k + 2 * kPair * p; }
};

constexpr int kRows = 4;  // output rows a kernel call computes together (N % 4 == 0)

// An int4 group record: d [4][K / 32] and m [4][K / 32] float16, then the nibbles.
inline int64_t int4_group_bytes(int64_t k) { return kRows * (k / kBlock) * 4 + kRows * k / 2; }

// What a kernel reads for one call: the weights and the quantized activation rows.
struct Problem {
  const uint8_t* weights;   // [N / 4, group_bytes]: one record per group of 4 output rows
  const float* row_scales;  // int8: s float32 [N]
  const QuantizedRows* x;
  int64_t n, k;
  int64_t group_bytes() const { return row_scales == nullptr ? int4_group_bytes(k) : 4 * k; }
};

// Software prefetch this far ahead in the weight stream (prefetcht0, spread over the pair
// loop): one core streamed a decode step's weights 1.18x faster with it than with the hardware
// prefetchers alone (interleaved runs, 1 thread, 1,440 / 2,880 / 5,760 bytes tried; 2,880 best).
// Never prefetchnta: that keeps the lines out of the L3 the next token would find them in.
constexpr int64_t kPrefetchBytes = 2880;

// The lines of [p + distance + i * step, p + distance + (i + 1) * step): one pair's share of
// its record (the prefetch may run past the last record: a prefetch never faults).
inline void prefetch_spread(const uint8_t* p, int64_t step, int64_t i) {
  const uint8_t* start = p + kPrefetchBytes + i * step;
  for (int64_t offset = 0; offset < step + 63; offset += 64) __builtin_prefetch(start + offset, 0, 3);
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax_avx2(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load256(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline __m256 broadcast_pair_avx2(const float* p) {  // [p0, p1, p0, p1, ...]
  return _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castsi128_pd(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p)))));
}

template <typename T>
inline __m256 load8_avx2(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {  // bfloat16: the high half of a float32
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
}

// Row m of x (K values of T) -> int8 per 32-block in pair order, scales and sums.
template <typename T>
void quantize_row_avx2(const T* x, int64_t k, int8_t* q, float* scale, float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i floor = _mm256_set1_epi8(-127);  // the sign trick needs -x to fit an int8
  alignas(32) int8_t natural[2][kPair];
  for (int64_t pair = 0; pair < k / kPair; ++pair) {
    for (int half = 0; half < 2; ++half) {
      const int64_t b = pair * 2 + half;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = load8_avx2(x + b * kBlock + 8 * i);
      const __m256 amax = _mm256_max_ps(
          _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
          _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      const float top = hmax_avx2(amax);
      const __m256 inv = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
      const __m256 step = _mm256_set1_ps(top / 127.f);
      const __m256 inv_fine = _mm256_mul_ps(inv, _mm256_set1_ps(256.f));
      __m256i i[4], fine[4];
      for (int j = 0; j < 4; ++j) {
        i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // to nearest
        const __m256 rest = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(i[j]), step, v[j]);
        fine[j] = _mm256_cvtps_epi32(_mm256_mul_ps(rest, inv_fine));
      }
      for (int level = 0; level < 2; ++level) {
        const __m256i* w = level == 0 ? i : fine;
        // packs interleave 128-bit lanes: 4-value groups come out as 0 2 4 6 1 3 5 7
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(w[0], w[1]),
                                                  _mm256_packs_epi32(w[2], w[3]));
        const __m256i ordered = _mm256_max_epi8(
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)), floor);
        _mm256_store_si256(reinterpret_cast<__m256i*>(natural[level] + half * kBlock), ordered);
      }
      scale[b] = top / (127.f * 256.f);
      sum[b] = hsum_avx2(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    }
    // lane L (4 values) of the pair: group L / 2 of block L % 2
    for (int level = 0; level < 2; ++level) {
      int32_t groups[2][8], lanes[16];
      std::memcpy(groups, natural[level], sizeof(groups));
      for (int lane = 0; lane < 16; ++lane) lanes[lane] = groups[lane % 2][lane / 2];
      std::memcpy(q + (2 * pair + level) * kPair, lanes, sizeof(lanes));
    }
  }
}

// For the group's 4 rows: d as float32 into df [4][K / 32] (shared by every activation row),
// and zero_term[r][i] = sum_b m[r][b] * xsum[i][b] (m times the block's float sum).
template <int MB>
inline void int4_group_terms(const Problem& pr, const uint8_t* group, int64_t m0, float* df,
                             float (*zero_term)[MB]) {
  const int64_t blocks = pr.k / kBlock;
  const uint16_t* d = reinterpret_cast<const uint16_t*>(group);
  const uint16_t* mn = d + kRows * blocks;
  for (int r = 0; r < kRows; ++r) {
    __m256 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= blocks; b += 8) {
      const __m128i dh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + r * blocks + b));
      const __m128i mh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + r * blocks + b));
      _mm256_storeu_ps(df + r * blocks + b, _mm256_cvtph_ps(dh));
      const __m256 mv = _mm256_cvtph_ps(mh);
      for (int i = 0; i < MB; ++i) {
        const float* xs = pr.x->sum.data() + (m0 + i) * blocks + b;
        acc[i] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xs), acc[i]);
      }
    }
    float tail[MB] = {};
    for (; b < blocks; ++b) {
      df[r * blocks + b] = _cvtsh_ss(d[r * blocks + b]);
      const float mv = _cvtsh_ss(mn[r * blocks + b]);
      for (int i = 0; i < MB; ++i) tail[i] += mv * pr.x->sum[(m0 + i) * blocks + b];
    }
    for (int i = 0; i < MB; ++i) zero_term[r][i] = hsum_avx2(acc[i]) + tail[i];
  }
}

// out[i * kRows + r] = row n + r of W times activation row m0 + i
template <int MB>
void int4_avx2(const Problem& pr, int64_t m0, int64_t n, float* cs, float* out) {
  const int64_t blocks = pr.k / kBlock, pairs = pr.k / kPair;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1), by256 = _mm256_set1_epi16(256);
  float zero_term[kRows][MB];
  const int64_t bytes = pr.group_bytes();
  const uint8_t* group = pr.weights + (n / kRows) * bytes;
  int4_group_terms<MB>(pr, group, m0, cs, zero_term);  // cs: d of the 4 rows, float32
  const uint8_t* w = group + kRows * 4 * blocks;  // after the d and m of the 4 rows
  __m256 acc[kRows][MB];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    if (m0 == 0) prefetch_spread(group, bytes / pairs, p);
    __m256 dx[MB];
    for (int i = 0; i < MB; ++i) dx[i] = broadcast_pair_avx2(pr.x->scale.data() + (m0 + i) * blocks + 2 * p);
    for (int r = 0; r < kRows; ++r) {
      const __m256 d = broadcast_pair_avx2(cs + r * blocks + 2 * p);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (p * kRows + r) * 32));
      const __m256i lo = _mm256_and_si256(v, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int i = 0; i < MB; ++i) {
        const int8_t* x = pr.x->pair(m0 + i, p);
        // u4 * s8 pairs are at most 2 * 15 * 127, so two of them still fit an int16
        const __m256i coarse = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load256(x)),
                                                _mm256_maddubs_epi16(hi, load256(x + 32)));
        const __m256i fine = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load256(x + 64)),
                                              _mm256_maddubs_epi16(hi, load256(x + 96)));
        const __m256 s = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(coarse, by256),
                                                             _mm256_madd_epi16(fine, ones)));
        acc[r][i] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, dx[i]), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < MB; ++i) out[i * kRows + r] = hsum_avx2(acc[r][i]) + zero_term[r][i];
}

template <int MB>
void int8_avx2(const Problem& pr, int64_t m0, int64_t n, float* /*cs*/, float* out) {
  const int64_t blocks = pr.k / kBlock, pairs = pr.k / kPair;
  const __m256i ones = _mm256_set1_epi16(1), by256 = _mm256_set1_epi16(256);
  const int64_t bytes = pr.group_bytes();
  const int8_t* w = reinterpret_cast<const int8_t*>(pr.weights) + (n / kRows) * bytes;
  __m256 acc[kRows][MB];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    if (m0 == 0) prefetch_spread(reinterpret_cast<const uint8_t*>(w), bytes / pairs, p);
    for (int r = 0; r < kRows; ++r) {
      const int8_t* wr = w + (p * kRows + r) * kPair;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32));
      const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
      for (int i = 0; i < MB; ++i) {
        const int8_t* x = pr.x->pair(m0 + i, p);
        // |w| * (x * sign(w)) = w * x; a pair is at most 2 * 127 * 127 < 2^15
        const auto dot = [&](const int8_t* v, const __m256i& weight) {
          const __m256i a0v = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(load256(v), w0));
          const __m256i a1v = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(load256(v + 32), w1));
          return _mm256_add_epi32(_mm256_madd_epi16(a0v, weight), _mm256_madd_epi16(a1v, weight));
        };
        const __m256 s = _mm256_cvtepi32_ps(_mm256_add_epi32(dot(x, by256), dot(x + 64, ones)));
        const float* dx = pr.x->scale.data() + (m0 + i) * blocks + 2 * p;
        acc[r][i] = _mm256_fmadd_ps(s, broadcast_pair_avx2(dx), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < MB; ++i) out[i * kRows + r] = pr.row_scales[n + r] * hsum_avx2(acc[r][i]);
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

inline __m512 broadcast_pair_avx512(const float* p) {
  return _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castsi128_pd(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p)))));
}

template <int MB>
void int4_avx512(const Problem& pr, int64_t m0, int64_t n, float* cs, float* out) {
  const int64_t blocks = pr.k / kBlock, pairs = pr.k / kPair;
  const __m512i low = _mm512_set1_epi8(0x0F);
  float zero_term[kRows][MB];
  const int64_t bytes = pr.group_bytes();
  const uint8_t* group = pr.weights + (n / kRows) * bytes;
  int4_group_terms<MB>(pr, group, m0, cs, zero_term);  // cs: d of the 4 rows, float32
  const uint8_t* w = group + kRows * 4 * blocks;  // after the d and m of the 4 rows
  __m512 acc[kRows][MB];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    if (m0 == 0) prefetch_spread(group, bytes / pairs, p);
    __m512 dx[MB];
    for (int i = 0; i < MB; ++i) dx[i] = broadcast_pair_avx512(pr.x->scale.data() + (m0 + i) * blocks + 2 * p);
    for (int r = 0; r < kRows; ++r) {
      const __m512 d = broadcast_pair_avx512(cs + r * blocks + 2 * p);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (p * kRows + r) * 32));
      const __m512i q = _mm512_and_si512(
          _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), low);
      for (int i = 0; i < MB; ++i) {
        const int8_t* x = pr.x->pair(m0 + i, p);
        const __m512i coarse = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(x));
        const __m512 s = _mm512_cvtepi32_ps(
            _mm512_dpbusd_epi32(_mm512_slli_epi32(coarse, 8), q, _mm512_loadu_si512(x + 64)));
        acc[r][i] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, dx[i]), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < MB; ++i) out[i * kRows + r] = _mm512_reduce_add_ps(acc[r][i]) + zero_term[r][i];
}

template <int MB>
void int8_avx512(const Problem& pr, int64_t m0, int64_t n, float* /*cs*/, float* out) {
  const int64_t blocks = pr.k / kBlock, pairs = pr.k / kPair;
  const __m512i zero = _mm512_setzero_si512();
  const int64_t bytes = pr.group_bytes();
  const int8_t* w = reinterpret_cast<const int8_t*>(pr.weights) + (n / kRows) * bytes;
  __m512 acc[kRows][MB];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    if (m0 == 0) prefetch_spread(reinterpret_cast<const uint8_t*>(w), bytes / pairs, p);
    for (int r = 0; r < kRows; ++r) {
      const __m512i wv = _mm512_loadu_si512(w + (p * kRows + r) * kPair);
      const __m512i aw = _mm512_abs_epi8(wv);
      const __mmask64 negative = _mm512_movepi8_mask(wv);
      for (int i = 0; i < MB; ++i) {
        const int8_t* x = pr.x->pair(m0 + i, p);
        const __m512i x1 = _mm512_loadu_si512(x), x2 = _mm512_loadu_si512(x + 64);
        const __m512i s1 = _mm512_mask_sub_epi8(x1, negative, zero, x1);  // x * sign(w)
        const __m512i s2 = _mm512_mask_sub_epi8(x2, negative, zero, x2);
        const __m512i coarse = _mm512_dpbusd_epi32(zero, aw, s1);
        const __m512 s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_slli_epi32(coarse, 8), aw, s2));
        const float* dx = pr.x->scale.data() + (m0 + i) * blocks + 2 * p;
        acc[r][i] = _mm512_fmadd_ps(s, broadcast_pair_avx512(dx), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < MB; ++i) out[i * kRows + r] = pr.row_scales[n + r] * _mm512_reduce_add_ps(acc[r][i]);
}

#pragma GCC pop_options

using KernelFn = void (*)(const Problem&, int64_t, int64_t, float*, float*);

// Activation rows per kernel call: kRows x MB accumulators fit the ISA's vector registers.
int max_rows(int64_t isa) { return isa == kAvx512 ? 4 : 2; }

KernelFn pick(bool int4, int64_t isa, int mb) {
#define KVSERVE_CASE(MB)                                                   \
  case MB:                                                                 \
    return int4 ? (isa == kAvx512 ? int4_avx512<MB> : int4_avx2<MB>)       \
                : (isa == kAvx512 ? int8_avx512<MB> : int8_avx2<MB>);
  switch (mb) {
    KVSERVE_CASE(1)
    KVSERVE_CASE(2)
    KVSERVE_CASE(3)
    KVSERVE_CASE(4)
    default:
      TORCH_CHECK(false, "kvserve gemv: bad row chunk ", mb);
  }
#undef KVSERVE_CASE
}

template <typename T>
void quantize_rows(const at::Tensor& x, QuantizedRows& r) {
  r.rows = x.size(0);
  r.k = x.size(1);
  const int64_t blocks = r.k / kBlock;
  r.q.resize(r.rows * r.k * 2);
  r.scale.resize(r.rows * blocks);
  r.sum.resize(r.rows * blocks);
  const T* src = x.data_ptr<T>();
  for (int64_t m = 0; m < r.rows; ++m) {
    quantize_row_avx2(src + m * r.k, r.k, r.q.data() + m * 2 * r.k, r.scale.data() + m * blocks,
                      r.sum.data() + m * blocks);
  }
}

template <typename T>
void compute(bool int4, const at::Tensor& x, Problem pr, int64_t isa, at::Tensor& out) {
  thread_local QuantizedRows rows;  // reused across calls: no allocation once warm
  quantize_rows<T>(x, rows);
  pr.x = &rows;
  const int64_t m = rows.rows, blocks = pr.k / kBlock;
  const int chunk = max_rows(isa);
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, pr.n / kRows, kTileRows / kRows, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(static_cast<size_t>(kRows * chunk * blocks));
    float tile[kRows * 4];
    constexpr int64_t groups_per_tile = kTileRows / kRows;
    for (int64_t first = begin; first < end; first += groups_per_tile) {
      const int64_t last = std::min(end, first + groups_per_tile);
      for (int64_t m0 = 0; m0 < m; m0 += chunk) {  // the tile's weights stay in L1 across m
        const int mb = static_cast<int>(std::min<int64_t>(chunk, m - m0));
        const KernelFn kernel = pick(int4, isa, mb);
        for (int64_t group = first; group < last; ++group) {
          const int64_t n = group * kRows;
          kernel(pr, m0, n, cs.data(), tile);
          for (int i = 0; i < mb; ++i)
            for (int r = 0; r < kRows; ++r) dst[(m0 + i) * pr.n + n + r] = T(tile[i * kRows + r]);
        }
      }
    }
  });
}

at::Tensor run(bool int4, const at::Tensor& x, const Problem& pr, int64_t isa) {
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty({x.size(0), pr.n}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: compute<float>(int4, input, pr, isa, out); break;
    case at::kBFloat16: compute<at::BFloat16>(int4, input, pr, isa, out); break;
    case at::kHalf: compute<at::Half>(int4, input, pr, isa, out); break;
    default: TORCH_CHECK(false, "kvserve gemv: x must be float32, bfloat16 or float16");
  }
  return out;
}

void check_input(const at::Tensor& x, int64_t n, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "kvserve gemv: x must be [M, ", k, "], got ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "kvserve gemv: CPU tensors only");
  TORCH_CHECK(k % kPair == 0, "kvserve gemv: K (", k, ") must be a multiple of 64");
  TORCH_CHECK(n % kRows == 0, "kvserve gemv: N (", n, ") must be a multiple of 4");
}

at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t isa,
                   const std::optional<at::Tensor>& fallback_packed,
                   const std::optional<at::Tensor>& fallback_scales_and_zeros,
                   int64_t fallback_above) {
  if (fallback_packed.has_value() && x.size(0) > fallback_above) {
    // torch's kernel (its weights in its own format) for more rows than this path wins at
    TORCH_CHECK(fallback_scales_and_zeros.has_value(), "q4_gemm: fallback needs its scales");
    return at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16).contiguous(), *fallback_packed,
                                           kBlock, *fallback_scales_and_zeros)
        .to(x.scalar_type());
  }
  const int64_t n = packed.size(0) * kRows, k = x.size(-1);
  check_input(x, n, k);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) == int4_group_bytes(k),
              "q4_gemm: packed must be uint8 [N / 4, ", int4_group_bytes(k), "] for K = ", k,
              ", got ", packed.sizes());
  const Problem pr{packed.data_ptr<uint8_t>(), nullptr, nullptr, n, k};
  return run(true, x, pr, resolve_isa(isa));
}

at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   int64_t isa) {
  const int64_t n = packed.size(0) * kRows, k = x.size(-1);
  check_input(x, n, k);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) == kRows * k,
              "q8_gemm: packed must be int8 [N / 4, ", kRows * k, "], got ", packed.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == n,
              "q8_gemm: scales must be float32 [N]");
  const Problem pr{reinterpret_cast<const uint8_t*>(packed.data_ptr()), scales.data_ptr<float>(),
                   nullptr, n, k};
  return run(false, x, pr, resolve_isa(isa));
}

}  // namespace kvserve_gemv

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("q4_gemm(Tensor x, Tensor packed, int isa=0, Tensor? fallback_packed=None, "
        "Tensor? fallback_scales_and_zeros=None, int fallback_above=0) -> Tensor");
  m.def("q8_gemm(Tensor x, Tensor packed, Tensor scales, int isa=0) -> Tensor");
  m.def("gemv_best_isa() -> int", &kvserve_gemv::best_isa);
}

TORCH_LIBRARY_IMPL(kvserve, CPU, m) {
  m.impl("q4_gemm", &kvserve_gemv::q4_gemm);
  m.impl("q8_gemm", &kvserve_gemv::q8_gemm);
}
