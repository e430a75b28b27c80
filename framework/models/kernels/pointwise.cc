// 1x1 convolution (stride 1, one group, no bias) for MindSpore's CPU training (framework/models/kernels/__init__.py
// builds it), NCHW float32, as matrix products in OpenBLAS (the scipy-openblas32 wheel; each product on one
// thread, the products split over the cores as in depthwise.cc). MindSpore 2.8's CPU convolution reached ~25 GFLOP/s on
// NFNet-F0's 1x1 layers at 64 px, OpenBLAS ~190 on the same products (measured: 1536 -> 3072 channels on a 2 x 2 map,
// batch 32: 25.2 ms forward, as one product 6.3 ms).
// Per sample, out (Co x HW) = W (Co x Ci) in (Ci x HW). Maps of at least kPerSampleFrom pixels take one product
// per sample; smaller ones would make thin products, so the batch is copied side by side, (C x N * HW), first.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "cblas.h"  // scipy-openblas32's: every symbol prefixed scipy_

namespace {

constexpr int64_t kPerSampleFrom = 256;

// body(first, last) over [0, count) in one slice per core; plain threads started per call: OpenBLAS's own pool
// would keep its threads spinning after each product, taking the cores from MindSpore's kernels
template <typename Body>
void parallel_slices(int64_t count, Body body) {
  static std::once_flag single;
  std::call_once(single, [] { scipy_openblas_set_num_threads(1); });
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(count, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  for (int64_t worker = 1; worker < workers; ++worker) {
    threads.emplace_back(body, worker * count / workers, (worker + 1) * count / workers);
  }
  body(0, count / workers);
  for (auto &thread : threads) thread.join();
}

// (N, C, HW) ↔ (C, N * HW): each sample's channel row next to the other samples'
void side_by_side(const float *from, float *to, int64_t n, int64_t c, int64_t hw, bool pack) {
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t sample_major = (s * c + ch) * hw, channel_major = (ch * n + s) * hw;
      std::memcpy(to + (pack ? channel_major : sample_major), from + (pack ? sample_major : channel_major),
                  sizeof(float) * hw);
    }
  }
}

// per sample, target (rows x HW) = op(W) (rows x depth) source (depth x HW); op(W) is W (rows x depth), or W's
// transpose for W (depth x rows)
void weight_times(const float *w, bool transpose, const float *source, float *target, int64_t n, int64_t rows,
                  int64_t depth, int64_t hw) {
  const CBLAS_TRANSPOSE op = transpose ? CblasTrans : CblasNoTrans;
  const int64_t ldw = transpose ? rows : depth;
  if (hw >= kPerSampleFrom) {
    parallel_slices(n, [=](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        scipy_cblas_sgemm(CblasRowMajor, op, CblasNoTrans, rows, hw, depth, 1.0f, w, ldw, source + s * depth * hw, hw,
                    0.0f, target + s * rows * hw, hw);
      }
    });
    return;
  }
  const int64_t cols = n * hw;
  std::vector<float> packed_source(depth * cols), packed_target(rows * cols);
  side_by_side(source, packed_source.data(), n, depth, hw, true);
  parallel_slices(rows, [&](int64_t first, int64_t last) {
    const float *w_rows = w + first * (transpose ? 1 : depth);
    scipy_cblas_sgemm(CblasRowMajor, op, CblasNoTrans, last - first, cols, depth, 1.0f, w_rows, ldw,
                packed_source.data(), cols, 0.0f, packed_target.data() + first * cols, cols);
  });
  side_by_side(packed_target.data(), target, n, rows, hw, false);
}

// dW (Co x Ci) = sum over samples of dy (Co x HW) x^T (HW x Ci), the output channels split over the cores
void weight_gradient(const float *dy, const float *x, float *dw, int64_t n, int64_t co, int64_t ci, int64_t hw) {
  if (hw >= kPerSampleFrom) {
    parallel_slices(co, [=](int64_t first, int64_t last) {
      for (int64_t s = 0; s < n; ++s) {
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, last - first, ci, hw, 1.0f,
                    dy + (s * co + first) * hw, hw, x + s * ci * hw, hw, s == 0 ? 0.0f : 1.0f, dw + first * ci, ci);
      }
    });
    return;
  }
  const int64_t cols = n * hw;
  std::vector<float> packed_dy(co * cols), packed_x(ci * cols);
  side_by_side(dy, packed_dy.data(), n, co, hw, true);
  side_by_side(x, packed_x.data(), n, ci, hw, true);
  parallel_slices(co, [&](int64_t first, int64_t last) {
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, last - first, ci, cols, 1.0f, packed_dy.data() + first * cols,
                cols, packed_x.data(), cols, 0.0f, dw + first * ci, ci);
  });
}

int64_t pixels(const int64_t *shape) { return shape[2] * shape[3]; }

}  // namespace

extern "C" {

// params: x (N, Ci, H, W), weight (Co, Ci, 1, 1), y (N, Co, H, W)
int PointwiseForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const int64_t *x = shapes[0], *w = shapes[1];
  weight_times(static_cast<const float *>(params[1]), false, static_cast<const float *>(params[0]),
               static_cast<float *>(params[2]), x[0], w[0], w[1], pixels(x));
  return 0;
}

// params: dy (N, Co, H, W), weight, x (its shape), dx
int PointwiseBackwardInput(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const int64_t *dy = shapes[0], *w = shapes[1];
  weight_times(static_cast<const float *>(params[1]), true, static_cast<const float *>(params[0]),
               static_cast<float *>(params[3]), dy[0], w[1], w[0], pixels(dy));
  return 0;
}

// params: dy, x, weight (its shape), dweight
int PointwiseBackwardWeight(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const int64_t *dy = shapes[0], *w = shapes[2];
  weight_gradient(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                  static_cast<float *>(params[3]), dy[0], w[0], w[1], pixels(dy));
  return 0;
}

}  // extern "C"
