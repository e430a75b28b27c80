// Depthwise 2-D convolution for MindSpore's CPU training (framework/models/kernels/__init__.py builds it):
// NCHW float32, one channel per group, square kernel K, stride S, zero padding K/2 on every side (nn.Conv2d with
// pad_mode="pad", padding=K//2), no bias. With MindSpore 2.8's CPU depthwise kernel EfficientNet-B2 trained at 38.7
// img/s (64 px, batch 32), with this one at 46-50. Each function has MindSpore's AOT signature and takes the
// stride in an int32 spec tensor (stride, padding rule: always 0 here). Two layouts, chosen by the map's width (kPackedBelow):
// - wide maps slide each (sample, channel) plane, vectorised along its rows;
// - narrow maps (rows too short to vectorise, and a per-row cost that dominated: 1,248 channels of 2x2 took 6.9 ms
//   forward, now 0.7) copy one channel of every sample into a zero-padded (H + 2p, W + 2p, N) buffer and vectorise
//   across the batch. Its copies cost more than it saves from width 32 on (measured: 32 x 32 x 32 channels, 3x3).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace {

constexpr int64_t kPackedBelow = 32;  // maps narrower than this run in the batch-packed layout

struct Shape {
  int64_t n, c, h, w, k, oh, ow, s, p;
};

// x: input (N, C, H, W); kernel: (C, 1, K, K); out: (N, C, OH, OW); spec: stride, padding rule
Shape shape_of(const int64_t *x, const int64_t *kernel, const int64_t *out, const void *spec) {
  return {x[0], x[1], x[2], x[3], kernel[2], out[2], out[3], *static_cast<const int32_t *>(spec), kernel[2] / 2};
}

// body(i, j) for every element of channel c of a (N, C, rows, cols) tensor: i its index there, j its index in the
// packed (rows + 2p, cols + 2p, N) buffer, whose border of p stays zero
template <typename Body>
void for_each_packed(const Shape &d, int64_t c, int64_t rows, int64_t cols, int64_t p, Body body) {
  for (int64_t n = 0; n < d.n; ++n) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t q = 0; q < cols; ++q) body(((n * d.c + c) * rows + r) * cols + q, ((r + p) * (cols + 2 * p) + q + p) * d.n + n);
    }
  }
}

// body(tap, in, out) for every output pixel and kernel tap: in, out the offsets of their N-sample vectors in the
// packed padded input and the packed output
template <typename Body>
void for_each_packed_tap(const Shape &d, Body body) {
  const int64_t width = d.w + 2 * d.p;
  for (int64_t oh = 0; oh < d.oh; ++oh) {
    for (int64_t ow = 0; ow < d.ow; ++ow) {
      for (int64_t kh = 0; kh < d.k; ++kh) {
        for (int64_t kw = 0; kw < d.k; ++kw) {
          body(kh * d.k + kw, ((oh * d.s + kh) * width + ow * d.s + kw) * d.n, (oh * d.ow + ow) * d.n);
        }
      }
    }
  }
}

// the output columns [first, last) whose input column ow * s + kw - p lies inside the row
void columns(const Shape &d, int64_t kw, int64_t *first, int64_t *last) {
  const int64_t before = d.p - kw, room = d.w - 1 + d.p - kw;  // room < 0: the tap never meets the row
  *first = before > 0 ? (before + d.s - 1) / d.s : 0;
  *last = room < 0 ? 0 : std::min<int64_t>(d.ow, room / d.s + 1);
}

// body(tap, oh, offset, first, last) for every kernel tap (kh * K + kw) and output row oh whose input row lies
// inside the map: input column ow * s + offset, for the output columns [first, last) inside the row
template <typename Body>
void for_each_tap_row(const Shape &d, Body body) {
  for (int64_t kh = 0; kh < d.k; ++kh) {
    for (int64_t kw = 0; kw < d.k; ++kw) {
      int64_t first, last;
      columns(d, kw, &first, &last);
      for (int64_t oh = 0; oh < d.oh; ++oh) {
        const int64_t ih = oh * d.s + kh - d.p;
        if (ih >= 0 && ih < d.h) body(kh * d.k + kw, oh, ih * d.w + kw - d.p, first, last);
      }
    }
  }
}

// Forward (gather: out[oh][ow] += tap * in[ih][ow * s + kw - p]) and input gradient (scatter: the transpose,
// from dy into dx) of every channel plane, planes split over the cores
template <bool kScatter>
void slide(const float *source, const float *weight, float *target, const Shape d) {
  const int64_t map = d.h * d.w, out = d.oh * d.ow, s = d.s, width = d.ow;
  parallel_for(d.n * d.c, [=](int64_t plane) {
    const float *src = source + plane * (kScatter ? out : map);
    const float *wp = weight + (plane % d.c) * d.k * d.k;
    float *dst = target + plane * (kScatter ? map : out);
    std::memset(dst, 0, sizeof(float) * (kScatter ? map : out));
    for_each_tap_row(d, [&](int64_t tap, int64_t oh, int64_t offset, int64_t first, int64_t last) {
      const float t = wp[tap];
      if (kScatter) {
        float *row = dst + offset;
        const float *grad = src + oh * width;
        if (s == 1) {
#pragma omp simd
          for (int64_t ow = first; ow < last; ++ow) row[ow] += t * grad[ow];
        } else {
          for (int64_t ow = first; ow < last; ++ow) row[ow * s] += t * grad[ow];
        }
      } else {
        const float *row = src + offset;
        float *result = dst + oh * width;
#pragma omp simd
        for (int64_t ow = first; ow < last; ++ow) result[ow] += t * row[ow * s];
      }
    });
  });
}

// a packed buffer of this thread, kept across channels: freeing one above glibc's 128 KB mmap threshold per
// channel made 28 x 28 maps 1.5x slower
template <int kIndex>
std::vector<float> &buffer() {
  thread_local std::vector<float> packed;
  return packed;
}

// slide's two directions in the packed layout, one channel of every sample at a time
template <bool kScatter>
void slide_packed(const float *source, const float *weight, float *target, const Shape d) {
  parallel_for(d.c, [=](int64_t c) {
    std::vector<float> &padded = buffer<0>(), &compact = buffer<1>();
    padded.assign((d.h + 2 * d.p) * (d.w + 2 * d.p) * d.n, 0.0f);
    compact.assign(d.oh * d.ow * d.n, 0.0f);
    std::vector<float> &from = kScatter ? compact : padded, &to = kScatter ? padded : compact;
    const int64_t rows = kScatter ? d.oh : d.h, cols = kScatter ? d.ow : d.w, pad = kScatter ? 0 : d.p;
    for_each_packed(d, c, rows, cols, pad, [&](int64_t i, int64_t j) { from[j] = source[i]; });
    const float *wp = weight + c * d.k * d.k;
    const int64_t lanes = d.n;
    for_each_packed_tap(d, [&](int64_t tap, int64_t in, int64_t out) {
      const float t = wp[tap];
      const float *src = from.data() + (kScatter ? out : in);
      float *dst = to.data() + (kScatter ? in : out);
#pragma omp simd
      for (int64_t n = 0; n < lanes; ++n) dst[n] += t * src[n];
    });
    const int64_t to_rows = kScatter ? d.h : d.oh, to_cols = kScatter ? d.w : d.ow, to_pad = kScatter ? d.p : 0;
    for_each_packed(d, c, to_rows, to_cols, to_pad, [&](int64_t i, int64_t j) { target[i] = to[j]; });
  });
}

template <bool kScatter>
void convolve(const float *source, const float *weight, float *target, const Shape d) {
  if (d.w < kPackedBelow) {
    slide_packed<kScatter>(source, weight, target, d);
  } else {
    slide<kScatter>(source, weight, target, d);
  }
}

// the weight gradient per channel, rows (wide maps) or the batch (packed, narrow maps) vectorised; each row's sum
// is added in double, as MindSpore's reference is exact to ~1e-6
void weight_gradient(const float *dy, const float *x, float *dweight, const Shape d) {
  parallel_for(d.c, [=](int64_t c) {
    std::vector<double> total(d.k * d.k, 0.0);
    if (d.w < kPackedBelow) {
      std::vector<float> &padded = buffer<0>(), &grad = buffer<1>();
      padded.assign((d.h + 2 * d.p) * (d.w + 2 * d.p) * d.n, 0.0f);
      grad.resize(d.oh * d.ow * d.n);
      for_each_packed(d, c, d.h, d.w, d.p, [&](int64_t i, int64_t j) { padded[j] = x[i]; });
      for_each_packed(d, c, d.oh, d.ow, 0, [&](int64_t i, int64_t j) { grad[j] = dy[i]; });
      const int64_t lanes = d.n;
      for_each_packed_tap(d, [&](int64_t tap, int64_t in, int64_t out) {
        const float *row = padded.data() + in, *gr = grad.data() + out;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t n = 0; n < lanes; ++n) sum += gr[n] * row[n];
        total[tap] += sum;
      });
    } else {
      for (int64_t n = 0; n < d.n; ++n) {
        const float *xp = x + (n * d.c + c) * d.h * d.w, *gp = dy + (n * d.c + c) * d.oh * d.ow;
        for_each_tap_row(d, [&](int64_t tap, int64_t oh, int64_t offset, int64_t first, int64_t last) {
          const float *row = xp + offset, *gr = gp + oh * d.ow;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t ow = first; ow < last; ++ow) sum += gr[ow] * row[ow * d.s];
          total[tap] += sum;
        });
      }
    }
    for (int64_t tap = 0; tap < d.k * d.k; ++tap) dweight[c * d.k * d.k + tap] = static_cast<float>(total[tap]);
  });
}

}  // namespace

extern "C" {

// params: x, weight, spec, y
int DepthwiseForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  convolve<false>(x, static_cast<const float *>(params[1]), static_cast<float *>(params[3]),
                  shape_of(shapes[0], shapes[1], shapes[3], params[2]));
  return 0;
}

// params: dy, weight, x (its shape), spec, dx
int DepthwiseBackwardInput(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  convolve<true>(dy, static_cast<const float *>(params[1]), static_cast<float *>(params[4]),
                 shape_of(shapes[2], shapes[1], shapes[0], params[3]));
  return 0;
}

// params: dy, x, weight (its shape), spec, dweight
int DepthwiseBackwardWeight(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  weight_gradient(dy, x, static_cast<float *>(params[4]), shape_of(shapes[1], shapes[2], shapes[0], params[3]));
  return 0;
}

}  // extern "C"
