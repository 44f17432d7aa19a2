// Dynamic routing (Procedure 1 of Sabour et al. 2017) fused for the CPU with the votes that feed
// it (Eq. 2, u_hat_j|i = W_ij u_i), forward and backward: the same values and gradients as
// CapsNet's raw_votes and DynamicRouting, to float rounding. Also, at the end, the primary
// capsules' squash (Eq. 1) from the convolution's output, and that convolution's input gradient.
//
// Forward computes the votes input by input for a few examples at a time, so each W_i is read
// once per group rather than once per example, into a buffer where each example's votes lie
// together (368 KB at 28x28 in bf16) and stay in cache while it routes. It adds them up as it
// makes them (s_0), then reads them r - 1 times (the logit update, the softmax and the next
// weighted sum share one pass). Backward makes the votes again the same way and reads them
// r - 1 times more. It never writes grad u_hat: a second pass, input by input over the whole
// batch, forms it from what routing saved and turns it straight into grad u and grad W, the
// products torch's matmul backward would otherwise make from it in memory.
// Capsules are 16 wide: one 16-lane vector, and at most 16 outputs J and 16 input dimensions.
// W comes in the capsules' dtype, as autocast's bf16 matmul takes it: a bf16 W halves the
// bytes every group of examples reads, the votes' largest memory stream at 36x36. Its
// gradient is float32 (float64 for float64 capsules), as the parameter is. bf16 values are
// widened, and the votes rounded to bf16 as a bf16 matmul would round them. All arithmetic
// is float32 (float64 for float64 capsules). GCC vector extensions:
// the compiler picks the instructions (AVX-512, AVX2 or SSE) for the CPU it builds on, and the
// loops that keep many sums live use vectors of its register width (Register, below).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int kLanes = 16;  // the capsule dimension D, and the padded number of outputs J

// One capsule (or one padded row of logits) as a GCC vector; shuffle masks of its lane width.
template <typename Acc>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float Vec __attribute__((vector_size(kLanes * 4)));
  typedef int32_t Mask __attribute__((vector_size(kLanes * 4)));
};
template <>
struct Lanes<double> {
  typedef double Vec __attribute__((vector_size(kLanes * 8)));
  typedef int64_t Mask __attribute__((vector_size(kLanes * 8)));
};
template <typename Acc>
using Vec = typename Lanes<Acc>::Vec;
template <typename Acc>
using Mask = typename Lanes<Acc>::Mask;

// A vector V from memory, as it lies there.
template <typename V, typename T>
V load_vector(const T* p) {
  V out;
  std::memcpy(&out, p, sizeof out);
  return out;
}

// A float32 vector V from bfloat16s, with Halves and Words the uint16 and uint32 vectors of its
// lane count: exact, they are its high 16 bits. For 16 lanes on AVX-512, one zero-extending load
// and a shift: GCC 12 splits the vector form into halves, six instructions per 16 values.
template <typename V, typename Halves, typename Words>
V widen_bfloat16(const uint16_t* p) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16);
    return load_vector<V>(&wide);
  }
#endif
  const Words wide = __builtin_convertvector(load_vector<Halves>(p), Words) << 16;
  return load_vector<V>(&wide);
}

template <typename Acc>
Vec<Acc> load(const Acc* p) {
  return load_vector<Vec<Acc>>(p);
}

using Bits = uint32_t __attribute__((vector_size(kLanes * 4)));  // a float32 vector's bits
using Half = uint16_t __attribute__((vector_size(kLanes * 2)));  // a bfloat16 vector's

Vec<float> load(const uint16_t* p) { return widen_bfloat16<Vec<float>, Half, Bits>(p); }

// The widest vector the CPU's registers hold. GCC splits a wider Vec (16 floats on an AVX2 CPU)
// into halves, and in loops that keep many of them live it keeps those halves on the stack:
// those loops (the votes, the per-input dot products, grad u_hat, grad W and grad u) are
// written with these instead, so that their sums stay in registers. A build may name the width
// (-DCAPSLAB_REGISTER_BYTES=32 or 64): GCC then splits wider vectors into the registers it has,
// so the tests run the code the other kind of CPU builds (tests/conftest.py).
#if defined(CAPSLAB_REGISTER_BYTES)
constexpr int kRegisterBytes = CAPSLAB_REGISTER_BYTES;
#elif defined(__AVX512F__)
constexpr int kRegisterBytes = 64;
#else
constexpr int kRegisterBytes = 32;
#endif
static_assert(kRegisterBytes == 32 || kRegisterBytes == 64, "registers of 32 or 64 bytes");
template <typename Acc>
struct Register {
  typedef Acc Vec __attribute__((vector_size(kRegisterBytes)));
  typedef std::conditional_t<sizeof(Acc) == 4, int32_t, int64_t> Lane;
  typedef Lane Mask __attribute__((vector_size(kRegisterBytes)));
  static constexpr int kLanes = kRegisterBytes / sizeof(Acc);
  static constexpr int kParts = ::kLanes / kLanes;  // registers per capsule
  static Vec load(const Acc* p) { return load_vector<Vec>(p); }
  static Vec load(const uint16_t* p) {  // Acc is float
    typedef uint16_t Halves __attribute__((vector_size(kRegisterBytes / 2)));
    typedef uint32_t Words __attribute__((vector_size(kRegisterBytes)));
    return widen_bfloat16<Vec, Halves, Words>(p);
  }
};

template <typename Acc>
void store(Vec<Acc> x, Acc* p) {
  std::memcpy(p, &x, sizeof x);
}

// float32 bits -> bfloat16 rounded to nearest even, in the high 16 bits, for a word or a vector
// of words; not for NaN, which the callers make quiet.
template <typename Words>
Words rounded_to_bfloat16(Words bits) {
  return (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
}

// float32 -> bfloat16 rounded to nearest even, in the high 16 bits of each lane (NaN: quiet).
// A register at a time: GCC makes the NaN test of a vector wider than the registers lane by
// lane, with a scalar compare and branch-free select for each of the 16.
Bits bfloat16_bits(Vec<float> x) {
  using R = Register<float>;
  typedef uint32_t Words __attribute__((vector_size(kRegisterBytes)));
  R::Vec parts[R::kParts];
  std::memcpy(parts, &x, sizeof x);
  Words out[R::kParts];
  for (int part = 0; part < R::kParts; ++part) {
    Words bits;
    std::memcpy(&bits, &parts[part], sizeof bits);
    const Words rounded = rounded_to_bfloat16(bits);
    const Words nan = (Words)(parts[part] != parts[part]);  // all ones where NaN
    out[part] = (rounded & ~nan) | (nan & 0x7FC00000u);
  }
  return load_vector<Bits>(out);
}

void store(Vec<float> x, uint16_t* p) {
  Half half = __builtin_convertvector(bfloat16_bits(x) >> 16, Half);
  std::memcpy(p, &half, sizeof half);
}

inline float widen(uint16_t x) {  // one bfloat16 -> float32
  const uint32_t bits = uint32_t(x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }

// The first `count` lanes of x into p, in p's type.
template <typename In, typename Acc>
void store_first(Vec<Acc> x, In* p, int64_t count) {
  In lanes[kLanes];
  store(x, lanes);
  std::memcpy(p, lanes, count * sizeof(In));
}

// Rotation by `step` lanes, and reductions in four rotations instead of fifteen steps in a row.
template <typename Acc, int step>
Vec<Acc> rotate(Vec<Acc> x) {
  using M = Mask<Acc>;
  constexpr int k = step;
  return __builtin_shuffle(x, M{k % 16, (k + 1) % 16, (k + 2) % 16, (k + 3) % 16, (k + 4) % 16,
                                (k + 5) % 16, (k + 6) % 16, (k + 7) % 16, (k + 8) % 16,
                                (k + 9) % 16, (k + 10) % 16, (k + 11) % 16, (k + 12) % 16,
                                (k + 13) % 16, (k + 14) % 16, (k + 15) % 16});
}

template <typename Acc>
Acc sum(Vec<Acc> x) {
  x += rotate<Acc, 8>(x);
  x += rotate<Acc, 4>(x);
  x += rotate<Acc, 2>(x);
  x += rotate<Acc, 1>(x);
  return x[0];
}

template <typename Acc>
Vec<Acc> larger(Vec<Acc> x, Vec<Acc> y) {
  return x > y ? x : y;
}

template <typename Acc>
Acc max(Vec<Acc> x) {
  x = larger<Acc>(x, rotate<Acc, 8>(x));
  x = larger<Acc>(x, rotate<Acc, 4>(x));
  x = larger<Acc>(x, rotate<Acc, 2>(x));
  x = larger<Acc>(x, rotate<Acc, 1>(x));
  return x[0];
}

// Lane k of the result is sum(p[k]), for as many vectors as V has lanes (L): log2(L) rounds of
// pairwise shuffles and adds instead of L separate horizontal sums. Each round halves the lanes
// a vector's partial sums take up, and leaves lane k holding vector bitreverse(k), so the input
// is bit-reversed first. In the round that keeps h lanes per vector, lane m of the low (high)
// shuffle is lane m of the pair's first vector where m % 2h < h, of its second where not, in
// both cases shifted down by the lanes of the other half that m's block skips (plus h).
constexpr int pair_lane(int m, int lanes, int h, bool high) {
  const int position = m % (2 * h), base = m - position;
  return (position < h ? base + position : lanes + base + position - h) + (high ? h : 0);
}

template <typename M, int lanes, int h, bool high, size_t... m>
constexpr M pair_mask(std::index_sequence<m...>) {
  return M{pair_lane(int(m), lanes, h, high)...};
}

constexpr int bit_reversed(int k, int lanes) {
  int out = 0;
  for (int bit = 1; bit < lanes; bit <<= 1, k >>= 1) out = (out << 1) | (k & 1);
  return out;
}

template <typename V, typename M, int lanes, int h>
__attribute__((always_inline)) inline void pair_rounds(V* level) {
  if constexpr (h >= 1) {
    constexpr M low = pair_mask<M, lanes, h, false>(std::make_index_sequence<lanes>{});
    constexpr M high = pair_mask<M, lanes, h, true>(std::make_index_sequence<lanes>{});
#pragma GCC unroll 8
    for (int k = 0; k < h; ++k)
      level[k] = __builtin_shuffle(level[2 * k], level[2 * k + 1], low) +
                 __builtin_shuffle(level[2 * k], level[2 * k + 1], high);
    pair_rounds<V, M, lanes, h / 2>(level);
  }
}

template <typename V, typename M, int lanes>
__attribute__((always_inline)) inline V sums(const V* p) {
  V level[lanes];
#pragma GCC unroll 16
  for (int k = 0; k < lanes; ++k) level[k] = p[bit_reversed(k, lanes)];
  pair_rounds<V, M, lanes, lanes / 2>(level);
  return level[0];
}

template <typename Acc>
__attribute__((always_inline)) inline Vec<Acc> sums(const Vec<Acc>* p) {  // one capsule each
  return sums<Vec<Acc>, Mask<Acc>, kLanes>(p);
}

// e^x for x <= 0, lane by lane. float32: Cephes' expf polynomial (about 1 ulp), exact 0 below
// e^-87.3; float64: the library's exp.
template <typename Acc>
Vec<Acc> exp_nonpositive(Vec<Acc> x) {
  if constexpr (sizeof(Acc) == 8) {
    for (int k = 0; k < kLanes; ++k) x[k] = std::exp(x[k]);
    return x;
  } else {
    const Vec<float> lowest = x < -87.3f ? Vec<float>{} + 0.0f : Vec<float>{} + 1.0f;
    x = x < -87.3f ? Vec<float>{} - 87.3f : x;
    Vec<float> n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln 2)
    Vec<float> r = x - n * 0.693359375f + n * 2.12194440e-4f;                // x - n ln 2
    Vec<float> p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    using Int = int32_t __attribute__((vector_size(kLanes * 4)));
    Int scale_bits = (__builtin_convertvector(n, Int) + 127) << 23;  // 2^n
    Vec<float> scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale * lowest;
  }
}

// Eq. 1 as CapsNet.squash computes it: t = s / m, m = max(max_d |s_d|, 1), q = |t|^2,
// a = 1 / m^2, v = t q / (a + q) / sqrt(q + EPS a).
template <typename Acc>
Vec<Acc> squash(Vec<Acc> s, Acc eps) {
  Acc m = max<Acc>(s < 0 ? -s : s);
  Acc inv = Acc(1) / (m > 1 ? m : Acc(1));
  Vec<Acc> t = s * inv;
  Acc q = sum<Acc>(t * t), a = inv * inv;
  return t * (q / (a + q) / std::sqrt(q + eps * a));
}

// Vector-Jacobian product of squash at s, with m held constant as in CapsNet.squash:
// v = t f(q), f(q) = q / (a + q) / sqrt(q + e), f'(q) = (a (q + e) - q (a + q) / 2) /
// ((a + q)^2 (q + e)^(3/2)), and grad s = (f grad v + 2 f'(q) (grad v . t) t) / m.
template <typename Acc>
Vec<Acc> squash_backward(Vec<Acc> s, Vec<Acc> grad_v, Acc eps) {
  Acc m = max<Acc>(s < 0 ? -s : s);
  Acc inv = Acc(1) / (m > 1 ? m : Acc(1));
  Vec<Acc> t = s * inv;
  Acc q = sum<Acc>(t * t), dot = sum<Acc>(grad_v * t), a = inv * inv, e = eps * a;
  Acc root = std::sqrt(q + e);
  Acc f = q / (a + q) / root;
  Acc df = (a * (q + e) - Acc(0.5) * q * (a + q)) / ((a + q) * (a + q) * (q + e) * root);
  return (grad_v * f + t * (Acc(2) * dot * df)) * inv;
}

struct Shape {
  int64_t inputs, batch, outputs, iterations, in_dim;  // I, B, J, r, and K (u_i is K-D)
  int64_t width() const { return outputs * kLanes; }  // one input's votes, J x 16
  int64_t blocks() const { return (inputs + kLanes - 1) / kLanes; }
  // Per-input values (b_ij, c_ij, G_ij) are stored by blocks of 16 inputs: (I/16, J, 16),
  // so that a vector holds one output's value for 16 inputs.
  int64_t slot() const { return blocks() * outputs * kLanes; }
};

// Lane k of the result: u_hat_{i0+k, j} . x, for the n <= 16 inputs of the block. In registers
// of the CPU's width: on AVX2, each dot product is two registers' products added, and each half
// of the result is one reduction of 8 registers. `full` (n = 16) is every block but a last
// partial one: there GCC 12 keeps the products in registers, where with a run-time n it keeps
// them on the stack (read in the AVX-512 build; results/README § "The AVX-512 build").
template <bool full, typename In, typename Acc>
__attribute__((always_inline)) inline Vec<Acc> block_dots_of(const In* block, int64_t n,
                                                             int64_t stride, int64_t j,
                                                             Vec<Acc> x) {
  using R = Register<Acc>;
  constexpr int L = R::kLanes, parts = R::kParts;
  typename R::Vec x_parts[parts];
  std::memcpy(x_parts, &x, sizeof x);
  Acc out[kLanes];
#pragma GCC unroll 2
  for (int k0 = 0; k0 < kLanes; k0 += L) {
    typename R::Vec products[L];
#pragma GCC unroll 16
    for (int k = 0; k < L; ++k) {
      products[k] = typename R::Vec{};
      if (full || k0 + k < n)
#pragma GCC unroll 2
        for (int part = 0; part < parts; ++part)
          products[k] += R::load(block + (k0 + k) * stride + j * kLanes + part * L) * x_parts[part];
    }
    const typename R::Vec total = sums<typename R::Vec, typename R::Mask, L>(products);
    std::memcpy(out + k0, &total, sizeof total);
  }
  return load(out);
}

template <typename In, typename Acc>
Vec<Acc> block_dots(const In* block, int64_t n, int64_t stride, int64_t j, Vec<Acc> x) {
  return n == kLanes ? block_dots_of<true, In, Acc>(block, n, stride, j, x)
                     : block_dots_of<false, In, Acc>(block, n, stride, j, x);
}

// sum_k weights[k] u_hat_{i0+k, j}, for the n inputs of the block. The weights come from
// memory, where a broadcast of one is a load: taking lane k of a vector that spans two
// registers costs shuffles.
template <typename In, typename Acc>
Vec<Acc> block_weighted_sum(const In* block, int64_t n, int64_t stride, int64_t j,
                            const Acc* weights) {
  using R = Register<Acc>;
  constexpr int L = R::kLanes, parts = R::kParts;
  typename R::Vec total[parts] = {};
  for (int64_t k = 0; k < n; ++k)
    for (int part = 0; part < parts; ++part)
      total[part] += weights[k] * R::load(block + k * stride + j * kLanes + part * L);
  Vec<Acc> out;
  std::memcpy(&out, total, sizeof out);
  return out;
}

// Adds one example's votes (J, 16) to its sums over the inputs, `sums` (J vectors), as they
// were stored (rounded to In), as the later passes read them.
template <typename In, typename Acc>
void add_stored_votes(const In* votes, int64_t J, Vec<Acc>* sums) {
  for (int64_t j = 0; j < J; ++j) sums[j] += load(votes + j * kLanes);
}

// Eq. 2 for examples [begin, end): votes (end - begin, I, J*16) = W_ij u_bi, with u (B, I, K)
// and W (I, K, J*16). Input by input, so that W_i is loaded once for all of these examples. kJ and
// kK, when not 0, are J and K known at compile time: the sums over k then run side by side
// for every j, in registers, rather than one after another. With `totals` (end - begin, J)
// vectors, also add up sum_i u_hat_bij there, in input order, while the votes are in cache:
// forward's first pass over them.
template <typename In, typename Acc, int kJ, int kK>
void compute_votes(const In* u, const In* W, Shape n, int64_t begin, int64_t end, In* votes,
                   Vec<Acc>* totals) {
  const int64_t I = n.inputs, J = kJ ? kJ : n.outputs, K = kK ? kK : n.in_dim;
  const int64_t width = J * kLanes;  // n.width(), known at compile time with kJ
  std::vector<Vec<Acc>> weights(K * J);  // W_i: (K, J) vectors
  const Acc* flat_weights = reinterpret_cast<const Acc*>(weights.data());
  using R = Register<Acc>;
  constexpr int kChunk = 10;  // sums held in registers at once, with room for the broadcast u
  const int64_t registers = width / R::kLanes;  // one input's votes, in registers
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t k = 0; k < K; ++k)
      for (int j = 0; j < J; ++j) weights[k * J + j] = load(W + (i * K + k) * width + j * kLanes);
    for (int64_t b = begin; b < end; ++b) {
      const In* u_bi = u + (b * I + i) * K;
      In* out = votes + ((b - begin) * I + i) * width;
      Acc row[kLanes * kLanes];  // u_hat_bi: (J, 16), where In needs rounding
      Acc* sums_to = std::is_same_v<In, Acc> ? reinterpret_cast<Acc*>(out) : row;
      for (int64_t r0 = 0; r0 < registers; r0 += kChunk) {
        typename R::Vec total[kChunk];
        for (int c = 0; c < kChunk; ++c) total[c] = typename R::Vec{};
        for (int64_t k = 0; k < K; ++k) {
          const Acc u_bik = widen(u_bi[k]);
          const Acc* W_ik = flat_weights + k * width + r0 * R::kLanes;
          for (int c = 0; c < kChunk; ++c)
            if (r0 + c < registers) total[c] += u_bik * R::load(W_ik + c * R::kLanes);
        }
        for (int c = 0; c < kChunk; ++c)
          if (r0 + c < registers)
            std::memcpy(sums_to + (r0 + c) * R::kLanes, &total[c], sizeof total[c]);
      }
      if constexpr (!std::is_same_v<In, Acc>)
        for (int j = 0; j < J; ++j) store(load(row + j * kLanes), out + j * kLanes);
      if (totals) add_stored_votes<In, Acc>(out, J, totals + (b - begin) * J);
    }
  }
}

#if defined(__AVX512BF16__)
// compute_votes for bf16 capsules with AVX512-BF16's dot product of pairs (vdpbf16ps): each
// instruction adds two products to each float32 lane, u_i,2p W_i,2p + u_i,2p+1 W_i,2p+1, so
// half the multiply-adds, and W_i is paired from its bf16 rows with one permute a register
// rather than widened. The products are exact in float32; the sums run in another order than
// compute_votes' (pair by pair), and the instruction treats subnormals as zero.
template <int kJ, int kK>
void compute_votes_paired(const uint16_t* u, const uint16_t* W, Shape n, int64_t begin,
                          int64_t end, uint16_t* votes, Vec<float>* totals) {
  static_assert(kK % 2 == 0, "pairs of input dimensions");
  constexpr int64_t width = kJ * kLanes, pairs = kK / 2;
  const int64_t I = n.inputs;
  alignas(64) uint16_t order[2 * kLanes];  // lane 2m: word m of row 2p; lane 2m + 1: of row 2p + 1
  for (int m = 0; m < kLanes; ++m) order[2 * m] = m, order[2 * m + 1] = 2 * kLanes + m;
  const __m512i interleave = _mm512_load_si512(order);
  __m512bh weights[pairs * kJ];  // lane d of weights[p * kJ + j]: W_i,2p,jd and W_i,2p+1,jd
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t p = 0; p < pairs; ++p)
      for (int j = 0; j < kJ; ++j) {
        const uint16_t* row = W + (i * kK + 2 * p) * width + j * kLanes;
        const __m512i even = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)row));
        const __m512i odd =
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(row + width)));
        weights[p * kJ + j] = (__m512bh)_mm512_permutex2var_epi16(even, interleave, odd);
      }
    for (int64_t b = begin; b < end; ++b) {
      const uint16_t* u_bi = u + (b * I + i) * kK;
      uint16_t* out = votes + ((b - begin) * I + i) * width;
      __m512 total[kJ];
      for (int j = 0; j < kJ; ++j) total[j] = _mm512_setzero_ps();
      for (int64_t p = 0; p < pairs; ++p) {
        int32_t pair;  // u_bi,2p in the low half, as the weights' pairs lie
        std::memcpy(&pair, u_bi + 2 * p, sizeof pair);
        const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < kJ; ++j) total[j] = _mm512_dpbf16_ps(total[j], weights[p * kJ + j], x);
      }
      for (int j = 0; j < kJ; ++j) store(load_vector<Vec<float>>(&total[j]), out + j * kLanes);
      if (totals) add_stored_votes<uint16_t, float>(out, kJ, totals + (b - begin) * kJ);
    }
  }
}
#endif

// The shapes CapsNet has (J = 10 digit capsules of 8-D inputs) compiled for; others at run time.
template <typename In, typename Acc>
void compute_votes_any(const In* u, const In* W, Shape n, int64_t begin, int64_t end,
                       In* votes, Vec<Acc>* totals) {
  if (n.outputs == 10 && n.in_dim == 8) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<In, uint16_t>)
      return compute_votes_paired<10, 8>(u, W, n, begin, end, votes, totals);
#endif
    compute_votes<In, Acc, 10, 8>(u, W, n, begin, end, votes, totals);
  } else
    compute_votes<In, Acc, 0, 0>(u, W, n, begin, end, votes, totals);
}

// One example's forward from its votes (I, J*16) and their sums over the inputs, `totals` (J):
// v (J, 16), c (J, I); saves s_t (r, 16, 16) and c_t (r, slot) for t >= 1. c_0 is uniform
// (1/J), stored only where it is the last (r = 1). `logits` (slot) is the caller's scratch.
template <typename In, typename Acc>
void forward_one(const In* votes, const Vec<Acc>* totals, Shape n, Acc eps, Acc* v_out,
                 Acc* c_out, Acc* saved_s, Acc* saved_c, Acc* logits) {
  const int64_t I = n.inputs, J = n.outputs, stride = n.width(), last = n.iterations - 1;
  const Vec<Acc> zero{};
  Vec<Acc> s[kLanes], v[kLanes];
  for (int j = 0; j < J; ++j) s[j] = totals[j] / Acc(J);  // c_0 is uniform: s_0 = sum_i u_hat_i / J
  if (last == 0)
    for (int64_t k = 0; k < n.slot(); k += kLanes) store(zero + Acc(1) / Acc(J), saved_c + k);
  for (int64_t t = 0;; ++t) {
    for (int j = 0; j < J; ++j) {
      store(s[j], saved_s + (t * kLanes + j) * kLanes);
      v[j] = squash(s[j], eps);
      s[j] = zero;
    }
    if (t == last) break;
    Acc* c_next = saved_c + (t + 1) * n.slot();
    for (int64_t i0 = 0; i0 < I; i0 += kLanes) {  // b += u_hat . v; c = softmax_j(b); s += c u_hat
      const In* block = votes + i0 * stride;
      const int64_t count = I - i0 < kLanes ? I - i0 : kLanes;
      Acc* b_block = logits + i0 * J;
      Vec<Acc> b[kLanes], top;
      for (int j = 0; j < J; ++j) {
        b[j] = block_dots<In, Acc>(block, count, stride, j, v[j]);
        if (t > 0) b[j] += load(b_block + j * kLanes);  // b_0 = 0
        if (t + 1 < last) store(b[j], b_block + j * kLanes);  // the last pass's b is not read
        top = j == 0 ? b[j] : larger<Acc>(top, b[j]);
      }
      Vec<Acc> total = zero;
      for (int j = 0; j < J; ++j) total += (b[j] = exp_nonpositive<Acc>(b[j] - top));
      for (int j = 0; j < J; ++j) {
        Acc* c_block = c_next + i0 * J + j * kLanes;
        store(b[j] / total, c_block);
        s[j] += block_weighted_sum<In, Acc>(block, count, stride, j, c_block);
      }
    }
  }
  for (int j = 0; j < J; ++j) store(v[j], v_out + j * kLanes);
  const Acc* c_last = saved_c + last * n.slot();
  for (int64_t i0 = 0; i0 < I; i0 += kLanes)  // slots of 16 inputs -> rows of c
    for (int j = 0; j < J; ++j)
      store_first<Acc, Acc>(load(c_last + i0 * J + j * kLanes), c_out + j * I + i0,
                            I - i0 < kLanes ? I - i0 : kLanes);
}

// One example's backward through routing, from grad v (J, 16): saves grad s_t and v_t (r, J, 16)
// for t >= first (first = r - 1 with detach_early, else 0), and G_t = dL/db_{t+1} for t < r - 1
// in scratch (r, slot), whose last slot is the running sum. votes_backward_range turns these
// into grad u and grad W.
template <typename In, typename Acc>
void backward_one(const In* votes, Shape n, bool detach_early, Acc eps, const Acc* saved_s,
                  const Acc* saved_c, const Acc* grad_v_in, Acc* scratch, Acc* grad_s_out,
                  Acc* v_out) {
  const int64_t I = n.inputs, J = n.outputs, stride = n.width(), last = n.iterations - 1;
  const Vec<Acc> zero{};
  Vec<Acc> grad_v[kLanes];
  Acc* running = scratch + last * n.slot();
  for (int64_t k = 0; k < n.slot(); k += kLanes) store(zero, running + k);
  for (int j = 0; j < J; ++j) grad_v[j] = load(grad_v_in + j * kLanes);
  for (int64_t t = last;; --t) {
    if (t < last) std::memcpy(scratch + t * n.slot(), running, n.slot() * sizeof(Acc));  // G_t
    Vec<Acc> grad_s[kLanes];
    for (int j = 0; j < J; ++j) {
      Vec<Acc> s = load(saved_s + (t * kLanes + j) * kLanes);
      store(squash(s, eps), v_out + (t * J + j) * kLanes);
      store(grad_s[j] = squash_backward(s, grad_v[j], eps), grad_s_out + (t * J + j) * kLanes);
    }
    if (detach_early || t == 0) break;  // c_0 is uniform; detached c_t carry no gradient
    // b_t feeds c_t (softmax over j) and b_{t+1}: G += c (grad c - sum_j c grad c), with
    // grad c_ij = u_hat_ij . grad s_j. Then v_{t-1} gets sum_i G_ij u_hat_ij.
    const Acc* c_t = saved_c + t * n.slot();
    for (int j = 0; j < J; ++j) grad_v[j] = zero;
    for (int64_t i0 = 0; i0 < I; i0 += kLanes) {
      const In* block = votes + i0 * stride;
      const int64_t count = I - i0 < kLanes ? I - i0 : kLanes;
      Vec<Acc> grad_c[kLanes], c[kLanes], mean = zero;
      for (int j = 0; j < J; ++j) {
        grad_c[j] = block_dots<In, Acc>(block, count, stride, j, grad_s[j]);
        c[j] = load(c_t + i0 * J + j * kLanes);
        mean += c[j] * grad_c[j];
      }
      for (int j = 0; j < J; ++j) {
        Acc* g_block = running + i0 * J + j * kLanes;
        Vec<Acc> g = load(g_block) + c[j] * (grad_c[j] - mean);
        store(g, g_block);
        grad_v[j] += block_weighted_sum<In, Acc>(block, count, stride, j, g_block);
      }
    }
  }
}

// Examples whose votes are made together, so each W_i is read once per group: a power of two, at
// most 8, whose votes fit in 4 MB (4 bf16 examples at 36x36, 8 at 28x28; 2 and 4 in float32).
// On Zen 4 larger buffers ran slower: the bf16 kernel at 36x36 took 48.6 ms a step with 8
// examples (8 MB), 41.9 with 4 and 44.4 with 2 (results/README.md § "Groups of votes by bytes").
constexpr int64_t kGroupBytes = int64_t(4) << 20;
template <typename In>
int64_t group_size(Shape n) {
  const int64_t example = n.inputs * n.width() * int64_t(sizeof(In));
  int64_t group = 1;
  while (group < 8 && 2 * group * example <= kGroupBytes) group *= 2;
  return group;
}

// Examples [begin, end) of the batch, a group at a time: the group's votes into a buffer of the
// calling thread's (at most 4 MB at CapsNet's shapes), then route(b, votes of b) for each example
// while its votes are in cache. The votes are never kept: backward makes them again, which costs
// less than writing and reading back a batch's votes (65 MB at 36x36), fresh pages from the OS
// at every step.
// With `add_up`, route also gets each example's votes summed over the inputs (J vectors).
template <typename In, typename Acc, typename Route>
void route_in_groups(const In* u, const In* W, Shape n, int64_t begin, int64_t end, bool add_up,
                     const Route& route) {
  const int64_t size = n.inputs * n.width();
  const int64_t group = group_size<In>(n);
  std::vector<In> votes(group * size);
  std::vector<Vec<Acc>> totals(group * n.outputs);
  for (int64_t first = begin; first < end; first += group) {
    const int64_t last = first + group < end ? first + group : end;
    std::fill(totals.begin(), totals.end(), Vec<Acc>{});
    compute_votes_any<In, Acc>(u, W, n, first, last, votes.data(),
                               add_up ? totals.data() : nullptr);
    for (int64_t b = first; b < last; ++b)
      route(b, votes.data() + (b - first) * size, totals.data() + (b - first) * n.outputs);
  }
}

template <typename In, typename Acc>
void forward_range(const In* u, const In* W, const int64_t* dims, int64_t begin, int64_t end,
                   double eps, Acc* v, Acc* c, Acc* saved_s, Acc* saved_c) {
  const Shape n{dims[0], dims[1], dims[2], dims[3], dims[4]};
  const int64_t I = n.inputs, J = n.outputs, r = n.iterations;
  std::vector<Acc> logits(n.slot());  // one example's at a time, in this thread's cache
  route_in_groups<In, Acc>(
      u, W, n, begin, end, true, [&](int64_t b, const In* votes, const Vec<Acc>* totals) {
        forward_one<In, Acc>(votes, totals, n, Acc(eps), v + b * J * kLanes, c + b * J * I,
                             saved_s + b * r * kLanes * kLanes, saved_c + b * r * n.slot(),
                             logits.data());
      });
}

template <typename In, typename Acc>
void backward_range(const In* u, const In* W, const int64_t* dims, int64_t begin, int64_t end,
                    int64_t detach_early, double eps, const Acc* saved_s, const Acc* saved_c,
                    const Acc* grad_v, Acc* scratch, Acc* grad_s, Acc* v) {
  const Shape n{dims[0], dims[1], dims[2], dims[3], dims[4]};
  const int64_t J = n.outputs, r = n.iterations;
  route_in_groups<In, Acc>(
      u, W, n, begin, end, false, [&](int64_t b, const In* votes, const Vec<Acc>*) {
        backward_one<In, Acc>(votes, n, detach_early != 0, Acc(eps),
                              saved_s + b * r * kLanes * kLanes, saved_c + b * r * n.slot(),
                              grad_v + b * J * kLanes, scratch + b * r * n.slot(),
                              grad_s + b * r * J * kLanes, v + b * r * J * kLanes);
      });
}

// Inputs [begin, end), each over the whole batch: grad u_hat_bij = sum_t c_t,bij grad s_t,bj +
// sum_{t < r-1} G_t,bij v_t,bj, then grad W_ij = sum_b grad u_hat_bij u_bi^T and grad u_bi =
// sum_j W_ij^T grad u_hat_bij. Each grad W_i is complete in one thread: no sums across threads.
// kJ and kK as for compute_votes; every loop keeps independent sums side by side.
template <typename In, typename Acc, int kJ, int kK>
void votes_backward(const In* u, const In* W, Shape n, int64_t begin, int64_t end,
                    int64_t first, const Acc* saved_c, const Acc* scratch, const Acc* grad_s,
                    const Acc* v, In* grad_u, Acc* grad_W) {
  const int64_t I = n.inputs, B = n.batch, J = kJ ? kJ : n.outputs, K = kK ? kK : n.in_dim;
  const int64_t width = n.width(), r = n.iterations, last = r - 1;
  using R = Register<Acc>;
  constexpr int L = R::kLanes, parts = R::kParts;
  std::vector<Vec<Acc>> grad_votes(B * J), weights(K * J);  // (B, J) and W_i's (K, J)
  const Acc* flat_grad_votes = reinterpret_cast<const Acc*>(grad_votes.data());
  const Acc* flat_weights = reinterpret_cast<const Acc*>(weights.data());
  std::vector<Acc> u_i(B * K);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t at = (i - i % kLanes) * J + i % kLanes;  // (i, j = 0) in a slot
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) u_i[b * K + k] = widen(u[(b * I + i) * K + k]);
      for (int j = 0; j < J; ++j) {
        typename R::Vec total[parts] = {};
        for (int64_t t = first; t <= last; ++t) {
          const int64_t row = b * r + t;
          // c_0 is uniform, not stored
          const Acc c = t == 0 ? Acc(1) / Acc(J) : saved_c[row * n.slot() + at + j * kLanes];
          const Acc G = t < last ? scratch[row * n.slot() + at + j * kLanes] : Acc(0);
          for (int part = 0; part < parts; ++part) {
            const int64_t lanes = (row * J + j) * kLanes + part * L;
            total[part] += c * R::load(grad_s + lanes);
            if (t < last) total[part] += G * R::load(v + lanes);
          }
        }
        std::memcpy(&grad_votes[b * J + j], total, sizeof total);
      }
    }
    for (int64_t k = 0; k < K; ++k)
      for (int j = 0; j < J; ++j) weights[k * J + j] = load(W + (i * K + k) * width + j * kLanes);
    for (int64_t q = 0; q < width; q += L) {  // grad W_i, a register's lanes at a time
      typename R::Vec total[kLanes];
      for (int64_t k = 0; k < K; ++k) total[k] = typename R::Vec{};
      for (int64_t b = 0; b < B; ++b) {
        const typename R::Vec grad = R::load(flat_grad_votes + b * width + q);
        for (int64_t k = 0; k < K; ++k) total[k] += u_i[b * K + k] * grad;
      }
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(grad_W + (i * K + k) * width + q, &total[k], sizeof total[k]);
    }
    for (int64_t b = 0; b < B; ++b) {
      Acc out[kLanes];  // out[k] = sum_j sum_d W_ijdk grad u_hat_bijd
      for (int64_t k0 = 0; k0 < K; k0 += L) {
        typename R::Vec products[L];  // lane d of products[k]: a part of the sum over d
        for (int k = 0; k < L; ++k) products[k] = typename R::Vec{};
        for (int64_t q = 0; q < width; q += L) {
          const typename R::Vec grad = R::load(flat_grad_votes + b * width + q);
          for (int k = 0; k < L; ++k)
            if (k0 + k < K) products[k] += R::load(flat_weights + (k0 + k) * width + q) * grad;
        }
        const typename R::Vec total = sums<typename R::Vec, typename R::Mask, L>(products);
        std::memcpy(out + k0, &total, sizeof total);
      }
      store_first<In, Acc>(load(out), grad_u + (b * I + i) * K, K);
    }
  }
}

// The same choice for votes_backward.
template <typename In, typename Acc>
void votes_backward_range(const In* u, const In* W, const int64_t* dims, int64_t begin,
                          int64_t end, int64_t first, const Acc* saved_c, const Acc* scratch,
                          const Acc* grad_s, const Acc* v, In* grad_u, Acc* grad_W) {
  const Shape n{dims[0], dims[1], dims[2], dims[3], dims[4]};
  const auto body = n.outputs == 10 && n.in_dim == 8 ? votes_backward<In, Acc, 10, 8>
                                                     : votes_backward<In, Acc, 0, 0>;
  body(u, W, n, begin, end, first, saved_c, scratch, grad_s, v, grad_u, grad_W);
}

// The primary capsules (Eq. 1), read from the PrimaryCaps convolution's output as it lies:
// s (B, C*D, P) with P = H*W positions, where capsule (c, p) is channels c*D .. c*D + D - 1 at
// p. The loops run over positions, a capsule per vector lane, one block of D channels (one
// example's channel c, block = b * C + c) at a time.

// Per position p of a block: inv_m[p] = 1 / m, m = max(max_d |s_d|, 1), and q[p] = |s / m|^2.
template <typename In, typename Acc>
void primary_norms(const In* s, int64_t D, int64_t P, Acc* inv_m, Acc* q) {
  for (int64_t p = 0; p < P; ++p) inv_m[p] = 1;  // m, then 1 / m in its place
  for (int64_t d = 0; d < D; ++d)
    for (int64_t p = 0; p < P; ++p) {
      const Acc x = std::abs(Acc(widen(s[d * P + p])));
      inv_m[p] = x > inv_m[p] ? x : inv_m[p];
    }
  for (int64_t p = 0; p < P; ++p) inv_m[p] = Acc(1) / inv_m[p];
  for (int64_t p = 0; p < P; ++p) q[p] = 0;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t p = 0; p < P; ++p) {
      const Acc t = Acc(widen(s[d * P + p])) * inv_m[p];
      q[p] += t * t;
    }
}

// u (B, C*P, D), capsule i = c*P + p, for blocks [begin, end), as CapsNet.squash computes it:
// the view, the permute, the cast to Acc and Eq. 1's passes over u in one. dims: B, C, D, P.
template <typename In, typename Acc>
void primary_squash_range(const In* s, const int64_t* dims, Acc eps, int64_t begin, int64_t end,
                          Acc* u) {
  const int64_t D = dims[2], P = dims[3];
  std::vector<Acc> inv_m(P), factor(P);
  for (int64_t block = begin; block < end; ++block) {  // block = b * C + c
    const In* s_block = s + block * D * P;
    Acc* u_block = u + block * P * D;
    Acc* q = factor.data();  // |t|^2, then the factor v = t f(q) in its place
    primary_norms<In, Acc>(s_block, D, P, inv_m.data(), q);
    for (int64_t p = 0; p < P; ++p) {
      const Acc a = inv_m[p] * inv_m[p];
      factor[p] = q[p] / (a + q[p]) / std::sqrt(q[p] + eps * a);
    }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t p = 0; p < P; ++p)
        u_block[p * D + d] = Acc(widen(s_block[d * P + p])) * inv_m[p] * factor[p];
  }
}

// One bfloat16, rounded as bfloat16_bits rounds (store_first would, through memory: slower
// here); float32 and float64 as they are.
inline void put(float x, uint16_t* p) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  *p = x != x ? uint16_t(0x7FC0) : uint16_t(rounded_to_bfloat16(bits) >> 16);
}
inline void put(float x, float* p) { *p = x; }
inline void put(double x, double* p) { *p = x; }

// The gradient of primary_squash_range for s, from grad u (B, C*P, D), with m held constant
// as in CapsNet.squash (see squash_backward).
template <typename In, typename Acc>
void primary_squash_backward_range(const In* s, const Acc* grad_u, const int64_t* dims, Acc eps,
                                   int64_t begin, int64_t end, In* grad_s) {
  const int64_t D = dims[2], P = dims[3];
  std::vector<Acc> inv_m(P), q(P), f(P), scale(P);
  for (int64_t block = begin; block < end; ++block) {
    const In* s_block = s + block * D * P;
    const Acc* grad_block = grad_u + block * P * D;
    primary_norms<In, Acc>(s_block, D, P, inv_m.data(), q.data());
    for (int64_t p = 0; p < P; ++p) {  // scale = 2 f'(q) (grad v . t)
      Acc dot = 0;
      for (int64_t d = 0; d < D; ++d)
        dot += grad_block[p * D + d] * (Acc(widen(s_block[d * P + p])) * inv_m[p]);
      const Acc a = inv_m[p] * inv_m[p], e = eps * a, root = std::sqrt(q[p] + e);
      f[p] = q[p] / (a + q[p]) / root;
      const Acc df = (a * (q[p] + e) - Acc(0.5) * q[p] * (a + q[p])) /
                     ((a + q[p]) * (a + q[p]) * (q[p] + e) * root);
      scale[p] = Acc(2) * dot * df;
    }
    In* grad_s_block = grad_s + block * D * P;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t p = 0; p < P; ++p) {
        const Acc t = Acc(widen(s_block[d * P + p])) * inv_m[p];
        put((grad_block[p * D + d] * f[p] + t * scale[p]) * inv_m[p], grad_s_block + d * P + p);
      }
  }
}

// The PrimaryCaps convolution's input gradient, float32: grad x (B, C, H, W) of a convolution
// with no padding, from grad_out (B, O, OH, OW) and the weight (O, C, KH, KW). Per example it
// is a matrix product and a scatter: cols (P, C*KH*KW) = grad_out_b^T (P, O) @ weight
// (O, C*KH*KW), P = OH*OW positions, and column (c, ky, kx) of row p = (oy, ox) is added to
// x[c, SH*oy + ky, SW*ox + kx]. Here the product runs a tile at a time, kTileRows positions
// by kPanel columns held in registers, and each tile is added into x as soon as it is made:
// cols (3 MB an example at 28x28) is never written. Both operands come packed so that a tile
// reads them in order: grad_out in tiles of positions, (B, T, O, kTileRows) with
// T = ceil(P / kTileRows) and zeros past P, and the weight in panels of columns,
// (ceil(N / kPanel), O, kPanel) with N = C*KH*KW and zeros past N.
using FloatRegister = Register<float>;
constexpr int kTileRows = 6;                       // 12 sums live, with 2 registers a row
constexpr int kPanel = 2 * FloatRegister::kLanes;  // 16 columns on AVX2, 32 on AVX-512
constexpr int64_t kGradientExamples = 4;           // examples whose grad_out stays in L2

// One tile's sums: a tile of grad_out (O, kTileRows) times one panel (O, kPanel).
void input_gradient_tile(const float* tile, const float* panel, int64_t O,
                         FloatRegister::Vec (&sums)[kTileRows][2]) {
  using R = FloatRegister;
  for (auto& row : sums) row[0] = row[1] = R::Vec{};
  for (int64_t o = 0; o < O; ++o) {
    const R::Vec low = R::load(panel + o * kPanel), high = R::load(panel + o * kPanel + R::kLanes);
    for (int r = 0; r < kTileRows; ++r) {
      const float g = tile[o * kTileRows + r];
      sums[r][0] += g * low;
      sums[r][1] += g * high;
    }
  }
}

// grad x for examples [begin, end). dims: B, O, OH, OW, C, H, W, KH, KW, SH, SW.
void input_gradient_range(const float* tiles, const float* panels, const int64_t* dims,
                          int64_t begin, int64_t end, float* grad_x) {
  const int64_t O = dims[1], OW = dims[3], P = dims[2] * dims[3], C = dims[4];
  const int64_t H = dims[5], W = dims[6], KW = dims[8], SH = dims[9], SW = dims[10];
  const int64_t T = (P + kTileRows - 1) / kTileRows, taps = dims[7] * KW, columns = C * taps;
  const int64_t image = C * H * W;
  std::memset(grad_x + begin * image, 0, sizeof(float) * (end - begin) * image);
  for (int64_t first = begin; first < end; first += kGradientExamples) {
    const int64_t last = std::min(end, first + kGradientExamples);
    for (int64_t start = 0; start < columns; start += kPanel) {
      const float* panel = panels + start / kPanel * O * kPanel;
      const int width = int(std::min<int64_t>(kPanel, columns - start));
      int64_t offset[kPanel];  // column (c, ky, kx) -> its place in an image, from (oy, ox)'s
      for (int l = 0; l < width; ++l) {
        const int64_t column = start + l, tap = column % taps;
        offset[l] = column / taps * H * W + tap / KW * W + tap % KW;
      }
      for (int64_t b = first; b < last; ++b)
        for (int64_t t = 0; t < T; ++t) {
          FloatRegister::Vec sums[kTileRows][2];
          input_gradient_tile(tiles + (b * T + t) * O * kTileRows, panel, O, sums);
          for (int64_t p = t * kTileRows; p < std::min(P, (t + 1) * kTileRows); ++p) {
            float* corner = grad_x + b * image + SH * (p / OW) * W + SW * (p % OW);
            float row[kPanel];
            std::memcpy(row, sums[p - t * kTileRows], sizeof row);
            for (int l = 0; l < width; ++l) corner[offset[l]] += row[l];
          }
        }
    }
  }
}

// body(begin, end) over [0, count) in contiguous ranges, one per thread, on the OpenMP threads
// torch computes with (the same runtime where torch brings libgomp.so.1, as its Linux wheels
// do): they are awake from torch's last operation, where threads of our own would wait for
// them to yield the cores.
template <typename Body>
void in_parallel(int64_t count, int64_t threads, const Body& body) {
#pragma omp parallel num_threads(threads)
  {
    const int64_t rank = omp_get_thread_num(), size = omp_get_num_threads();
    body(count * rank / size, count * (rank + 1) / size);
  }
}

}  // namespace

// The C entry points capslab/fused_routing.py calls, one set per input dtype. dims: I, B, J, r,
// K. u (B, I, K), W (I, K, J*16), both in the capsules' dtype. Per example: v (J, 16), c (J, I),
// saved_s (r, 16, 16), grad_s and v_t (r, J, 16), and saved_c and scratch in slots of
// (I/16, J, 16) (see Shape). Forward and backward split the batch among `threads` threads,
// votes_backward the inputs.
#define ROUTING_ENTRY_POINTS(suffix, In, Acc)                                                   \
  extern "C" void forward_##suffix(const In* u, const In* W, const int64_t* dims,            \
                                   int64_t threads, double eps, Acc* v, Acc* c, Acc* saved_s, \
                                   Acc* saved_c) {                                            \
    in_parallel(dims[1], threads, [&](int64_t begin, int64_t end) {                           \
      forward_range<In, Acc>(u, W, dims, begin, end, eps, v, c, saved_s, saved_c);            \
    });                                                                                       \
  }                                                                                           \
  extern "C" void backward_##suffix(const In* u, const In* W, const int64_t* dims,           \
                                    int64_t threads, int64_t detach_early, double eps,        \
                                    const Acc* saved_s, const Acc* saved_c, const Acc* grad_v, \
                                    Acc* scratch, Acc* grad_s, Acc* v) {                      \
    in_parallel(dims[1], threads, [&](int64_t begin, int64_t end) {                           \
      backward_range<In, Acc>(u, W, dims, begin, end, detach_early, eps, saved_s, saved_c,    \
                              grad_v, scratch, grad_s, v);                                    \
    });                                                                                       \
  }                                                                                           \
  extern "C" void votes_backward_##suffix(                                                    \
      const In* u, const In* W, const int64_t* dims, int64_t threads, int64_t first,          \
      const Acc* saved_c, const Acc* scratch, const Acc* grad_s, const Acc* v, In* grad_u,    \
      Acc* grad_W) {                                                                           \
    in_parallel(dims[0], threads, [&](int64_t begin, int64_t end) {                           \
      votes_backward_range<In, Acc>(u, W, dims, begin, end, first, saved_c, scratch, grad_s,  \
                                    v, grad_u, grad_W);                                       \
    });                                                                                       \
  }                                                                                           \
  extern "C" void primary_squash_##suffix(const In* s, const int64_t* dims, int64_t threads,  \
                                          double eps, Acc* u) {                               \
    in_parallel(dims[0] * dims[1], threads, [&](int64_t begin, int64_t end) {                 \
      primary_squash_range<In, Acc>(s, dims, Acc(eps), begin, end, u);                        \
    });                                                                                       \
  }                                                                                           \
  extern "C" void primary_squash_backward_##suffix(const In* s, const Acc* grad_u,            \
                                                   const int64_t* dims, int64_t threads,      \
                                                   double eps, In* grad_s) {                  \
    in_parallel(dims[0] * dims[1], threads, [&](int64_t begin, int64_t end) {                 \
      primary_squash_backward_range<In, Acc>(s, grad_u, dims, Acc(eps), begin, end, grad_s);  \
    });                                                                                       \
  }

ROUTING_ENTRY_POINTS(float32, float, float)
ROUTING_ENTRY_POINTS(bfloat16, uint16_t, float)
ROUTING_ENTRY_POINTS(float64, double, double)

extern "C" int register_bytes() { return kRegisterBytes; }

// The input gradient above; each thread takes a range of examples. Its tile and panel sizes
// come first, for capslab/fused_routing.py to pack grad_out and the weight.
extern "C" int input_gradient_tile_rows_float32() { return kTileRows; }
extern "C" int input_gradient_panel_float32() { return kPanel; }
extern "C" void input_gradient_float32(const float* tiles, const float* panels,
                                       const int64_t* dims, int64_t threads, float* grad_x) {
  in_parallel(dims[0], threads, [&](int64_t begin, int64_t end) {
    input_gradient_range(tiles, panels, dims, begin, end, grad_x);
  });
}
