// Convolution as matrix products for MindSpore's CPU training (framework/models/kernels/__init__.py builds it):
// NCHW float32, k x k, any stride, any groups, no bias, zero padding either k/2 on every side or TensorFlow's
// "SAME" (the odd pixel at the bottom and right). The products run in OpenBLAS (the scipy-openblas32 wheel), each on
// one thread, the products split over the cores by parallel.h. MindSpore 2.8's CPU convolution is slow on
// tiny maps and narrow stems: NFNet-F0's 1536 -> 3072 channel 1x1 on a 2 x 2 map, batch 32, took 25.2 ms forward
// (~25 GFLOP/s), as one product 6.3 ms. framework/models/kernels/__init__.py:conv2d says which layers use it.
//
// Per sample and group, out (Co/G x P) = W (Co/G x Ci/G k k) col (Ci/G k k x P), P = OH * OW, where col holds
// the input pixel under each kernel tap ("im2col"; a 1x1 convolution at stride 1 uses the input itself); a group's
// rows of col and of W lie next to each other. Maps of at least kPerSampleFrom output pixels take one product per
// sample; smaller ones would make thin products, so the batch's columns are laid side by side, (rows x N * P),
// first.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "cblas.h"  // scipy-openblas32's: every symbol prefixed scipy_
#include "parallel.h"

namespace {

// 14 x 14: the batch's columns would be large there (ResNeXt's 512 channels, 32 groups, batch 32: 115 MB; 293 ms
// a train step against 66 per sample)
constexpr int64_t kPerSampleFrom = 196;

struct Geometry {
  int64_t n, ci, h, w, co, k, oh, ow, s, top, left, groups;
  int64_t pixels() const { return oh * ow; }
  int64_t map() const { return ci * h * w; }     // one input sample
  int64_t depth() const { return ci / groups * k * k; }   // a row of W: one group's rows of col
  int64_t group_out() const { return co / groups; }       // a group's output channels
  bool direct() const { return k == 1 && s == 1; }  // col is the input itself
  bool per_sample() const { return pixels() >= kPerSampleFrom; }
};

// x (N, Ci, H, W), weight (Co, Ci / G, k, k), y (N, Co, OH, OW); spec: stride, 1 for TensorFlow's "SAME" padding
Geometry geometry_of(const int64_t *x, const int64_t *weight, const int64_t *y, const int32_t *spec) {
  Geometry g{x[0], x[1], x[2], x[3], weight[0], weight[2], y[2], y[3], spec[0], weight[2] / 2, weight[2] / 2,
             x[1] / weight[1]};
  if (spec[1] == 1) {
    g.top = std::max<int64_t>((g.oh - 1) * g.s + g.k - g.h, 0) / 2;
    g.left = std::max<int64_t>((g.ow - 1) * g.s + g.k - g.w, 0) / 2;
  }
  return g;
}

// for every tap (c, kh, kw) and output row: body(col row, offset of the row's first output pixel, input row or -1
// when it lies in the padding, first and last output columns whose input column lies inside the map)
template <typename Body>
void for_each_tap_row(const Geometry &g, Body body) {
  for (int64_t c = 0; c < g.ci; ++c) {
    for (int64_t kh = 0; kh < g.k; ++kh) {
      for (int64_t kw = 0; kw < g.k; ++kw) {
        const int64_t before = g.left - kw, room = g.w - 1 + g.left - kw;
        const int64_t first = before > 0 ? std::min<int64_t>(g.ow, (before + g.s - 1) / g.s) : 0;
        const int64_t last = room < 0 ? 0 : std::max<int64_t>(first, std::min<int64_t>(g.ow, room / g.s + 1));
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          const int64_t ih = oh * g.s + kh - g.top;
          body((c * g.k + kh) * g.k + kw, oh * g.ow, ih >= 0 && ih < g.h ? c * g.h * g.w + ih * g.w : -1,
               kw - g.left, first, last);
        }
      }
    }
  }
}

// one sample's columns into col (row stride ld): col[tap][oh * OW + ow] = x[c][ih][ow * s + kw - left], 0 outside
void im2col(const float *x, const Geometry &g, float *col, int64_t ld) {
  for_each_tap_row(g, [&](int64_t row, int64_t at, int64_t input, int64_t shift, int64_t first, int64_t last) {
    float *out = col + row * ld + at;
    if (input < 0) {
      std::memset(out, 0, sizeof(float) * g.ow);
      return;
    }
    std::fill(out, out + first, 0.0f);
    const float *in = x + input + shift;
    if (g.s == 1) {
      std::memcpy(out + first, in + first, sizeof(float) * (last - first));
    } else {
      for (int64_t ow = first; ow < last; ++ow) out[ow] = in[ow * g.s];
    }
    std::fill(out + last, out + g.ow, 0.0f);
  });
}

// the transpose: each column entry added back to its input pixel of one sample's dx (zeroed first)
void col2im(const float *col, const Geometry &g, float *dx, int64_t ld) {
  std::memset(dx, 0, sizeof(float) * g.ci * g.h * g.w);
  for_each_tap_row(g, [&](int64_t row, int64_t at, int64_t input, int64_t shift, int64_t first, int64_t last) {
    if (input < 0) return;
    const float *in = col + row * ld + at;
    float *out = dx + input + shift;
    if (g.s == 1) {
#pragma omp simd
      for (int64_t ow = first; ow < last; ++ow) out[ow] += in[ow];
    } else {
      for (int64_t ow = first; ow < last; ++ow) out[ow * g.s] += in[ow];
    }
  });
}

// (N, C, P) ↔ (C, N * P): each sample's channel row next to the other samples'
void side_by_side(const float *from, float *to, int64_t n, int64_t c, int64_t p, bool pack) {
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t sample_major = (s * c + ch) * p, channel_major = (ch * n + s) * p;
      std::memcpy(to + (pack ? channel_major : sample_major), from + (pack ? sample_major : channel_major),
                  sizeof(float) * p);
    }
  }
}

// rows [first, last) of C (rows x cols) = op(A) op(B), row-major, on this thread (OpenBLAS's own threads off)
void product(bool trans_a, bool trans_b, int64_t first, int64_t last, int64_t cols, int64_t inner, const float *a,
             int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  static std::once_flag single;
  std::call_once(single, [] { scipy_openblas_set_num_threads(1); });
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    last - first, cols, inner, 1.0f, a + first * (trans_a ? 1 : lda), lda, b, ldb, beta,
                    c + first * ldc, ldc);
}

// body(group, first, last) over the rows [first, last) of a matrix of per_group-row groups, cut at their borders
template <typename Body>
void by_group(int64_t first, int64_t last, int64_t per_group, Body body) {
  for (int64_t row = first; row < last;) {
    const int64_t group = row / per_group, end = std::min(last, (group + 1) * per_group);
    body(group, row, end);
    row = end;
  }
}

// every sample's columns side by side: col (Ci k k x N * P)
std::vector<float> batch_columns(const float *x, const Geometry &g) {
  const int64_t p = g.pixels(), cols = g.n * p;
  std::vector<float> col(g.groups * g.depth() * cols);
  parallel_slices(g.n, 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) im2col(x + s * g.map(), g, col.data() + s * p, cols);
  });
  return col;
}

// y = W col per sample and group
void forward(const float *x, const float *w, float *y, const Geometry &g) {
  const int64_t p = g.pixels(), depth = g.depth(), per = g.group_out();
  if (g.per_sample()) {
    parallel_slices(g.n, 1, [&](int64_t first, int64_t last) {
      std::vector<float> col(g.direct() ? 0 : g.groups * depth * p);
      for (int64_t s = first; s < last; ++s) {
        const float *input = x + s * g.map();
        if (!g.direct()) im2col(input, g, col.data(), p);
        const float *source = g.direct() ? input : col.data();
        for (int64_t group = 0; group < g.groups; ++group) {
          product(false, false, group * per, (group + 1) * per, p, depth, w, depth, source + group * depth * p, p,
                  0.0f, y + s * g.co * p, p);
        }
      }
    });
    return;
  }
  const int64_t cols = g.n * p;
  const std::vector<float> col = batch_columns(x, g);
  std::vector<float> out(g.co * cols);
  parallel_slices(g.co, 1, [&](int64_t first, int64_t last) {
    by_group(first, last, per, [&](int64_t group, int64_t from, int64_t to) {
      product(false, false, from, to, cols, depth, w, depth, col.data() + group * depth * cols, cols, 0.0f,
              out.data(), cols);
    });
  });
  side_by_side(out.data(), y, g.n, g.co, p, false);
}

// dcol = W^T dy per sample and group, added back into dx
void backward_input(const float *dy, const float *w, float *dx, const Geometry &g) {
  const int64_t p = g.pixels(), depth = g.depth(), per = g.group_out();
  if (g.per_sample()) {
    parallel_slices(g.n, 1, [&](int64_t first, int64_t last) {
      std::vector<float> dcol(g.direct() ? 0 : g.groups * depth * p);
      for (int64_t s = first; s < last; ++s) {
        float *target = g.direct() ? dx + s * g.map() : dcol.data();
        for (int64_t group = 0; group < g.groups; ++group) {
          product(true, false, 0, depth, p, per, w + group * per * depth, depth, dy + (s * g.co + group * per) * p,
                  p, 0.0f, target + group * depth * p, p);
        }
        if (!g.direct()) col2im(dcol.data(), g, dx + s * g.map(), p);
      }
    });
    return;
  }
  const int64_t cols = g.n * p;
  std::vector<float> grad(g.co * cols), dcol(g.groups * depth * cols);
  side_by_side(dy, grad.data(), g.n, g.co, p, true);
  parallel_slices(g.groups * depth, 1, [&](int64_t first, int64_t last) {
    by_group(first, last, depth, [&](int64_t group, int64_t from, int64_t to) {
      product(true, false, from - group * depth, to - group * depth, cols, per, w + group * per * depth, depth,
              grad.data() + group * per * cols, cols, 0.0f, dcol.data() + group * depth * cols, cols);
    });
  });
  parallel_slices(g.n, 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) col2im(dcol.data() + s * p, g, dx + s * g.map(), cols);
  });
}

// dW = sum over samples of dy col^T per group, the output channels split over the cores
void backward_weight(const float *dy, const float *x, float *dw, const Geometry &g) {
  const int64_t p = g.pixels(), depth = g.depth(), per = g.group_out();
  if (g.per_sample()) {
    parallel_slices(g.co, 1, [&](int64_t first, int64_t last) {
      std::vector<float> col(g.direct() ? 0 : g.groups * depth * p);
      for (int64_t s = 0; s < g.n; ++s) {
        const float *input = x + s * g.map();
        if (!g.direct()) im2col(input, g, col.data(), p);
        const float *source = g.direct() ? input : col.data();
        by_group(first, last, per, [&](int64_t group, int64_t from, int64_t to) {
          product(false, true, from, to, depth, p, dy + s * g.co * p, p, source + group * depth * p, p,
                  s ? 1.0f : 0.0f, dw, depth);
        });
      }
    });
    return;
  }
  const int64_t cols = g.n * p;
  std::vector<float> grad(g.co * cols);
  side_by_side(dy, grad.data(), g.n, g.co, p, true);
  const std::vector<float> col = batch_columns(x, g);
  parallel_slices(g.co, 1, [&](int64_t first, int64_t last) {
    by_group(first, last, per, [&](int64_t group, int64_t from, int64_t to) {
      product(false, true, from, to, depth, cols, grad.data(), cols, col.data() + group * depth * cols, cols, 0.0f,
              dw, depth);
    });
  });
}

}  // namespace

extern "C" {

// params: x (N, Ci, H, W), weight (Co, Ci / G, k, k), spec (int32: stride, "SAME"), y (N, Co, OH, OW)
int ConvolutionForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  forward(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]), static_cast<float *>(params[3]),
          geometry_of(shapes[0], shapes[1], shapes[3], static_cast<const int32_t *>(params[2])));
  return 0;
}

// params: dy, weight, x (its shape), spec, dx
int ConvolutionBackwardInput(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  backward_input(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<float *>(params[4]),
                 geometry_of(shapes[2], shapes[1], shapes[0], static_cast<const int32_t *>(params[3])));
  return 0;
}

// params: dy, x, weight (its shape), spec, dweight
int ConvolutionBackwardWeight(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  backward_weight(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                  static_cast<float *>(params[4]),
                  geometry_of(shapes[1], shapes[2], shapes[0], static_cast<const int32_t *>(params[3])));
  return 0;
}

}  // extern "C"
