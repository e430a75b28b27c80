// Depthwise 2-D convolution for MindSpore's CPU training (framework/models/kernels/__init__.py builds it):
// NCHW float32, one channel per group, square kernel K, stride S, zero padding K/2 on every side (nn.Conv2d with
// pad_mode="pad", padding=K//2), no bias. With MindSpore 2.8's CPU depthwise kernel EfficientNet-B2 trained at 38.7
// img/s (64 px, batch 32), with this one at 46-50. Each function has MindSpore's AOT signature; the stride is
// recovered from the shapes.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

// body(i) for i in [0, count), split over the machine's cores: plain threads started per call (~0.1 ms), not
// OpenMP, whose idle threads spin and took the cores from MindSpore's own (EfficientNet-B2: 38-42 img/s)
template <typename Body>
void parallel_for(int64_t count, Body body) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(count, std::thread::hardware_concurrency()));
  auto run = [&](int64_t worker) {
    for (int64_t i = worker * count / workers; i < (worker + 1) * count / workers; ++i) body(i);
  };
  std::vector<std::thread> threads;
  for (int64_t worker = 1; worker < workers; ++worker) threads.emplace_back(run, worker);
  run(0);
  for (auto &thread : threads) thread.join();
}

struct Shape {
  int64_t n, c, h, w, k, oh, ow, s, p;
};

// x: input (N, C, H, W); kernel: (C, 1, K, K); out: (N, C, OH, OW)
Shape shape_of(const int64_t *x, const int64_t *kernel, const int64_t *out) {
  Shape d{x[0], x[1], x[2], x[3], kernel[2], out[2], out[3], 1, kernel[2] / 2};
  while (d.s < d.h && (d.h + 2 * d.p - d.k) / d.s + 1 != d.oh) ++d.s;
  return d;
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

}  // namespace

extern "C" {

// params: x, weight, y
int DepthwiseForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  slide<false>(x, static_cast<const float *>(params[1]), static_cast<float *>(params[2]),
               shape_of(shapes[0], shapes[1], shapes[2]));
  return 0;
}

// params: dy, weight, x (its shape), dx
int DepthwiseBackwardInput(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  slide<true>(dy, static_cast<const float *>(params[1]), static_cast<float *>(params[3]),
              shape_of(shapes[2], shapes[1], shapes[0]));
  return 0;
}

// params: dy, x, weight (its shape), dweight
int DepthwiseBackwardWeight(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  float *dweight = static_cast<float *>(params[3]);
  const Shape d = shape_of(shapes[1], shapes[2], shapes[0]);
  parallel_for(d.c, [=](int64_t c) {
    for (int64_t kh = 0; kh < d.k; ++kh) {
      for (int64_t kw = 0; kw < d.k; ++kw) {
        int64_t first, last;
        columns(d, kw, &first, &last);
        double total = 0.0;  // over N * OH rows: summed in double, as MindSpore's reference is exact to ~1e-6
        for (int64_t n = 0; n < d.n; ++n) {
          const float *xp = x + (n * d.c + c) * d.h * d.w;
          const float *gp = dy + (n * d.c + c) * d.oh * d.ow;
          for (int64_t oh = 0; oh < d.oh; ++oh) {
            const int64_t ih = oh * d.s + kh - d.p;
            if (ih < 0 || ih >= d.h) continue;
            const float *row = xp + ih * d.w + kw - d.p;
            const float *gr = gp + oh * d.ow;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t ow = first; ow < last; ++ow) sum += gr[ow] * row[ow * d.s];
            total += sum;
          }
        }
        dweight[(c * d.k + kh) * d.k + kw] = static_cast<float>(total);
      }
    }
  });
  return 0;
}

}  // extern "C"
