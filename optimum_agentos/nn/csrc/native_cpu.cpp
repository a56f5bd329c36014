// optimum-agentos native CPU kernels: matrix products that read int8 or int4 codes directly, with float32 activations
// and float32 accumulation, for few-token calls (decode, short prompts). Built once per machine by
// `optimum_agentos/nn/native.py` with -O3 -march=native: AVX-512 and AVX2 (+FMA) versions below, and a portable one
// the compiler vectorises for anything else (NEON, SSE). Registered as `torch.ops.agentos_native.*`; a Meta
// implementation lets torch.compile trace them.
//
// Both read a layout the layer's packed kernel already keeps (no second copy of the codes):
// - int8_rows_matmul: codes `w` [N, K] int8 (`q - 128` for asymmetric rows, the symmetric codes as they are),
//   y[m, n] = scale[n] * sum_k w[n, k] x[m, k] - zero_term[n] * sum_k x[m, k].
// - bf16_rows_matmul: the same loops over bfloat16 rows (a float output head's bf16 copy), y = x w^T.
// - int4_blocks_matmul: `_convert_weight_to_int4pack_for_cpu`'s layout (torch 2.13, AVX-512): blocks of 64 rows, for
//   input k 32 bytes whose low nibbles are rows 0-31 and high nibbles rows 32-63 of the block; per stored group g
//   (`group` inputs, the last one may be shorter) and row n, w[n, k] = scale[g, n] (q[n, k] - zero[g, n]), so
//   y[m, n] = sum_g scale[g, n] sum_{k in g} q[n, k] x[m, k] - shift[g, n] sum_{k in g} x[m, k], shift = scale zero.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <emmintrin.h>  // _mm_clflush (SSE2: every x86-64 CPU)
#endif

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define AGENTOS_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define AGENTOS_AVX2 1
#include <immintrin.h>
#endif
// int8 x int8 dot products in one instruction (VPDPBUSD, AVX512-VNNI) and a byte shuffle across two registers
// (VPERMT2B, AVX512-VBMI) to read the int4 blocks four inputs at a time: Ice Lake, Sapphire Rapids, Zen 4 and later
#if defined(AGENTOS_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define AGENTOS_VNNI 1
#endif

// Calls of up to this many tokens read the int8 / bf16 rows one after another, prefetching along the stream
// (`row_avx512`, below); the AVX2 and portable loops read them side by side only.
#if defined(AGENTOS_AVX512)
constexpr int64_t kStreamTokens = 2;
#else
constexpr int64_t kStreamTokens = 0;
#endif

#if defined(AGENTOS_AVX512)
// One 64-row block of int4 codes times T tokens, every stored group folded in as it ends; y rows are N apart.
template <int T>
void int4_block_avx512(const uint8_t* block, const float* x, int64_t K, int64_t group, int64_t G, const float* s,
                       const float* h, int64_t N, const float* sums, float* y) {
  const __m256i nibble = _mm256_set1_epi8(15);
  __m512 out[T][4];
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < 4; ++i) out[t][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[T][4];
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_setzero_ps();
    const int64_t stop = std::min(K, (g + 1) * group);
    for (int64_t k = g * group; k < stop; ++k) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + k * 32));
      const __m256i lo = _mm256_and_si256(v, nibble);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      __m512 c[4];
      c[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)));
      c[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
      c[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)));
      c[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
      for (int t = 0; t < T; ++t) {
        const __m512 xv = _mm512_set1_ps(x[t * K + k]);
        for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_fmadd_ps(c[i], xv, acc[t][i]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      const __m512 sv = _mm512_loadu_ps(s + g * N + 16 * i);
      const __m512 hv = _mm512_loadu_ps(h + g * N + 16 * i);
      for (int t = 0; t < T; ++t) {
        out[t][i] = _mm512_fmadd_ps(sv, acc[t][i], out[t][i]);
        out[t][i] = _mm512_fnmadd_ps(hv, _mm512_set1_ps(sums[t * G + g]), out[t][i]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(y + t * N + 16 * i, out[t][i]);
}

// 16 weights as float32: int8 codes widened; bfloat16 (a float head's copy) moved into a float's high half.
inline __m512 floats16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
inline __m512 floats16(const at::BFloat16* w) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// How far ahead along the rows' stream the AVX-512 loop prefetches. The rows of a pass are read one after
// another, 64 weights per step, each step prefetching the lines this many bytes on (into the next rows when the
// row ends). SmolLM2's 120 decode-shaped calls at one token, streaming from memory (2 threads, this repo's Xeon),
// in a test build with four accumulators per token: 11.2 ms with four rows read side by side and a prefetch of whole
// rows four passes ahead, 7.4 ms this way, 6.6 ms for reading the bytes alone (no arithmetic); 2 KiB ahead 7.9 ms,
// 8 KiB 7.7 ms. This loop (one accumulator): float32 / int8 time 2.60-3.19, the loop before it 2.29-2.40 in the
// same runs.
constexpr int64_t kRowPrefetchBytes = 4096;

// One row of weights (int8 codes or bfloat16) times T tokens: four 16-input chunks per step, each converted once and
// multiplied with every token; returns the dot products in dots[t][r]. The sums run in the order of the side-by-side
// loop below, so a token's result does not depend on how many tokens share its call (one accumulator per token: the
// next rows' steps overlap its latency).
template <int T, typename W>
void row_avx512(const W* w, const float* x, int64_t K, float dots[][4], int r) {
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int64_t b = 0; b < 64 * static_cast<int64_t>(sizeof(W)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(w + k) + kRowPrefetchBytes + b, 0, 3);
    for (int j = 0; j < 4; ++j) {
      const __m512 c = floats16(w + k + 16 * j);
      for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(c, _mm512_loadu_ps(x + t * K + k + 16 * j), acc[t]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 c = floats16(w + k);
    for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(c, _mm512_loadu_ps(x + t * K + k), acc[t]);
  }
  for (int t = 0; t < T; ++t) {
    float d = _mm512_reduce_add_ps(acc[t]);
    for (int64_t j = k; j < K; ++j) d += static_cast<float>(w[j]) * x[t * K + j];
    dots[t][r] = d;
  }
}

// R rows side by side times T tokens, vectorised along K: each token's inputs loaded once for the R rows.
template <int T, int R, typename W>
void rows_side_by_side_avx512(const W* w, const float* x, int64_t K, float dots[][4]) {
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 c[R];
    for (int r = 0; r < R; ++r) c[r] = floats16(w + r * K + k);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * K + k);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm512_fmadd_ps(c[r], xv, acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      float d = _mm512_reduce_add_ps(acc[t][r]);
      for (int64_t j = k; j < K; ++j) d += static_cast<float>(w[r * K + j]) * x[t * K + j];
      dots[t][r] = d;
    }
}

// R rows times T tokens; returns the dot products in dots[t][r]. Up to kStreamTokens tokens the rows are read
// one after another, prefetching along the stream (memory is the limit); for more, side by side (the loads of the
// inputs are the limit: 4 tokens of SmolLM2's 49152 x 576 head took 3.4 ms one row after another in the test
// build, 2.5 ms side by side).
template <int T, int R, typename W>
void rows_avx512(const W* w, const float* x, int64_t K, float dots[][4]) {
  if constexpr (T <= kStreamTokens) {
    for (int r = 0; r < R; ++r) row_avx512<T>(w + r * K, x, K, dots, r);
  } else {
    rows_side_by_side_avx512<T, R>(w, x, K, dots);
  }
}
#endif

#if defined(AGENTOS_AVX2)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int T>
void int4_block_avx2(const uint8_t* block, const float* x, int64_t K, int64_t group, int64_t G, const float* s,
                     const float* h, int64_t N, const float* sums, float* y) {
  static_assert(T == 1, "one token per pass: 8 accumulators of 8 rows");
  const __m128i nibble = _mm_set1_epi8(15);
  __m256 out[8];
  for (int i = 0; i < 8; ++i) out[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    const int64_t stop = std::min(K, (g + 1) * group);
    for (int64_t k = g * group; k < stop; ++k) {
      const __m256 xv = _mm256_set1_ps(x[k]);
      for (int half = 0; half < 2; ++half) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + k * 32 + 16 * half));
        const __m128i lo = _mm_and_si128(v, nibble);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
        // rows 16 half + 0-7, 8-15 (low nibbles) and 32 + 16 half + 0-7, 8-15 (high nibbles)
        acc[2 * half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), xv, acc[2 * half]);
        acc[2 * half + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), xv,
                                            acc[2 * half + 1]);
        acc[4 + 2 * half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), xv, acc[4 + 2 * half]);
        acc[5 + 2 * half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), xv,
                                            acc[5 + 2 * half]);
      }
    }
    const __m256 total = _mm256_set1_ps(sums[g]);
    for (int i = 0; i < 8; ++i) {
      out[i] = _mm256_fmadd_ps(_mm256_loadu_ps(s + g * N + 8 * i), acc[i], out[i]);
      out[i] = _mm256_fnmadd_ps(_mm256_loadu_ps(h + g * N + 8 * i), total, out[i]);
    }
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(y + 8 * i, out[i]);
}

// 8 weights as float32 (as floats16).
inline __m256 floats8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
inline __m256 floats8(const at::BFloat16* w) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <int T, int R, typename W>
void rows_avx2(const W* w, const float* x, int64_t K, float dots[][4]) {
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 c[R];
    for (int r = 0; r < R; ++r) c[r] = floats8(w + r * K + k);
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * K + k);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_fmadd_ps(c[r], xv, acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      float d = hsum256(acc[t][r]);
      for (int64_t j = k; j < K; ++j) d += static_cast<float>(w[r * K + j]) * x[t * K + j];
      dots[t][r] = d;
    }
}
#endif

constexpr int64_t kTokensPerPass = 4;  // tokens multiplied per pass over the weights (each read M / 4 times)
constexpr int64_t kRowsPerPass = 4;    // rows per pass (their weights converted once for all tokens of the pass)
// Software prefetch distance of the rows read side by side, in passes: SmolLM2's decode-shaped calls streaming
// from memory took 12.0 ms per token's 120 calls without it, 9.2-9.9 ms at 4-16 passes (2 threads, this repo's Xeon;
// the int4 blocks' loop got slower with a whole-block prefetch, so it has none).
constexpr int64_t kPrefetchPasses = 4;

// Portable fallback: the compiler vectorises the inner loops for whatever the target has.
template <int T, int R, typename W>
void rows_generic(const W* w, const float* x, int64_t K, float dots[][4]) {
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      const W* row = w + r * K;
      const float* xr = x + t * K;
      float d = 0.f;
#pragma omp simd reduction(+ : d)
      for (int64_t k = 0; k < K; ++k) d += static_cast<float>(row[k]) * xr[k];
      dots[t][r] = d;
    }
}

template <int T, int R, typename W>
void rows(const W* w, const float* x, int64_t K, float dots[][4]) {
#if defined(AGENTOS_AVX512)
  rows_avx512<T, R>(w, x, K, dots);
#elif defined(AGENTOS_AVX2)
  rows_avx2<T, R>(w, x, K, dots);
#else
  rows_generic<T, R>(w, x, K, dots);
#endif
}

template <int T, typename W>
void rows_tokens(const W* w, const float* x, int64_t K, int64_t R, float dots[][4]) {
  switch (R) {
    case 4: rows<T, 4>(w, x, K, dots); break;
    case 3: rows<T, 3>(w, x, K, dots); break;
    case 2: rows<T, 2>(w, x, K, dots); break;
    default: rows<T, 1>(w, x, K, dots); break;
  }
}

// The ops take x [..., K] of any floating dtype and return [..., N] in x's dtype: the reshapes and casts happen
// here, where they cost no Python call (at one token, each Python-level tensor call costs microseconds).
at::Tensor float_rows(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 1 && at::isFloatingType(input.scalar_type()), "x: floating point [..., K]");
  return input.reshape({-1, input.size(-1)}).to(at::kFloat).contiguous();
}

// Float32 rows y [M, N] (+ bias) as the output for `input`: its leading dims, its dtype.
at::Tensor shaped_like(at::Tensor y, const at::Tensor& input, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == y.size(1), "bias: [", y.size(1), "]");
    y.add_(bias->to(at::kFloat));
  }
  std::vector<int64_t> sizes = input.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes).to(input.scalar_type());
}

at::Tensor output_meta(const at::Tensor& input, int64_t N) {
  std::vector<int64_t> sizes = input.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, input.options());
}

// y [M, N] = the rows' dot products with each token of x [M, K] (float32), times scale[n] when given, minus
// zero_term[n] times the token's input sum when given.
template <typename W>
at::Tensor rows_matmul(const at::Tensor& x, const W* wp, int64_t N, const float* sp, const float* zp) {
  const int64_t M = x.size(0), K = x.size(1);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> sums(M, 0.f);
  if (zp != nullptr) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += xr[k];
      sums[m] = s;
    }
  }
  const int64_t passes = (N + kRowsPerPass - 1) / kRowsPerPass;
  at::parallel_for(0, passes, 8, [&](int64_t begin, int64_t end) {
    float dots[kTokensPerPass][4];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kRowsPerPass, R = std::min(kRowsPerPass, N - n0);
      // the rows a few passes ahead, into L1: the streams alone wait on memory
      if (M > kStreamTokens && p + kPrefetchPasses < end) {
        const char* ahead = reinterpret_cast<const char*>(wp + (n0 + kPrefetchPasses * kRowsPerPass) * K);
        const int64_t bytes = std::min(kRowsPerPass, N - n0 - kPrefetchPasses * kRowsPerPass) * K * sizeof(W);
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(ahead + b, 0, 3);
      }
      for (int64_t m0 = 0; m0 < M; m0 += kTokensPerPass) {
        const int64_t T = std::min(kTokensPerPass, M - m0);
        const W* block = wp + n0 * K;
        const float* xr = xp + m0 * K;
        switch (T) {
          case 4: rows_tokens<4>(block, xr, K, R, dots); break;
          case 3: rows_tokens<3>(block, xr, K, R, dots); break;
          case 2: rows_tokens<2>(block, xr, K, R, dots); break;
          default: rows_tokens<1>(block, xr, K, R, dots); break;
        }
        for (int64_t t = 0; t < T; ++t)
          for (int64_t r = 0; r < R; ++r)
            yp[(m0 + t) * N + n0 + r] = (sp != nullptr ? dots[t][r] * sp[n0 + r] : dots[t][r]) -
                                        (zp != nullptr ? zp[n0 + r] * sums[m0 + t] : 0.f);
      }
    }
  });
  return y;
}

at::Tensor int8_rows_matmul(const at::Tensor& input, const at::Tensor& w, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zero_term, const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = float_rows(input);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w: contiguous int8 [N, K]");
  const int64_t N = w.size(0);
  TORCH_CHECK(w.size(1) == x.size(1), "w has ", w.size(1), " inputs, x ", x.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N, "scale: float32 [N]");
  const float* zp = nullptr;
  if (zero_term.has_value()) {
    TORCH_CHECK(zero_term->scalar_type() == at::kFloat && zero_term->is_contiguous() && zero_term->numel() == N,
                "zero_term: float32 [N]");
    zp = zero_term->data_ptr<float>();
  }
  return shaped_like(rows_matmul(x, w.data_ptr<int8_t>(), N, scale.data_ptr<float>(), zp), input, bias);
}

at::Tensor bf16_rows_matmul(const at::Tensor& input, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = float_rows(input);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "w: contiguous bfloat16 [N, K]");
  TORCH_CHECK(w.size(1) == x.size(1), "w has ", w.size(1), " inputs, x ", x.size(1));
  return shaped_like(rows_matmul(x, w.data_ptr<at::BFloat16>(), w.size(0), nullptr, nullptr), input, bias);
}

// Portable fallback of one 64-row int4 block times one token.
void int4_block_generic(const uint8_t* block, const float* x, int64_t K, int64_t group, int64_t G, const float* s,
                        const float* h, int64_t N, const float* sums, float* y) {
  alignas(64) float low[32], high[32], out[64];
  for (int64_t j = 0; j < 64; ++j) out[j] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t j = 0; j < 32; ++j) low[j] = high[j] = 0.f;
    const int64_t stop = std::min(K, (g + 1) * group);
    for (int64_t k = g * group; k < stop; ++k) {
      const uint8_t* bytes = block + k * 32;
      const float xk = x[k];
#pragma omp simd
      for (int64_t j = 0; j < 32; ++j) {
        low[j] += static_cast<float>(bytes[j] & 15) * xk;
        high[j] += static_cast<float>(bytes[j] >> 4) * xk;
      }
    }
    for (int64_t j = 0; j < 32; ++j) {
      out[j] += s[g * N + j] * low[j] - h[g * N + j] * sums[g];
      out[j + 32] += s[g * N + j + 32] * high[j] - h[g * N + j + 32] * sums[g];
    }
  }
  std::copy(out, out + 64, y);
}

// The int4 blocks' tensors for K inputs checked (see `int4_blocks_matmul`); returns the number of 64-row blocks.
int64_t int4_blocks_checked(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& shift, int64_t K,
                            int64_t group) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() % (32 * K) == 0,
              "packed: contiguous uint8 blocks [N / 64, K, 32]");
  const int64_t blocks = packed.numel() / (32 * K), N = blocks * 64;
  TORCH_CHECK(group > 0, "group must be positive");
  const int64_t G = (K + group - 1) / group;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == G * N,
              "scale: float32 [groups, N]");
  TORCH_CHECK(shift.scalar_type() == at::kFloat && shift.is_contiguous() && shift.numel() == G * N,
              "shift: float32 [groups, N]");
  return blocks;
}

// Each token's inputs summed per group of `group` inputs: [M, G] (for the zero points' share).
std::vector<float> group_sums(const float* xp, int64_t M, int64_t K, int64_t group) {
  const int64_t G = (K + group - 1) / group;
  std::vector<float> sums(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xr = xp + m * K + g * group;
      const int64_t len = std::min(group, K - g * group);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < len; ++k) s += xr[k];
      sums[m * G + g] = s;
    }
  }
  return sums;
}

at::Tensor int4_blocks_matmul(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale,
                              const at::Tensor& shift, int64_t group, const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = float_rows(input);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t blocks = int4_blocks_checked(packed, scale, shift, K, group), N = blocks * 64;
  const int64_t G = (K + group - 1) / group;
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* bp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* hp = shift.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const std::vector<float> sums = group_sums(xp, M, K, group);
#if defined(AGENTOS_AVX512)
  constexpr int64_t tokens_per_pass = kTokensPerPass;
#else
  constexpr int64_t tokens_per_pass = 1;
#endif
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = bp + b * K * 32;
      const float* s = sp + b * 64;
      const float* h = hp + b * 64;
      for (int64_t m0 = 0; m0 < M; m0 += tokens_per_pass) {
        const float* xr = xp + m0 * K;
        float* yr = yp + m0 * N + b * 64;
        const float* sm = sums.data() + m0 * G;
#if defined(AGENTOS_AVX512)
        switch (std::min(tokens_per_pass, M - m0)) {
          case 4: int4_block_avx512<4>(block, xr, K, group, G, s, h, N, sm, yr); break;
          case 3: int4_block_avx512<3>(block, xr, K, group, G, s, h, N, sm, yr); break;
          case 2: int4_block_avx512<2>(block, xr, K, group, G, s, h, N, sm, yr); break;
          default: int4_block_avx512<1>(block, xr, K, group, G, s, h, N, sm, yr); break;
        }
#elif defined(AGENTOS_AVX2)
        int4_block_avx2<1>(block, xr, K, group, G, s, h, N, sm, yr);
#else
        int4_block_generic(block, xr, K, group, G, s, h, N, sm, yr);
#endif
      }
    }
  });
  return shaped_like(y, input, bias);
}

// Round to the nearest integer (ties to even) for |v| < 2^22: adding and subtracting 1.5 * 2^23 leaves no fraction
// bits. Plain arithmetic, so loops over it vectorise (std::nearbyint calls a library function without -ffast-math).
inline float nearest(float v) {
  constexpr float kShift = 12582912.f;
  return (v + kShift) - kShift;
}

// Activations rounded to int8 for int8 x int8 matmuls, one symmetric grid per token: v = x[m, k] / a[m] in
// [-127, 127] with a[m] = max_k |x[m, k]| / 127 over the channels kept on the grid, codes j = round(v) in rows
// 0..M-1 and, with `residual`, the rounding error on a 254 times finer grid, r = round((v - j) 254), in rows
// M..2M-1: then x = a (j + r / 254) to within a / 508 (about 16-bit activations; without it, within a / 2). The
// `outliers` channels with the largest max |x| over the tokens are left off the grids (codes 0), so that a few large
// activations do not coarsen every token's grid; the caller multiplies them in float32 (as LLM.int8() does with its
// outliers). A fixed count keeps every shape static (torch.compile). Also: the exact sums of each token's inputs (for
// the weights' zero points). Returns the left-out channels.
std::vector<int64_t> quantize_tokens(const float* xp, int64_t M, int64_t K, int64_t outliers, bool residual,
                                     int8_t* cp, float* ap, float* sp) {
  std::vector<float> peak(K, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* __restrict__ xr = xp + m * K;
    float* __restrict__ pk = peak.data();
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(xr[k]);
      pk[k] = pk[k] > a ? pk[k] : a;
    }
  }
  std::vector<int64_t> order(K);
  for (int64_t k = 0; k < K; ++k) order[k] = k;
  std::partial_sort(order.begin(), order.begin() + outliers, order.end(),
                    [&](int64_t i, int64_t j) { return peak[i] > peak[j] || (peak[i] == peak[j] && i < j); });
  order.resize(outliers);
  std::vector<float> keep(K, 1.f);
  for (int64_t k : order) keep[k] = 0.f;
  const float* kp = keep.data();
  // int8 stores may alias anything: the loops read only locals and __restrict__ pointers, or they do not vectorise
  at::parallel_for(0, M, 16, [xp, kp, cp, ap, sp, M, K, residual](int64_t begin, int64_t end) {
    const float* __restrict__ keep_row = kp;
    for (int64_t m = begin; m < end; ++m) {
      const float* __restrict__ xr = xp + m * K;
      int8_t* __restrict__ cr = cp + m * K;
      int8_t* __restrict__ rr = cp + (M + m) * K;  // with `residual`
      float high = 0.f, total = 0.f;
#pragma omp simd reduction(max : high)
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::fabs(xr[k]) * keep_row[k];
        high = high > a ? high : a;
      }
#pragma omp simd reduction(+ : total)
      for (int64_t k = 0; k < K; ++k) total += xr[k];
      const float inverse = high > 0.f ? 127.f / high : 0.f;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) cr[k] = static_cast<int8_t>(nearest(xr[k] * keep_row[k] * inverse));
      if (residual) {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const float v = xr[k] * keep_row[k] * inverse;  // in [-127, 127]
          rr[k] = static_cast<int8_t>(nearest((v - nearest(v)) * 254.f));  // in [-127, 127]
        }
      }
      ap[m] = high / 127.f;
      sp[m] = total;
    }
  });
  return order;
}

// The int4 blocks' weights (as `int4_blocks_matmul` reads them) on one int8 grid per output row, [K, N] at `op`:
// round((q[n, k] scale[g, n] - shift[g, n]) / row_scale[n]), `row_scale[n]` = the row's largest |w| / 127.
void int4_blocks_to_int8_into(const uint8_t* bp, const float* sp, const float* hp, const float* rp, int64_t blocks,
                              int64_t K, int64_t group, int8_t* op) {
  const int64_t N = blocks * 64, G = (K + group - 1) / group;
  at::parallel_for(0, blocks, 1, [bp, sp, hp, rp, op, G, K, N, group](int64_t begin, int64_t end) {
    alignas(64) float a[64], b[64];  // per row of the block: q a + b = (q scale - shift) / row_scale
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * 64;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t j = 0; j < 64; ++j) {
          const float inverse = rp[n0 + j] > 0.f ? 1.f / rp[n0 + j] : 0.f;  // an all-zero row stays 0
          a[j] = sp[g * N + n0 + j] * inverse;
          b[j] = -hp[g * N + n0 + j] * inverse;
        }
        const int64_t stop = std::min(K, (g + 1) * group);
        for (int64_t k = g * group; k < stop; ++k) {
          const uint8_t* __restrict__ bytes = bp + (blk * K + k) * 32;
          int8_t* __restrict__ o = op + k * N + n0;
#pragma omp simd
          for (int64_t j = 0; j < 32; ++j) {
            o[j] = static_cast<int8_t>(nearest(static_cast<float>(bytes[j] & 15) * a[j] + b[j]));
            o[j + 32] = static_cast<int8_t>(nearest(static_cast<float>(bytes[j] >> 4) * a[j + 32] + b[j + 32]));
          }
        }
      }
    }
  });
}

// Scratch memory of the calling thread, kept between calls: fresh pages cost a page fault each (about 2 us per 4 KiB
// on the machine this was written on: as much as the int8 matmul itself for a 576 x 576 layer at 512 tokens).
// Requests above kScratchCap bytes get memory of their own, so a large call does not pin its size for good.
constexpr size_t kScratchCap = size_t(32) << 20;

template <typename T>
at::Tensor scratch(std::vector<T>& kept, int64_t rows, int64_t cols, at::ScalarType dtype) {
  const size_t count = static_cast<size_t>(rows * cols);
  if (count * sizeof(T) > kScratchCap) return at::empty({rows, cols}, at::TensorOptions().dtype(dtype));
  if (kept.size() < count) kept.resize(count);
  return at::from_blob(kept.data(), {rows, cols}, at::TensorOptions().dtype(dtype));
}

// y = x W (+ bias) for int8 weight codes `weight` [K, N] (any strides), w[k, n] = scale[n] weight[k, n] -
// zero_term[n]: the activations and their residual on int8 grids (`quantize_tokens`), one torch._int_mm over twice
// the tokens, then per output y[m, n] = a[m] scale[n] (acc[m, n] + acc[M + m, n] / 254) - zero_term[n] sums[m]
// + bias[n] + the left-out channels' float32 products, in one pass.
at::Tensor int8_tokens_matmul(const at::Tensor& x, const at::Tensor& weight, const float* scale,
                              const float* zero_term, const float* bias, int64_t outliers) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(1);
  thread_local std::vector<int8_t> codes_kept;
  thread_local std::vector<int32_t> acc_kept;
  at::Tensor codes = scratch(codes_kept, 2 * M, K, at::kChar);
  std::vector<float> step(M), sums(M);
  const std::vector<int64_t> channels = quantize_tokens(x.data_ptr<float>(), M, K, std::min(outliers, K), true,
                                                        codes.data_ptr<int8_t>(), step.data(), sums.data());
  at::Tensor acc = scratch(acc_kept, 2 * M, N, at::kInt);
  at::_int_mm_out(acc, codes, weight);
  const int64_t C = static_cast<int64_t>(channels.size());
  std::vector<float> columns(C * N), inputs(M * C);  // the left-out channels: w[c, :] in float32, x[:, c]
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* xp = x.data_ptr<float>();
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1);
  for (int64_t c = 0; c < C; ++c) {
    const int8_t* row = wp + channels[c] * ws0;
    for (int64_t n = 0; n < N; ++n) columns[c * N + n] = static_cast<float>(row[n * ws1]) * scale[n];
    for (int64_t m = 0; m < M; ++m) inputs[m * C + c] = xp[m * K + channels[c]];
  }
  const std::vector<float> zeros(zero_term == nullptr || bias == nullptr ? N : 0, 0.f);
  const float* zt = zero_term != nullptr ? zero_term : zeros.data();
  const float* bt = bias != nullptr ? bias : zeros.data();
  auto y = at::empty({M, N}, x.options());
  const int32_t* ip = acc.data_ptr<int32_t>();
  const float *ap = step.data(), *tp = sums.data(), *cp = columns.data(), *xc = inputs.data();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 4, [ip, ap, tp, cp, xc, yp, scale, zt, bt, M, N, C](int64_t begin, int64_t end) {
    const float *__restrict__ scales = scale, *__restrict__ zero = zt, *__restrict__ shift = bt;
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* __restrict__ coarse = ip + m * N;
      const int32_t* __restrict__ fine = ip + (M + m) * N;
      float* __restrict__ yr = yp + m * N;
      const float a = ap[m], total = tp[m];
#pragma omp simd
      for (int64_t n = 0; n < N; ++n)
        yr[n] = a * scales[n] * (static_cast<float>(coarse[n]) + static_cast<float>(fine[n]) * (1.f / 254.f)) -
                zero[n] * total + shift[n];
      for (int64_t c = 0; c < C; ++c) {
        const float xv = xc[m * C + c];
        const float* __restrict__ column = cp + c * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) yr[n] += xv * column[n];
      }
    }
  });
  return y;
}

const float* optional_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, name, ": float32 [", n, "]");
  return t->data_ptr<float>();
}

// An optional vector (a bias in the model's dtype) as contiguous float32, for `optional_vector`.
c10::optional<at::Tensor> float32_vector(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return t->to(at::kFloat).contiguous();
}

// int8 rows w [N, K] (`q - 128` with `zero_term`, or symmetric rows) times x [M, K] float32 through int8 activations.
at::Tensor int8_rows_act_matmul(const at::Tensor& input, const at::Tensor& w, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& zero_term, const c10::optional<at::Tensor>& bias,
                                int64_t outliers) {
  const at::Tensor x = float_rows(input);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.size(1) == x.size(1), "w: int8 [N, K]");
  const int64_t N = w.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N, "scale: float32 [N]");
  const c10::optional<at::Tensor> bias32 = float32_vector(bias);
  return shaped_like(int8_tokens_matmul(x, w.t(), scale.data_ptr<float>(), optional_vector(zero_term, N, "zero_term"),
                                        optional_vector(bias32, N, "bias"), outliers), input, c10::nullopt);
}

// int4 blocks (as `int4_blocks_matmul`) put on one int8 grid per row into scratch memory, then as above.
at::Tensor int4_blocks_act_matmul(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& row_scale, int64_t group,
                                  const c10::optional<at::Tensor>& bias, int64_t outliers) {
  const at::Tensor x = float_rows(input);
  const int64_t K = x.size(1);
  const int64_t blocks = int4_blocks_checked(packed, scale, shift, K, group), N = blocks * 64;
  const float* rp = optional_vector(row_scale, N, "row_scale");
  thread_local std::vector<int8_t> weight_kept;
  at::Tensor weight = scratch(weight_kept, K, N, at::kChar);
  int4_blocks_to_int8_into(packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), shift.data_ptr<float>(), rp, blocks,
                           K, group, weight.data_ptr<int8_t>());
  const c10::optional<at::Tensor> bias32 = float32_vector(bias);
  return shaped_like(int8_tokens_matmul(x, weight, rp, nullptr, optional_vector(bias32, N, "bias"), outliers), input,
                     c10::nullopt);
}

// Few-token int4 through int8 activations and VNNI (`int4_blocks_vnni_matmul`): the activations go on
// `quantize_tokens`' two grids (codes and residual: about 16 bits; the `outliers` largest channels in float32), as for
// long inputs, and VPDPBUSD multiplies 64 code pairs per instruction where the float32 loop above converts 16 codes
// and does 16 FMAs. It reads the int4 blocks the float32 loop reads. (The same for the int8 rows was no faster than
// their float32 loop, which waits on memory: 9.25-10.55 against 9.74-9.91 ms for SmolLM2's decode-shaped calls.)

#if defined(AGENTOS_VNNI)
constexpr int64_t kVnniTokens = 2;  // tokens per pass over the weights: 2 x 2 grids x 4 accumulators fit the registers
// How far ahead the loop prefetches the blocks: on SmolLM2's decode-shaped calls from memory it ran 1.08 times as fast
// as the float32 int4 loop without prefetching, 1.19-1.33 times with 512-16384 bytes (2 threads, this repo's Xeon);
// the hardware prefetchers stop at 4 KiB pages.
constexpr int64_t kInt4PrefetchBytes = 2048;

// M tokens' activations for the VNNI loop: codes [2M, K] (rows M.. the residuals; thread-local scratch), per token
// the grid step, and the left-out channels with the tokens' values there [M, C].
struct TokenCodes {
  at::Tensor codes;
  std::vector<float> step, values;
  std::vector<int64_t> channels;
};

TokenCodes token_codes(const float* xp, int64_t M, int64_t K, int64_t outliers) {
  thread_local std::vector<int8_t> kept;
  TokenCodes a;
  a.codes = scratch(kept, 2 * M, K, at::kChar);
  a.step.resize(M);
  std::vector<float> totals(M);  // each token's sum (the int4 loop takes per-group sums instead)
  a.channels = quantize_tokens(xp, M, K, std::min(outliers, K), true, a.codes.data_ptr<int8_t>(), a.step.data(),
                               totals.data());
  const int64_t C = static_cast<int64_t>(a.channels.size());
  a.values.resize(M * C);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) a.values[m * C + c] = xp[m * K + a.channels[c]];
  return a;
}

// Byte 4 i + j of a gathered register: byte i (`half` = 0) or 16 + i (`half` = 1) of input k + j's 32 bytes, from
// inputs k, k + 1 (bytes 0-63 of VPERMT2B's table) and k + 2, k + 3 (bytes 64-127).
__m512i int4_gather_order(int half) {
  alignas(64) int8_t order[64];
  for (int p = 0; p < 64; ++p) order[p] = static_cast<int8_t>((p & 3) / 2 * 64 + (p & 1) * 32 + 16 * half + p / 4);
  return _mm512_load_si512(order);
}

// One 64-row int4 block times T tokens' codes `c` and residual codes `f` (rows K apart), four inputs at a time: two
// loads hold inputs k..k+3 of the block, two VPERMT2B put each row's four bytes in one 32-bit lane (rows 0-15 and
// 16-31; the high nibbles are rows 32-47 and 48-63), and VPDPBUSD multiplies the nibbles (unsigned) with the four
// codes. Per group: y += scale a (coarse + fine / 254) - shift sums; then the left-out channels in float32.
template <int T>
void int4_block_vnni(const uint8_t* block, const int8_t* c, const int8_t* f, const float* step, int64_t K,
                     int64_t group, int64_t G, const float* s, const float* h, int64_t N, const float* sums,
                     const int64_t* channels, int64_t C, const float* values, float* y) {
  static const __m512i low_rows = int4_gather_order(0), high_rows = int4_gather_order(1);
  const __m512i nibble = _mm512_set1_epi8(15);
  __m512 out[T][4];
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < 4; ++i) out[t][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i ac[T][4], af[T][4];
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < 4; ++i) ac[t][i] = af[t][i] = _mm512_setzero_si512();
    const int64_t stop = std::min(K, (g + 1) * group);
    for (int64_t k = g * group; k < stop; k += 4) {
      __builtin_prefetch(block + k * 32 + kInt4PrefetchBytes, 0, 3);  // this block's rows ahead, then the next's
      __builtin_prefetch(block + k * 32 + kInt4PrefetchBytes + 64, 0, 3);
      const __m512i first = _mm512_loadu_si512(block + k * 32), second = _mm512_loadu_si512(block + k * 32 + 64);
      const __m512i lo = _mm512_permutex2var_epi8(first, low_rows, second);
      const __m512i hi = _mm512_permutex2var_epi8(first, high_rows, second);
      __m512i q[4];
      q[0] = _mm512_and_si512(lo, nibble);
      q[1] = _mm512_and_si512(hi, nibble);
      q[2] = _mm512_and_si512(_mm512_srli_epi16(lo, 4), nibble);
      q[3] = _mm512_and_si512(_mm512_srli_epi16(hi, 4), nibble);
      for (int t = 0; t < T; ++t) {
        int32_t cw, fw;
        std::memcpy(&cw, c + t * K + k, 4);
        std::memcpy(&fw, f + t * K + k, 4);
        const __m512i cv = _mm512_set1_epi32(cw), fv = _mm512_set1_epi32(fw);
        for (int i = 0; i < 4; ++i) {
          ac[t][i] = _mm512_dpbusd_epi32(ac[t][i], q[i], cv);
          af[t][i] = _mm512_dpbusd_epi32(af[t][i], q[i], fv);
        }
      }
    }
    for (int i = 0; i < 4; ++i) {
      const __m512 sv = _mm512_loadu_ps(s + g * N + 16 * i);
      const __m512 hv = _mm512_loadu_ps(h + g * N + 16 * i);
      for (int t = 0; t < T; ++t) {
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(af[t][i]), _mm512_set1_ps(1.f / 254.f),
                                         _mm512_cvtepi32_ps(ac[t][i]));
        out[t][i] = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_set1_ps(step[t])), v, out[t][i]);
        out[t][i] = _mm512_fnmadd_ps(hv, _mm512_set1_ps(sums[t * G + g]), out[t][i]);
      }
    }
  }
  const __m256i nibble256 = _mm256_set1_epi8(15);
  for (int64_t j = 0; j < C; ++j) {  // the left-out channels: scale q x in float32
    const int64_t k = channels[j], g = k / group;
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + k * 32));
    const __m256i lo = _mm256_and_si256(v, nibble256), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble256);
    const __m128i parts[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1), _mm256_castsi256_si128(hi),
                              _mm256_extracti128_si256(hi, 1)};
    for (int i = 0; i < 4; ++i) {
      const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[i])),
                                          _mm512_loadu_ps(s + g * N + 16 * i));
      for (int t = 0; t < T; ++t) out[t][i] = _mm512_fmadd_ps(scaled, _mm512_set1_ps(values[t * C + j]), out[t][i]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(y + t * N + 16 * i, out[t][i]);
}

at::Tensor int4_blocks_vnni_matmul(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale,
                                   const at::Tensor& shift, int64_t group, const c10::optional<at::Tensor>& bias,
                                   int64_t outliers) {
  const at::Tensor x = float_rows(input);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t blocks = int4_blocks_checked(packed, scale, shift, K, group), N = blocks * 64;
  TORCH_CHECK(K % 4 == 0 && group % 4 == 0, "the VNNI int4 loop reads 4 inputs at a time: K and group must be "
              "multiples of 4");
  const int64_t G = (K + group - 1) / group;
  const float* xp = x.data_ptr<float>();
  const TokenCodes a = token_codes(xp, M, K, outliers);
  const std::vector<float> sums = group_sums(xp, M, K, group);
  const int64_t C = static_cast<int64_t>(a.channels.size());
  auto y = at::empty({M, N}, x.options());
  const uint8_t* bp = packed.data_ptr<uint8_t>();
  const int8_t* cp = a.codes.data_ptr<int8_t>();
  const float *sp = scale.data_ptr<float>(), *hp = shift.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t m0 = 0; m0 < M; m0 += kVnniTokens) {
        const uint8_t* block = bp + b * K * 32;
        const int8_t *c = cp + m0 * K, *f = cp + (M + m0) * K;
        float* yr = yp + m0 * N + b * 64;
        if (M - m0 >= 2)
          int4_block_vnni<2>(block, c, f, a.step.data() + m0, K, group, G, sp + b * 64, hp + b * 64, N,
                             sums.data() + m0 * G, a.channels.data(), C, a.values.data() + m0 * C, yr);
        else
          int4_block_vnni<1>(block, c, f, a.step.data() + m0, K, group, G, sp + b * 64, hp + b * 64, N,
                             sums.data() + m0 * G, a.channels.data(), C, a.values.data() + m0 * C, yr);
      }
  });
  return shaped_like(y, input, bias);
}
#endif

bool vnni_int4() {
#if defined(AGENTOS_VNNI)
  return true;
#else
  return false;
#endif
}

// The steps above as ops of their own, for tests: the grids and the int4 weights' int8 grid.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_tokens_quantize(const at::Tensor& x, int64_t outliers,
                                                                                 bool residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(outliers >= 0 && outliers <= K, "outliers must be in [0, ", K, "]");
  auto codes = at::empty({residual ? 2 * M : M, K}, x.options().dtype(at::kChar));
  auto step = at::empty({M}, x.options());
  auto sums = at::empty({M}, x.options());
  const std::vector<int64_t> order = quantize_tokens(x.data_ptr<float>(), M, K, outliers, residual,
                                                     codes.data_ptr<int8_t>(), step.data_ptr<float>(),
                                                     sums.data_ptr<float>());
  auto channels = at::empty({outliers}, x.options().dtype(at::kLong));
  std::copy(order.begin(), order.end(), channels.data_ptr<int64_t>());
  return {codes, step, sums, channels};
}

at::Tensor int4_blocks_to_int8(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& row_scale, int64_t K, int64_t group) {
  const int64_t blocks = int4_blocks_checked(packed, scale, shift, K, group), N = blocks * 64;
  const float* rp = optional_vector(row_scale, N, "row_scale");
  auto out = at::empty({K, N}, packed.options().dtype(at::kChar));
  int4_blocks_to_int8_into(packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), shift.data_ptr<float>(), rp, blocks,
                           K, group, out.data_ptr<int8_t>());
  return out;
}

// The dequantize ops' `out` [N, K] float32 and their rows' `zero`, `scale` [N, groups] float32 checked; returns
// the number of groups.
int64_t dequantize_checked(const at::Tensor& zero, const at::Tensor& scale, int64_t group, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.is_contiguous(),
              "out: contiguous float32 [N, K]");
  TORCH_CHECK(group > 0, "group must be positive");
  const int64_t N = out.size(0), G = (out.size(1) + group - 1) / group;
  for (const at::Tensor* t : {&zero, &scale}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N * G,
                "zero and scale: float32 [N, groups]");
  }
  return G;
}

// One row as the reference dequantizes it: o[k] = (code(k) - z[g]) * s[g], one subtraction and one multiplication in
// float32 (`qmath.dequantize_codes`' numbers, bit for bit).
template <typename Code>
inline void dequantize_row(const Code& code, const float* z, const float* s, int64_t K, int64_t group,
                           float* __restrict__ o) {
  for (int64_t g = 0; g * group < K; ++g) {
    const int64_t stop = std::min(K, (g + 1) * group);
#pragma omp simd
    for (int64_t k = g * group; k < stop; ++k) o[k] = (code(k) - z[g]) * s[g];
  }
}

// The int4 blocks' weights as float32 rows [N, K] at `out` (`zero`, `scale`: the layer's [N, groups] in float32).
// Each block's K x 32 bytes are first transposed into a buffer of the thread, so every row then reads its codes one
// after another and the loop vectorises.
void int4_blocks_dequantize(const at::Tensor& packed, const at::Tensor& zero, const at::Tensor& scale, int64_t group,
                            const at::Tensor& out) {
  const int64_t G = dequantize_checked(zero, scale, group, out), N = out.size(0), K = out.size(1);
  TORCH_CHECK(N % 64 == 0 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.numel() * 2 == N * K, "packed: contiguous uint8 blocks [N / 64, K, 32]");
  const uint8_t* bp = packed.data_ptr<uint8_t>();
  const float* zp = zero.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N / 64, 1, [bp, zp, sp, op, G, K, group](int64_t begin, int64_t end) {
    std::vector<uint8_t> rows(32 * K);  // the block's bytes, [32, K]: byte j of input k at j * K + k
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint8_t* bytes = bp + blk * K * 32;
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < 32; ++j) rows[j * K + k] = bytes[k * 32 + j];
      }
      for (int64_t j = 0; j < 64; ++j) {
        const int64_t n = blk * 64 + j;
        const uint8_t* __restrict__ codes = rows.data() + (j % 32) * K;
        const int nibble = j < 32 ? 0 : 4;  // rows 32-63 of the block are the high nibbles
        const auto code = [codes, nibble](int64_t k) { return static_cast<float>((codes[k] >> nibble) & 15); };
        dequantize_row(code, zp + n * G, sp + n * G, K, group, op + n * K);
      }
    }
  });
}

// int8 code rows [N, K] (the int8 kernel's `q - 128`) as float32 rows at `out`; `zero` shifted by -128 like the codes.
void int8_rows_dequantize(const at::Tensor& codes, const at::Tensor& zero, const at::Tensor& scale, int64_t group,
                          const at::Tensor& out) {
  const int64_t G = dequantize_checked(zero, scale, group, out), N = out.size(0), K = out.size(1);
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.numel() == N * K,
              "codes: contiguous int8 [N, K]");
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* zp = zero.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [cp, zp, sp, op, G, K, group](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* __restrict__ c = cp + n * K;
      const auto code = [c](int64_t k) { return static_cast<float>(c[k]); };
      dequantize_row(code, zp + n * G, sp + n * G, K, group, op + n * K);
    }
  });
}

at::Tensor int8_rows_act_matmul_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                     const c10::optional<at::Tensor>& zero_term,
                                     const c10::optional<at::Tensor>& bias, int64_t outliers) {
  return output_meta(x, w.size(0));
}

at::Tensor int4_blocks_act_matmul_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                       const at::Tensor& shift, const at::Tensor& row_scale, int64_t group,
                                       const c10::optional<at::Tensor>& bias, int64_t outliers) {
  return output_meta(x, packed.numel() / (32 * x.size(-1)) * 64);
}

at::Tensor bf16_rows_matmul_meta(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return output_meta(x, w.size(0));
}

at::Tensor int8_rows_matmul_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                 const c10::optional<at::Tensor>& zero_term, const c10::optional<at::Tensor>& bias) {
  return output_meta(x, w.size(0));
}

at::Tensor int4_blocks_vnni_matmul_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                        const at::Tensor& shift, int64_t group, const c10::optional<at::Tensor>& bias,
                                        int64_t outliers) {
  return output_meta(x, packed.numel() / (32 * x.size(-1)) * 64);
}

at::Tensor int4_blocks_matmul_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                   const at::Tensor& shift, int64_t group, const c10::optional<at::Tensor>& bias) {
  return output_meta(x, packed.numel() / (32 * x.size(-1)) * 64);
}

// Writes back and drops a tensor's memory (its whole storage) from every cache level, so that the next call reads it
// from memory, as a model larger than the caches reads each layer's weights at every token: the dispatch times the
// paths so. x86-64: CLFLUSH per 64-byte line; elsewhere a no-op (the timings then see cached weights).
void evict(const at::Tensor& t) {
#if defined(__x86_64__)
  if (!t.defined() || t.device().type() != at::kCPU || !t.has_storage() || t.storage().data() == nullptr) return;
  const char* base = static_cast<const char*>(t.storage().data());
  const size_t bytes = t.storage().nbytes();
  for (size_t b = 0; b < bytes; b += 64) _mm_clflush(base + b);
  if (bytes > 0) _mm_clflush(base + bytes - 1);  // the last line, when the storage does not start on one
  _mm_mfence();
#endif
}

}  // namespace

TORCH_LIBRARY(agentos_native, m) {
  m.def("int8_rows_matmul(Tensor x, Tensor w, Tensor scale, Tensor? zero_term, Tensor? bias=None) -> Tensor");
  m.def("bf16_rows_matmul(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("int4_blocks_matmul(Tensor x, Tensor packed, Tensor scale, Tensor shift, int group, Tensor? bias=None) "
        "-> Tensor");
  m.def("int8_rows_act_matmul(Tensor x, Tensor w, Tensor scale, Tensor? zero_term, Tensor? bias, int outliers) "
        "-> Tensor");
  m.def("int4_blocks_act_matmul(Tensor x, Tensor packed, Tensor scale, Tensor shift, Tensor row_scale, int group, "
        "Tensor? bias, int outliers) -> Tensor");
  m.def("int4_blocks_vnni_matmul(Tensor x, Tensor packed, Tensor scale, Tensor shift, int group, Tensor? bias, "
        "int outliers) -> Tensor");
  m.def("vnni_int4() -> bool", &vnni_int4);  // whether this build has `int4_blocks_vnni_matmul`
  m.def("evict(Tensor t) -> ()");
  m.def("int8_tokens_quantize(Tensor x, int outliers, bool residual) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("int4_blocks_to_int8(Tensor packed, Tensor scale, Tensor shift, Tensor row_scale, int K, int group) "
        "-> Tensor");
  m.def("int4_blocks_dequantize(Tensor packed, Tensor zero, Tensor scale, int group, Tensor(a!) out) -> ()");
  m.def("int8_rows_dequantize(Tensor codes, Tensor zero, Tensor scale, int group, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(agentos_native, CPU, m) {
  m.impl("int8_rows_matmul", &int8_rows_matmul);
  m.impl("bf16_rows_matmul", &bf16_rows_matmul);
  m.impl("int4_blocks_matmul", &int4_blocks_matmul);
  m.impl("int8_rows_act_matmul", &int8_rows_act_matmul);
  m.impl("int4_blocks_act_matmul", &int4_blocks_act_matmul);
  m.impl("int8_tokens_quantize", &int8_tokens_quantize);
  m.impl("evict", &evict);
#if defined(AGENTOS_VNNI)
  m.impl("int4_blocks_vnni_matmul", &int4_blocks_vnni_matmul);
#endif
  m.impl("int4_blocks_to_int8", &int4_blocks_to_int8);
  m.impl("int4_blocks_dequantize", &int4_blocks_dequantize);
  m.impl("int8_rows_dequantize", &int8_rows_dequantize);
}

TORCH_LIBRARY_IMPL(agentos_native, Meta, m) {
  m.impl("int8_rows_matmul", &int8_rows_matmul_meta);
  m.impl("bf16_rows_matmul", &bf16_rows_matmul_meta);
  m.impl("int4_blocks_matmul", &int4_blocks_matmul_meta);
  m.impl("int8_rows_act_matmul", &int8_rows_act_matmul_meta);
  m.impl("int4_blocks_act_matmul", &int4_blocks_act_matmul_meta);
  m.impl("int4_blocks_vnni_matmul", &int4_blocks_vnni_matmul_meta);
}
