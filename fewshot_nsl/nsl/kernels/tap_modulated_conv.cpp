// Fused CPU kernels of dynamic NSL (fewshot_nsl/nsl/fused.py): the
// tap-modulated convolution, forward and backward, and the meta-network's
// first stage (at the end): meta_normalize and, on image stems,
// meta_hidden_direct, forward; meta_normalize_backward and
// add_energy_gradient, the normalisation's gradients in training.
//
//   y[b,p,o] = sum_{t,c} a[b,p,t*C+c] w[t*C+c,o],
//   a[b,p,t*C+c] = sum_j m[b,p,t,j] x[b,p*s+d_j,c]   (full form; diagonal: m[b,p,t] x[b,p*s+d_t,c])
//
// Why a kernel of our own: a plain convolution never materialises its
// patches, and the modulated one must (every patch row is scaled per output
// position), so in PyTorch ops the patch matrix goes to memory and comes back
// (benchmarks/nsl_layer_overhead.py). Here the modulated patches of a block of
// a few output positions are built in cache and consumed at once by a
// register-blocked GEMM micro-kernel, as a convolution library would do with
// its own im2col tiles. The micro-kernel uses GCC vector extensions, so the
// compiler emits AVX-512 (or AVX2, or SSE) for the machine it builds on.
//
// The diagonal form (with whole vectors of channels) takes output positions
// by tap class, windows with the same taps inside the image, so that like a
// convolution library it does not multiply the padding's zeros: 18% of a
// dense patch matrix at Omniglot's 7x7 with padding 1, 9% at 14x14.
//
// Tensors are float32, contiguous: x is the input NHWC (B, H, W, C), read as
// if zero-padded by `padding` (no padded copy is made); m is tap-last (B, Ho, Wo, T) or (B, Ho, Wo, T, T); the kernel
// is tap-major (T*C, O) and its transpose (O, T*C) with zero columns up to a
// multiple of 16; y and dy are NHWC (B, Ho, Wo, O). O must be a multiple of
// 16 (checked in fused.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float vf __attribute__((vector_size(64), aligned(4)));
constexpr long kLanes = 16;
constexpr int kRows = 6;             // output rows of the register tile, at 4 vectors
constexpr int kVectors = 4;          // output vectors (x16 columns) of that tile
constexpr long kDepthBlock = 128;    // GEMM depth per pass: 128 x 64 floats of B stay in L1
constexpr long kPositionBlock = 24;  // output positions whose patches are built at once (forward)
// Backward: more positions per block, so that the weight gradient's partial
// sums (T*C x O, in L2) are loaded and stored once per more GEMM work.
constexpr long kBackwardPositionBlock = 96;
// Kernel-row segments (k*C values) from which meta_hidden_direct reads
// windows in place rather than from patch rows: 3-channel stems' 9 values
// ran faster in place, 1-channel stems' 3 slower (scratch timings).
constexpr long kMinWindowSegment = 8;
// Input bytes of the samples taken through the tap classes together (half a
// 1 MiB L2 cache; see sample_groups).
constexpr long kCachedSampleBytes = 512 << 10;

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

// How a GEMM's results reach Y: written over it; added to it; or written
// over it with non-temporal stores, which skip reading each line in before
// writing it: for an output too large to stay in cache for its reader
// anyway (an image stem's), whose rows are whole 64-byte lines.
enum class Write { overwrite, accumulate, stream };

inline void stream(float* p, vf v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
#else
  store(p, v);
#endif
}

// Orders a thread's streaming stores before whatever reads them next.
inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// One step along a GEMM's depth for the register tile:
// acc[i][:] += A[i*sa] * B[0 : NV*16] for the MR rows i.
template <int MR, int NV>
__attribute__((always_inline)) inline void rank_one_update(vf (&acc)[MR][NV], const float* A, long sa, const float* B) {
  vf b[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) b[j] = load(B + j * kLanes);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    const float a = A[i * sa];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
  }
}

// Y[MR x NV*16] (+)= A[MR x K] B[K x NV*16]; A's element (i, k) at A[i*sa + k*sk].
template <int MR, int NV>
void micro(const float* A, long sa, long sk, const float* B, long ldb, long K, float* Y, long ldy, Write write) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = write == Write::accumulate ? load(Y + i * ldy + j * kLanes) : vf{};
  for (long k = 0; k < K; ++k) rank_one_update<MR, NV>(acc, A + k * sk, sa, B + k * ldb);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (write == Write::stream) stream(Y + i * ldy + j * kLanes, acc[i][j]);
      else store(Y + i * ldy + j * kLanes, acc[i][j]);
    }
}

// A tile of `rows` <= MR rows: the register tile's size is a compile-time constant.
template <int NV, int MR>
void micro_upto(int rows, const float* A, long sa, long sk, const float* B, long ldb, long K, float* Y, long ldy,
                Write acc) {
  if constexpr (MR > 1) {
    if (rows < MR) return micro_upto<NV, MR - 1>(rows, A, sa, sk, B, ldb, K, Y, ldy, acc);
  }
  micro<MR, NV>(A, sa, sk, B, ldb, K, Y, ldy, acc);
}

// Rows of the register tile for NV output vectors: NV * rows accumulators,
// at least 12 so that the FMAs' latency is hidden (narrow products, e.g. the
// meta-network's 16 hidden channels), and at most 24 of the 32 registers.
template <int NV>
constexpr int tile_rows() {
  return NV == 1 ? 12 : NV == 2 ? 12 : NV == 3 ? 8 : kRows;
}

// Y[M x NV*16] (+)= A[M x K] B[K x NV*16], tile by tile down the rows.
template <int NV>
void gemm_panel(long M, const float* A, long sa, long sk, const float* B, long ldb, long K, float* Y, long ldy,
                Write acc) {
  constexpr int R = tile_rows<NV>();
  for (long m0 = 0; m0 < M; m0 += R) {
    const int rows = static_cast<int>(std::min<long>(R, M - m0));
    micro_upto<NV, R>(rows, A + m0 * sa, sa, sk, B, ldb, K, Y + m0 * ldy, ldy, acc);
  }
}

// Y[M x N] (+)= A[M x K] B[K x N], N a multiple of 16, blocked over K so that
// the slice of B in use stays in L1 while every row tile of A passes it.
// Streaming stores apply only where one block spans K (each tile is then
// written once), and need Y's rows 64-byte aligned.
void gemm(long M, long N, long K, const float* A, long sa, long sk, const float* B, long ldb, float* Y, long ldy,
          Write write) {
  for (long k0 = 0; k0 < K; k0 += kDepthBlock) {
    const long depth = std::min(kDepthBlock, K - k0);
    const Write acc = k0 > 0 ? Write::accumulate : (write == Write::stream && depth < K ? Write::overwrite : write);
    for (long n0 = 0; n0 < N; n0 += kVectors * kLanes) {
      const int nv = static_cast<int>(std::min<long>(kVectors, (N - n0) / kLanes));
      const float* a = A + k0 * sk;
      const float* b = B + k0 * ldb + n0;
      float* y = Y + n0;
      switch (nv) {
        case 4: gemm_panel<4>(M, a, sa, sk, b, ldb, depth, y, ldy, acc); break;
        case 3: gemm_panel<3>(M, a, sa, sk, b, ldb, depth, y, ldy, acc); break;
        case 2: gemm_panel<2>(M, a, sa, sk, b, ldb, depth, y, ldy, acc); break;
        default: gemm_panel<1>(M, a, sa, sk, b, ldb, depth, y, ldy, acc); break;
      }
    }
  }
}

// Y[MR x NV*16] = sum_r A_r[MR x L] B_r[L x NV*16] over `segments` pieces r,
// A_r's element (i, l) at A[r*segment_stride + i*sa + l] and the B_r one
// after another in B: a convolution window read in place from an NHWC image,
// a segment being one kernel row (k*C contiguous values per position, sa
// apart from one position to the next), so no patch rows are built.
template <int MR, int NV>
void micro_windows(const float* A, long sa, long segment_stride, long segments, long L, const float* B, long ldb,
                   float* Y, long ldy) {
  vf acc[MR][NV] = {};
  for (long r = 0; r < segments; ++r) {
    const float* a_row = A + r * segment_stride;
    const float* b_row = B + r * L * ldb;
    for (long l = 0; l < L; ++l) rank_one_update<MR, NV>(acc, a_row + l, sa, b_row + l * ldb);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) store(Y + i * ldy + j * kLanes, acc[i][j]);
}

template <int NV, int MR>
void windows_upto(int rows, const float* A, long sa, long segment_stride, long segments, long L, const float* B,
                  long ldb, float* Y, long ldy) {
  if constexpr (MR > 1) {
    if (rows < MR) return windows_upto<NV, MR - 1>(rows, A, sa, segment_stride, segments, L, B, ldb, Y, ldy);
  }
  micro_windows<MR, NV>(A, sa, segment_stride, segments, L, B, ldb, Y, ldy);
}

// Y[M x NV*16] = the windows of M consecutive positions times B, tile by tile.
template <int NV>
void windows_panel(long M, const float* A, long sa, long segment_stride, long segments, long L, const float* B,
                   long ldb, float* Y, long ldy) {
  constexpr int R = tile_rows<NV>();
  for (long m0 = 0; m0 < M; m0 += R) {
    const int rows = static_cast<int>(std::min<long>(R, M - m0));
    windows_upto<NV, R>(rows, A + m0 * sa, sa, segment_stride, segments, L, B, ldb, Y + m0 * ldy, ldy);
  }
}

// Y[M x N] = the windows of M consecutive positions times B (N a multiple of 16).
void gemm_windows(long M, long N, const float* A, long sa, long segment_stride, long segments, long L, const float* B,
                  long ldb, float* Y, long ldy) {
  for (long n0 = 0; n0 < N; n0 += kVectors * kLanes) {
    const int nv = static_cast<int>(std::min<long>(kVectors, (N - n0) / kLanes));
    switch (nv) {
      case 4: windows_panel<4>(M, A, sa, segment_stride, segments, L, B + n0, ldb, Y + n0, ldy); break;
      case 3: windows_panel<3>(M, A, sa, segment_stride, segments, L, B + n0, ldb, Y + n0, ldy); break;
      case 2: windows_panel<2>(M, A, sa, segment_stride, segments, L, B + n0, ldb, Y + n0, ldy); break;
      default: windows_panel<1>(M, A, sa, segment_stride, segments, L, B + n0, ldb, Y + n0, ldy); break;
    }
  }
}

// An output position, as (sample, row, column) of the output grid.
struct Position {
  long b, oh, ow;
};

// Geometry shared by the kernels, and the patch-row arithmetic.
struct Geometry {
  long batch, in_h, in_w, channels, out_h, out_w, k, stride, padding, taps, out_channels;
  bool full;
  // Per tap: its row and column in the kernel window, and its offset in x
  // from the window's top-left element (computed once, not per position).
  std::vector<long> tap_row, tap_col, tap_delta;
  long positions() const { return out_h * out_w; }
  long depth() const { return taps * channels; }
  long sim_size() const { return full ? taps * taps : taps; }
  Position position(long q) const {
    const long p = q % positions();
    return {q / positions(), p / out_w, p % out_w};
  }
  // The next position in memory order: counters, so the per-position work
  // has no integer division.
  void advance(Position& pos) const {
    if (++pos.ow < out_w) return;
    pos.ow = 0;
    if (++pos.oh < out_h) return;
    pos.oh = 0;
    ++pos.b;
  }
  long top(const Position& pos) const { return pos.oh * stride - padding; }
  long left(const Position& pos) const { return pos.ow * stride - padding; }
  // Whether the position's window lies inside the image (no tap in the padding).
  bool interior(const Position& pos) const {
    return top(pos) >= 0 && left(pos) >= 0 && top(pos) + k <= in_h && left(pos) + k <= in_w;
  }
  // Offset in x of the window's top-left input row (maybe outside the image).
  long corner(const Position& pos) const { return ((pos.b * in_h + top(pos)) * in_w + left(pos)) * channels; }
  // Offsets in x of every tap's input row for an output position, -1 in the
  // zero padding.
  void sources(const Position& pos, long* offsets) const {
    const long base = corner(pos);
    if (interior(pos)) {
      for (long t = 0; t < taps; ++t) offsets[t] = base + tap_delta[t];
      return;
    }
    for (long t = 0; t < taps; ++t) {
      const long ih = top(pos) + tap_row[t], iw = left(pos) + tap_col[t];
      const bool inside = ih >= 0 && ih < in_h && iw >= 0 && iw < in_w;
      offsets[t] = inside ? base + tap_delta[t] : -1;
    }
  }
};

Geometry geometry(long batch, long in_h, long in_w, long channels, long out_h, long out_w, long k, long stride,
                  long padding, long out_channels, bool full) {
  Geometry g{batch, in_h, in_w, channels, out_h, out_w, k, stride, padding, k * k, out_channels, full, {}, {}, {}};
  for (long t = 0; t < g.taps; ++t) {
    g.tap_row.push_back(t / k);
    g.tap_col.push_back(t % k);
    g.tap_delta.push_back((t / k * g.in_w + t % k) * g.channels);
  }
  return g;
}

Geometry geometry(const torch::Tensor& x, long out_h, long out_w, long k, long stride, long padding,
                  long out_channels, bool full) {
  return geometry(x.size(0), x.size(1), x.size(2), x.size(3), out_h, out_w, k, stride, padding, out_channels, full);
}

// The geometry of x's one-channel map of per-pixel values (its channel
// squares): its taps' offsets are pixel indices.
Geometry pixel_geometry(const torch::Tensor& x, long out_h, long out_w, long k, long stride, long padding) {
  return geometry(x.size(0), x.size(1), x.size(2), 1, out_h, out_w, k, stride, padding, 1, false);
}

Geometry geometry(const torch::Tensor& x, const torch::Tensor& m, long k, long stride, long padding,
                  long out_channels) {
  return geometry(x, m.size(1), m.size(2), k, stride, padding, out_channels, m.dim() == 5);
}

// Output rows (or columns) [first, first + count) whose windows cover the
// same kernel rows (columns) [tap_first, tap_first + taps) inside the image.
struct Run {
  long first, count, tap_first, taps;
};

std::vector<Run> runs(long out, long in, long k, long stride, long padding) {
  std::vector<Run> result;
  for (long o = 0; o < out; ++o) {
    const long start = o * stride - padding;
    const long tap_first = std::max(0L, -start), taps = std::max(0L, std::min(k, in - start) - tap_first);
    if (!result.empty() && result.back().tap_first == tap_first && result.back().taps == taps) ++result.back().count;
    else result.push_back({o, 1, tap_first, taps});
  }
  return result;
}

// A part of a patch row and the kernel rows it multiplies: `length` values
// from offset `a` of the row, against rows [b, b + length) of the tap-major kernel.
struct Piece {
  long a, b, length;
};

// The output positions whose windows have the same taps inside the image: a
// row run by a column run, in every sample. Their taps form a rectangle of
// the kernel, so their patch rows hold those taps only (the padding's zeros
// are not multiplied, as a convolution library skips them too), and the
// kernel's matching rows are a few contiguous pieces.
struct TapClass {
  Run rows, cols;
  std::vector<Piece> pieces;
  long per_sample() const { return rows.count * cols.count; }
  long row_length(long channels) const { return rows.taps * cols.taps * channels; }
};

std::vector<TapClass> tap_classes(const Geometry& g) {
  std::vector<TapClass> classes;
  for (const Run& rows : runs(g.out_h, g.in_h, g.k, g.stride, g.padding))
    for (const Run& cols : runs(g.out_w, g.in_w, g.k, g.stride, g.padding)) {
      TapClass cls{rows, cols, {}};
      const long length = cols.taps * g.channels;
      for (long r = 0; r < (cols.taps > 0 ? rows.taps : 0); ++r) {
        const long b = ((rows.tap_first + r) * g.k + cols.tap_first) * g.channels;
        Piece* last = cls.pieces.empty() ? nullptr : &cls.pieces.back();
        if (last && last->b + last->length == b) last->length += length;
        else cls.pieces.push_back({r * length, b, length});
      }
      classes.push_back(cls);
    }
  return classes;
}

// The output indices q and window corners (offsets in x, as Geometry::corner)
// of the class's positions first .. first + count - 1, counted from sample b0:
// by counters, so that only the first needs divisions.
void class_positions(const Geometry& g, const TapClass& cls, long b0, long first, long count, long* q, long* corner) {
  const long width = cls.cols.count, per_sample = cls.per_sample();
  Position pos{b0 + first / per_sample, cls.rows.first + first % per_sample / width, cls.cols.first + first % width};
  for (long i = 0; i < count; ++i) {
    q[i] = (pos.b * g.out_h + pos.oh) * g.out_w + pos.ow;
    corner[i] = g.corner(pos);
    if (++pos.ow < cls.cols.first + width) continue;
    pos.ow = cls.cols.first;
    if (++pos.oh < cls.rows.first + cls.rows.count) continue;
    pos.oh = cls.rows.first;
    ++pos.b;
  }
}

// The class's modulated patch rows (diagonal form, whole vectors of channels)
// of output positions q[0..count), whose windows start at corner[0..count), into A.
void build_class_rows(const Geometry& g, const TapClass& cls, const float* x, const float* m, const long* q,
                      const long* corner, long count, float* A) {
  const long C = g.channels, T = g.taps, row_length = cls.row_length(C);
  for (long i = 0; i < count; ++i) {
    float* out = A + i * row_length;
    for (long r = cls.rows.tap_first; r < cls.rows.tap_first + cls.rows.taps; ++r)
      for (long c = cls.cols.tap_first; c < cls.cols.tap_first + cls.cols.taps; ++c, out += C) {
        const long t = r * g.k + c;
        const float gain = m[q[i] * T + t];
        const float* src = x + corner[i] + g.tap_delta[t];
        for (long ch = 0; ch < C; ch += kLanes) store(out + ch, gain * load(src + ch));
      }
  }
}

// Modulated patch rows of output positions [q0, q0 + count) into A (count x T*C);
// with m null (diagonal geometry only), the plain patch rows.
void build_patch_rows(const Geometry& g, const float* x, const float* m, long q0, long count, float* A) {
  const long C = g.channels, T = g.taps;
  std::vector<long> offsets(T);
  Position pos = g.position(q0);
  for (long i = 0; i < count; ++i, g.advance(pos)) {
    g.sources(pos, offsets.data());
    const float* mp = m ? m + (q0 + i) * g.sim_size() : nullptr;
    float* row = A + i * g.depth();
    for (long t = 0; t < T; ++t) {
      float* out = row + t * C;
      if (!g.full) {
        const long src = offsets[t];
        const float gain = mp ? mp[t] : 1.f;
        if (src < 0) std::fill(out, out + C, 0.f);
        else for (long c = 0; c < C; ++c) out[c] = gain * x[src + c];
        continue;
      }
      std::fill(out, out + C, 0.f);
      for (long j = 0; j < T; ++j) {
        const long offset = offsets[j];
        if (offset < 0) continue;
        const float* src = x + offset;
        const float gain = mp[t * T + j];
        for (long c = 0; c < C; ++c) out[c] += gain * src[c];
      }
    }
  }
}

// The same rows for a diagonal 3x3 image stem (CC = 1 or 3 channels), where a
// row is only 9 or 27 values, so the generic loop's per-tap bookkeeping is
// most of the work: a window inside the image is copied straight-line, with
// every size a compile-time constant. m null: the plain patch rows.
template <long CC>
void build_stem_patch_rows(const Geometry& g, const float* x, const float* m, long q0, long count, float* A) {
  constexpr long K = 3, T = K * K;
  constexpr float ones[T] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
  std::vector<long> offsets(T);
  const long line = g.in_w * CC;  // one input row of the window
  Position pos = g.position(q0);
  for (long i = 0; i < count; ++i, g.advance(pos)) {
    const float* mp = m ? m + (q0 + i) * T : ones;
    float* row = A + i * T * CC;
    if (g.interior(pos)) {
      const float* window = x + g.corner(pos);
      for (long r = 0; r < K; ++r)
        for (long j = 0; j < K; ++j)
          for (long c = 0; c < CC; ++c) row[(r * K + j) * CC + c] = mp[r * K + j] * window[r * line + j * CC + c];
      continue;
    }
    g.sources(pos, offsets.data());
    for (long t = 0; t < T; ++t)
      for (long c = 0; c < CC; ++c) row[t * CC + c] = offsets[t] < 0 ? 0.f : mp[t] * x[offsets[t] + c];
  }
}

void build_patches(const Geometry& g, const float* x, const float* m, long q0, long count, float* A) {
  const bool stem = !g.full && g.k == 3;
  if (stem && g.channels == 1) build_stem_patch_rows<1>(g, x, m, q0, count, A);
  else if (stem && g.channels == 3) build_stem_patch_rows<3>(g, x, m, q0, count, A);
  else build_patch_rows(g, x, m, q0, count, A);
}

// Returns sum_c g[c] x[c] (the similarity gradient) and adds gain * g to dx.
float dot_and_scatter(const float* g, const float* x, float gain, float* dx, long n, bool need_dot, bool need_dx) {
  float s = 0.f;
  if (need_dot && need_dx) {
#pragma omp simd reduction(+ : s)
    for (long c = 0; c < n; ++c) {
      s += g[c] * x[c];
      dx[c] += gain * g[c];
    }
  } else if (need_dot) {
#pragma omp simd reduction(+ : s)
    for (long c = 0; c < n; ++c) s += g[c] * x[c];
  } else {
    for (long c = 0; c < n; ++c) dx[c] += gain * g[c];
  }
  return s;
}

// Diagonal form with whole vectors of input channels: every patch row and
// gradient row of a tap class splits into pieces of whole vectors.
bool by_tap_class(const Geometry& g) { return !g.full && g.channels % kLanes == 0; }

// How many parts the batch is split into by whole samples: one per thread.
long sample_splits(const Geometry& g) { return std::max<long>(1, std::min<long>(at::get_num_threads(), g.batch)); }

// Samples [first, first + count), taken through every tap class together.
struct SampleGroup {
  long first, count;
};

// A split's samples (a thread's share of the batch) in groups of as many as
// keep their input, and its gradient, in a core's L2 cache, so that each
// class finds the rows the previous ones brought in (and the backward, the
// gradient it zeroed for the group).
std::vector<SampleGroup> sample_groups(const Geometry& g, long split, long splits) {
  const long sample_bytes = g.in_h * g.in_w * g.channels * static_cast<long>(sizeof(float));
  const long per_group = std::max(1L, kCachedSampleBytes / sample_bytes);
  const long first = split * g.batch / splits, last = (split + 1) * g.batch / splits;
  std::vector<SampleGroup> groups;
  for (long b = first; b < last; b += per_group) groups.push_back({b, std::min(per_group, last - b)});
  return groups;
}

// Blocks of up to `block` positions of one class, in a group of samples.
struct ClassBlock {
  long cls, first, count;
};

std::vector<ClassBlock> class_blocks(const std::vector<TapClass>& classes, long samples, long block) {
  std::vector<ClassBlock> blocks;
  for (long c = 0; c < static_cast<long>(classes.size()); ++c) {
    const long n = samples * classes[c].per_sample();
    for (long j = 0; j < n; j += block) blocks.push_back({c, j, std::min(block, n - j)});
  }
  return blocks;
}

// Threads take whole samples, each every class of its samples, so that each
// has the same work (classes differ in taps per position).
void forward_by_tap_class(const Geometry& g, const float* x, const float* m, const float* w, float* y, Write write) {
  const long O = g.out_channels, splits = sample_splits(g);
  const std::vector<TapClass> classes = tap_classes(g);
  at::parallel_for(0, splits, 1, [&](long begin, long end) {
    std::vector<float> patches(kPositionBlock * g.depth()), tile(kPositionBlock * O);
    long q[kPositionBlock], corner[kPositionBlock];
    for (long split = begin; split < end; ++split) {
      for (const SampleGroup& group : sample_groups(g, split, splits)) {
        for (const ClassBlock& block : class_blocks(classes, group.count, kPositionBlock)) {
          const TapClass& cls = classes[block.cls];
          class_positions(g, cls, group.first, block.first, block.count, q, corner);
          build_class_rows(g, cls, x, m, q, corner, block.count, patches.data());
          const long row_length = cls.row_length(g.channels);
          if (cls.pieces.empty()) std::fill(tile.begin(), tile.end(), 0.f);
          for (const Piece& piece : cls.pieces)
            gemm(block.count, O, piece.length, patches.data() + piece.a, row_length, 1, w + piece.b * O, O,
                 tile.data(), O, &piece == &cls.pieces.front() ? Write::overwrite : Write::accumulate);
          for (long i = 0; i < block.count; ++i)
            for (long o = 0; o < O; o += kLanes) {
              const vf v = load(tile.data() + i * O + o);
              if (write == Write::stream) stream(y + q[i] * O + o, v);
              else store(y + q[i] * O + o, v);
            }
        }
      }
    }
    if (write == Write::stream) stream_fence();
  });
}

// The gradients of forward_by_tap_class, samples split as in tap_modulated_backward.
void backward_by_tap_class(const Geometry& g, const float* x, const float* m, const float* w_t, long w_t_stride,
                           const float* dy, long splits, float* gx, float* gm, float* gw_parts) {
  const long C = g.channels, O = g.out_channels, T = g.taps, sample_size = g.in_h * g.in_w * C;
  const std::vector<TapClass> classes = tap_classes(g);
  at::parallel_for(0, splits, 1, [&](long begin, long end) {
    std::vector<float> patches(kBackwardPositionBlock * g.depth()), patch_grad(kBackwardPositionBlock * g.depth());
    std::vector<float> dy_rows(kBackwardPositionBlock * O);
    long q[kBackwardPositionBlock], corner[kBackwardPositionBlock];
    for (long split = begin; split < end; ++split) {
      for (const SampleGroup& group : sample_groups(g, split, splits)) {
        if (gx) std::fill(gx + group.first * sample_size, gx + (group.first + group.count) * sample_size, 0.f);
        for (const ClassBlock& block : class_blocks(classes, group.count, kBackwardPositionBlock)) {
          const TapClass& cls = classes[block.cls];
          const long count = block.count, row_length = cls.row_length(C);
          class_positions(g, cls, group.first, block.first, count, q, corner);
          for (long i = 0; i < count; ++i) std::copy(dy + q[i] * O, dy + (q[i] + 1) * O, dy_rows.data() + i * O);
          if (gw_parts) {
            build_class_rows(g, cls, x, m, q, corner, count, patches.data());
            // grad_w[piece rows, o] += sum_i patches[i, piece] dy[i, o]: the patches read transposed.
            for (const Piece& piece : cls.pieces)
              gemm(piece.length, O, count, patches.data() + piece.a, 1, row_length, dy_rows.data(), O,
                   gw_parts + (split * g.depth() + piece.b) * O, O, Write::accumulate);
          }
          if (!(gx || gm)) continue;
          for (const Piece& piece : cls.pieces)
            gemm(count, piece.length, O, dy_rows.data(), O, 1, w_t + piece.b, w_t_stride,
                 patch_grad.data() + piece.a, row_length, Write::overwrite);
          for (long i = 0; i < count; ++i) {
            const float* grad_row = patch_grad.data() + i * row_length;
            if (gm) std::fill(gm + q[i] * T, gm + (q[i] + 1) * T, 0.f);
            for (long r = cls.rows.tap_first; r < cls.rows.tap_first + cls.rows.taps; ++r)
              for (long c = cls.cols.tap_first; c < cls.cols.tap_first + cls.cols.taps; ++c, grad_row += C) {
                const long t = r * g.k + c, src = corner[i] + g.tap_delta[t];
                const float value = dot_and_scatter(grad_row, x + src, m[q[i] * T + t], gx ? gx + src : nullptr, C,
                                                    gm != nullptr, gx != nullptr);
                if (gm) gm[q[i] * T + t] = value;
              }
          }
        }
      }
    }
  });
}

}  // namespace

torch::Tensor tap_modulated_forward(torch::Tensor x, torch::Tensor m, torch::Tensor w, int64_t k, int64_t stride,
                                    int64_t padding, bool stream_output) {
  const Geometry g = geometry(x, m, k, stride, padding, w.size(1));
  auto y = torch::empty({g.batch, g.out_h, g.out_w, g.out_channels}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // y from torch::empty is 64-byte aligned, and its rows are whole vectors.
  const Write write = stream_output ? Write::stream : Write::overwrite;
  if (by_tap_class(g)) {
    forward_by_tap_class(g, xp, mp, wp, yp, write);
    return y;
  }
  // Blocks run over the whole batch's positions, so no block is a thin remainder of a sample.
  const long total = g.batch * g.positions(), blocks = (total + kPositionBlock - 1) / kPositionBlock;
  at::parallel_for(0, blocks, 1, [&](long begin, long end) {
    std::vector<float> patches(kPositionBlock * g.depth());
    for (long block = begin; block < end; ++block) {
      const long q0 = block * kPositionBlock, count = std::min(kPositionBlock, total - q0);
      build_patches(g, xp, mp, q0, count, patches.data());
      gemm(count, g.out_channels, g.depth(), patches.data(), g.depth(), 1, wp, g.out_channels,
           yp + q0 * g.out_channels, g.out_channels, write);
    }
    if (write == Write::stream) stream_fence();
  });
  return y;
}

// Gradients of tap_modulated_forward given dy. The patch-space gradient
// G = dy w^T (per position, T*C values) is formed once per block and feeds
// both the input gradient (scattered back through the taps, times m) and the
// similarity gradient (its dot with the input rows), as in the PyTorch path.
// Work is split by whole samples, so each sample's input gradient has one
// writer, and the weight gradient is summed from one partial per split in a
// fixed order: the result does not depend on scheduling.
std::vector<torch::Tensor> tap_modulated_backward(torch::Tensor x, torch::Tensor m, torch::Tensor w,
                                                  torch::Tensor w_t, torch::Tensor dy, int64_t k, int64_t stride,
                                                  int64_t padding, bool need_x, bool need_w, bool need_m) {
  const Geometry g = geometry(x, m, k, stride, padding, w.size(1));
  const long C = g.channels, T = g.taps, D = g.depth(), O = g.out_channels;
  const long D_padded = w_t.size(1);  // D rounded up to whole vectors: G's row stride
  const long splits = sample_splits(g);
  // Zeroed sample by sample just before its first scatter, while it is cached,
  // instead of in a separate pass over the whole tensor.
  auto grad_x = need_x ? torch::empty_like(x) : torch::Tensor();
  const long sample_size = g.in_h * g.in_w * C;
  auto grad_m = need_m ? torch::empty_like(m) : torch::Tensor();
  auto grad_w_parts = need_w ? torch::zeros({splits, D, O}, w.options()) : torch::Tensor();
  const float* xp = x.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* wtp = w_t.data_ptr<float>();
  const float* dyp = dy.data_ptr<float>();
  float* gxp = need_x ? grad_x.data_ptr<float>() : nullptr;
  float* gmp = need_m ? grad_m.data_ptr<float>() : nullptr;
  float* gwp = need_w ? grad_w_parts.data_ptr<float>() : nullptr;
  if (by_tap_class(g)) backward_by_tap_class(g, xp, mp, wtp, D_padded, dyp, splits, gxp, gmp, gwp);
  else at::parallel_for(0, splits, 1, [&](long begin, long end) {
    std::vector<float> patches(kBackwardPositionBlock * D), patch_grad(kBackwardPositionBlock * D_padded);
    std::vector<long> offsets(T);
    for (long split = begin; split < end; ++split) {
      const long first = split * g.batch / splits * g.positions();
      const long last = (split + 1) * g.batch / splits * g.positions();
      long unzeroed = split * g.batch / splits;  // first sample of this split not yet zeroed
      for (long q0 = first; q0 < last; q0 += kBackwardPositionBlock) {
        const long count = std::min(kBackwardPositionBlock, last - q0);
        const float* dyb = dyp + q0 * O;
        if (need_w) {
          build_patches(g, xp, mp, q0, count, patches.data());
          // grad_w[d, o] += sum_p patches[p, d] dy[p, o]: the patches read transposed.
          gemm(D, O, count, patches.data(), 1, D, dyb, O, gwp + split * D * O, O, Write::accumulate);
        }
        if (!(need_x || need_m)) continue;
        for (; need_x && unzeroed <= (q0 + count - 1) / g.positions(); ++unzeroed) {
          std::fill(gxp + unzeroed * sample_size, gxp + (unzeroed + 1) * sample_size, 0.f);
        }
        gemm(count, D_padded, O, dyb, O, 1, wtp, D_padded, patch_grad.data(), D_padded, Write::overwrite);
        Position pos = g.position(q0);
        for (long i = 0; i < count; ++i, g.advance(pos)) {
          const long q = q0 + i;
          const float* mrow = mp + q * g.sim_size();
          float* gmrow = need_m ? gmp + q * g.sim_size() : nullptr;
          const float* grow = patch_grad.data() + i * D_padded;
          g.sources(pos, offsets.data());
          for (long t = 0; t < T; ++t) {
            const float* gt = grow + t * C;
            // Diagonal: tap t reads input row t only; full: every row j, through M[t, j].
            const long j_first = g.full ? 0 : t, j_last = g.full ? T : t + 1;
            for (long j = j_first; j < j_last; ++j) {
              const long src = offsets[j], entry = g.full ? t * T + j : t;
              const float value = src < 0 ? 0.f
                  : dot_and_scatter(gt, xp + src, mrow[entry], need_x ? gxp + src : nullptr, C, need_m, need_x);
              if (need_m) gmrow[entry] = value;
            }
          }
        }
      }
    }
  });
  torch::Tensor grad_w;
  if (need_w) {
    grad_w = grad_w_parts[0];
    for (long s = 1; s < splits; ++s) grad_w = grad_w + grad_w_parts[s];
  }
  return {grad_x, grad_w, grad_m};
}

// One position's hidden activations from its raw ones: times the inverse
// patch norm, then (scale and shift given) the affine map and the ReLU.
// `in` may be `out`.
inline void finish_hidden(const float* in, float* out, long hidden, float norm, const float* scale,
                          const float* shift, Write write = Write::overwrite) {
  if (write == Write::stream) {  // hidden in whole vectors, out 64-byte aligned
    for (long j = 0; j < hidden; j += kLanes) {
      vf v = load(in + j) * norm;
      if (scale) {
        v = v * load(scale + j) + load(shift + j);
        v = v > 0.f ? v : vf{};
      }
      stream(out + j, v);
    }
    return;
  }
  if (scale) {
#pragma omp simd
    for (long j = 0; j < hidden; ++j) out[j] = std::max(0.f, in[j] * norm * scale[j] + shift[j]);
  } else {
#pragma omp simd
    for (long j = 0; j < hidden; ++j) out[j] = in[j] * norm;
  }
}

// Each pixel's sum of channel squares, (B, H, W, 1), for an NHWC x.
torch::Tensor channel_squares(const torch::Tensor& x) {
  const long pixels = x.size(0) * x.size(1) * x.size(2), C = x.size(3);
  auto squares = torch::empty({x.size(0), x.size(1), x.size(2), 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float* sp = squares.data_ptr<float>();
  at::parallel_for(0, pixels, 1024, [&](long begin, long end) {
    if (C == 1) {  // vectorised across pixels instead of within one
      for (long i = begin; i < end; ++i) sp[i] = xp[i] * xp[i];
      return;
    }
    for (long i = begin; i < end; ++i) {
      const float* row = xp + i * C;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (long c = 0; c < C; ++c) sum += row[c] * row[c];
      sp[i] = sum;
    }
  });
  return squares;
}

// The patch energies of one output row's positions (its windows' sums of
// channel squares) into e: tap by tap, a strided run of the squares map per
// tap, which vectorises (a per-position gather of 9 scattered values does not).
void line_energies(const Geometry& pixels, const Position& row_start, const float* squares, float* e) {
  std::fill(e, e + pixels.out_w, 0.f);
  const long top = pixels.top(row_start), s = pixels.stride, p = pixels.padding;
  for (long r = 0; r < pixels.k; ++r) {
    const long ih = top + r;
    if (ih < 0 || ih >= pixels.in_h) continue;
    const float* line = squares + (row_start.b * pixels.in_h + ih) * pixels.in_w;
    for (long j = 0; j < pixels.k; ++j) {
      // Output columns whose tap (r, j) falls inside the image: 0 <= i*s - p + j < in_w.
      const long from = j >= p ? 0 : (p - j + s - 1) / s, reach = pixels.in_w - 1 + p - j;
      const long to = reach < 0 ? 0 : std::min(pixels.out_w, reach / s + 1);
      for (long i = from; i < to; ++i) e[i] += line[i * s - p + j];
    }
  }
}

// What normalises the hidden activations of the meta-network's first stage:
// the channel squares map, eps, the optional affine map (BatchNorm on running
// statistics, then ReLU), where the inverse norms go (or null), and how the
// results are stored.
struct Normalisation {
  const float* squares;
  float eps;
  const float* scale;
  const float* shift;
  float* norms;
  long hidden;
  Write write;
};

// One output row of positions [q0, q0 + out_w): u[q0 + i] = finish_hidden(raw[i],
// 1 / sqrt(energy + eps)), raw's rows `raw_stride` apart (raw may be u's own rows).
void normalize_line(const Geometry& pixels, const Normalisation& n, long q0, const float* raw, long raw_stride,
                    float* u, float* energies) {
  line_energies(pixels, pixels.position(q0), n.squares, energies);
  for (long i = 0; i < pixels.out_w; ++i) {
    const float norm = 1.f / std::sqrt(energies[i] + n.eps);
    if (n.norms) n.norms[q0 + i] = norm;
    finish_hidden(raw + i * raw_stride, u + (q0 + i) * n.hidden, n.hidden, norm, n.scale, n.shift, n.write);
  }
}

// The meta-network's normalisation (DynamicNSLConv2d.similarity), in place on
// u = conv(x, v), forward only:
//   u[b,p,j] <- u[b,p,j] / sqrt(sum_{t,c} x[b,p*s+d_t,c]^2 + eps),
// then, where scale and shift are given, relu(u[b,p,j] * scale[j] + shift[j])
// (BatchNorm on running statistics, and the ReLU). In PyTorch ops the patch
// energy is a squares pass, a box-sum convolution and an rsqrt, and the rest
// three passes over the hidden activations; here it is one pass over x (each
// pixel's channel squares, once) and one over u. x is NHWC (B, H, W, C), u
// NHWC (B, Ho, Wo, h).
void meta_normalize(torch::Tensor x, torch::Tensor u, int64_t k, int64_t stride, int64_t padding, double eps,
                    std::optional<torch::Tensor> scale, std::optional<torch::Tensor> shift,
                    std::optional<torch::Tensor> norms) {
  const long hidden = u.size(3);
  const auto squares = channel_squares(x);
  const Geometry pixels = pixel_geometry(x, u.size(1), u.size(2), k, stride, padding);
  const Normalisation n{squares.data_ptr<float>(), static_cast<float>(eps),
                        scale ? scale->data_ptr<float>() : nullptr, shift ? shift->data_ptr<float>() : nullptr,
                        norms ? norms->data_ptr<float>() : nullptr, hidden, Write::overwrite};
  float* up = u.data_ptr<float>();
  at::parallel_for(0, pixels.batch * pixels.out_h, 1, [&](long begin, long end) {
    std::vector<float> energies(pixels.out_w);
    for (long line = begin; line < end; ++line) {
      const long q0 = line * pixels.out_w;
      normalize_line(pixels, n, q0, up + q0 * hidden, hidden, up, energies.data());
    }
  });
}

// The meta-network's whole first stage, for inputs of few channels (image
// stems), forward only: u[b,p,:] = finish_hidden(patch(b,p) v, 1 / sqrt(|patch(b,p)|^2 + eps)).
// There a patch row is only 9 or 27 values, so building patch rows costs as
// much as multiplying them: output row by output row, the positions whose
// window lies inside the image read it in place (gemm_windows; for kernel
// rows of at least kMinWindowSegment values), and only the others get patch
// rows; the energy comes from the channel squares map. oneDNN's convolution to a few hidden channels and a separate
// normalisation pass would each go over memory. v is tap-major (T*C, hidden
// rounded up to whole vectors, zero columns beyond hidden); returns u NHWC
// (B, Ho, Wo, hidden).
torch::Tensor meta_hidden_direct(torch::Tensor x, torch::Tensor v, int64_t hidden, int64_t k, int64_t stride,
                                 int64_t padding, double eps, std::optional<torch::Tensor> scale,
                                 std::optional<torch::Tensor> shift, std::optional<torch::Tensor> norms,
                                 bool stream_output) {
  const long out_h = (x.size(1) + 2 * padding - k) / stride + 1, out_w = (x.size(2) + 2 * padding - k) / stride + 1;
  const Geometry g = geometry(x, out_h, out_w, k, stride, padding, v.size(1), false);
  const Geometry pixels = pixel_geometry(x, out_h, out_w, k, stride, padding);
  const long C = g.channels, D = g.depth(), padded = v.size(1);
  // Output columns whose windows lie inside the image horizontally: [first, last).
  const bool in_place = k * C >= kMinWindowSegment;
  const long first = std::min(out_w, (padding + stride - 1) / stride);
  const long last = std::max(first, std::min(out_w, (g.in_w - k + padding) / stride + 1));
  const auto squares = channel_squares(x);
  auto u = torch::empty({g.batch, out_h, out_w, hidden}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* up = u.data_ptr<float>();
  const Write write = stream_output && hidden % kLanes == 0 ? Write::stream : Write::overwrite;
  const Normalisation n{squares.data_ptr<float>(), static_cast<float>(eps),
                        scale ? scale->data_ptr<float>() : nullptr, shift ? shift->data_ptr<float>() : nullptr,
                        norms ? norms->data_ptr<float>() : nullptr, hidden, write};
  // Output rows per block: one where windows are read in place; else
  // enough for about kBackwardPositionBlock positions of patch rows, so that
  // short rows do not leave the micro-kernel thin remainder tiles.
  const long lines = in_place ? 1 : std::max(1L, kBackwardPositionBlock / out_w);
  const long total_lines = g.batch * out_h, blocks = (total_lines + lines - 1) / lines;
  at::parallel_for(0, blocks, 1, [&](long begin, long end) {
    std::vector<float> patches(lines * out_w * D), raw(lines * out_w * padded), energies(out_w);
    for (long block = begin; block < end; ++block) {
      const long first_line = block * lines, count = std::min(lines, total_lines - first_line) * out_w;
      const long q0 = first_line * out_w;
      if (!in_place) {
        build_patches(g, xp, nullptr, q0, count, patches.data());
        gemm(count, padded, D, patches.data(), D, 1, vp, padded, raw.data(), padded, Write::overwrite);
      } else {
        Position pos = g.position(q0);
        const bool inside = g.top(pos) >= 0 && g.top(pos) + k <= g.in_h;
        const long lo = inside ? first : out_w, hi = inside ? last : out_w;
        // Patch rows for the border columns [0, lo) and [hi, out_w).
        for (const auto& [from, to] : {std::pair<long, long>{0, lo}, std::pair<long, long>{hi, out_w}}) {
          if (to <= from) continue;
          build_patches(g, xp, nullptr, q0 + from, to - from, patches.data());
          gemm(to - from, padded, D, patches.data(), D, 1, vp, padded, raw.data() + from * padded, padded,
               Write::overwrite);
        }
        if (hi > lo) {
          pos.ow = lo;
          gemm_windows(hi - lo, padded, xp + g.corner(pos), stride * C, g.in_w * C, k, k * C, vp, padded,
                       raw.data() + lo * padded, padded);
        }
      }
      for (long q = q0; q < q0 + count; q += out_w) {
        normalize_line(pixels, n, q, raw.data() + (q - q0) * padded, padded, up, energies.data());
      }
    }
    if (write == Write::stream) stream_fence();
  });
  return u;
}

// Backward of the normalisation h = u * r, r = 1 / sqrt(e + eps) the inverse
// patch norm of each position (the norms meta_normalize wrote), given dh:
//   du[p,j] = dh[p,j] r[p],
//   de[p]   = -r[p]^2 / 2 * sum_j dh[p,j] h[p,j]
// (dL/dr = sum_j dh u = sum_j dh h / r, and dr/de = -r^3 / 2): one pass over
// dh and h. All NHWC: dh and h (B, Ho, Wo, hidden), r (B, Ho, Wo).
std::vector<torch::Tensor> meta_normalize_backward(torch::Tensor dh, torch::Tensor h, torch::Tensor norms) {
  const long total = norms.numel(), hidden = h.size(3);
  auto du = torch::empty_like(h);
  auto de = torch::empty_like(norms);
  const float* dhp = dh.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* np = norms.data_ptr<float>();
  float* dup = du.data_ptr<float>();
  float* dep = de.data_ptr<float>();
  at::parallel_for(0, total, 256, [&](long begin, long end) {
    for (long q = begin; q < end; ++q) {
      const float* g = dhp + q * hidden;
      const float* row = hp + q * hidden;
      float* out = dup + q * hidden;
      const float norm = np[q];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (long j = 0; j < hidden; ++j) {
        dot += g[j] * row[j];
        out[j] = g[j] * norm;
      }
      dep[q] = -0.5f * norm * norm * dot;
    }
  });
  return {du, de};
}

// Adds the patch energy's share to dx, in place: the energy of position p is
// the sum over its window of the pixels' channel squares, so
//   dx[b,pixel,c] += 2 x[b,pixel,c] * sum_{p whose window holds the pixel} de[b,p].
// Each sample's window sums are scattered into a per-thread map, then applied
// in one pass over the sample. x, dx NHWC (B, H, W, C), de (B, Ho, Wo).
void add_energy_gradient(torch::Tensor x, torch::Tensor dx, torch::Tensor de, int64_t k, int64_t stride,
                         int64_t padding) {
  const Geometry g = pixel_geometry(x, de.size(1), de.size(2), k, stride, padding);
  const long C = x.size(3), pixels = g.in_h * g.in_w;
  const float* xp = x.data_ptr<float>();
  const float* dep = de.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  at::parallel_for(0, g.batch, 1, [&](long begin, long end) {
    std::vector<float> window_sums(pixels);
    std::vector<long> offsets(g.taps);
    for (long b = begin; b < end; ++b) {
      std::fill(window_sums.begin(), window_sums.end(), 0.f);
      const long first = b * g.positions(), sample_start = b * pixels;
      Position pos = g.position(first);
      for (long q = first; q < first + g.positions(); ++q, g.advance(pos)) {
        g.sources(pos, offsets.data());
        for (long t = 0; t < g.taps; ++t)
          if (offsets[t] >= 0) window_sums[offsets[t] - sample_start] += dep[q];
      }
      for (long i = 0; i < pixels; ++i) {
        const float gain = 2.f * window_sums[i];
        const float* row = xp + (sample_start + i) * C;
        float* out = dxp + (sample_start + i) * C;
#pragma omp simd
        for (long c = 0; c < C; ++c) out[c] += gain * row[c];
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &tap_modulated_forward, "tap-modulated convolution, fused (CPU, float32)");
  module.def("backward", &tap_modulated_backward, "its input, weight and similarity gradients");
  module.def("meta_normalize", &meta_normalize, "the meta-network's normalisation, in place (CPU, float32)");
  module.def("meta_hidden_direct", &meta_hidden_direct, "the meta-network's first stage on few channels (CPU, float32)");
  module.def("meta_normalize_backward", &meta_normalize_backward, "the normalisation's backward (CPU, float32)");
  module.def("add_energy_gradient", &add_energy_gradient, "the patch energy's input gradient, added (CPU, float32)");
}
