// Fused activations for MindSpore's CPU training (framework/models/kernels/__init__.py builds them): one pass
// forward, one pass backward that recomputes the activation from its input. MindSpore differentiates a formula
// op by op and keeps each op's intermediate for the backward; these keep only the input, as PyTorch's fused
// activations do. float32, any shape; ``scale`` is a one-element tensor multiplying the output (NFNet's gamma).
#include <cstdint>

#include "parallel.h"

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per thread at least: a thread's start costs ~0.1 ms

// exp(x) to ~2 ulp in a form the compiler vectorises (Cephes' expf: 2^n times a degree-6 polynomial). glibc's
// expf has vector variants only under -ffast-math, which would also loosen every other operation here; std::min,
// std::max (they return references), std::floor and a second conditional each kept the loops scalar.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2): adding 1.5 * 2^23
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);  // 2^n; memcpy would not vectorise
}

inline float sigmoid(float z) { return 1.0f / (1.0f + exp_approx(-z)); }

// GELU, tanh form, as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) (0.5 (1 + tanh z) = sigmoid(2z))
constexpr float kGeluScale = 1.5957691216057308f, kGeluCubic = 0.044715f;

struct Gelu {
  static float forward(float x) { return x * sigmoid(kGeluScale * (x + kGeluCubic * x * x * x)); }
  static float derivative(float x) {
    const float s = sigmoid(kGeluScale * (x + kGeluCubic * x * x * x));
    return s + x * s * (1.0f - s) * kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
  }
};

struct Silu {  // x * sigmoid(x), "swish"
  static float forward(float x) { return x * sigmoid(x); }
  static float derivative(float x) {
    const float s = sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
  }
};

// the loops as functions of restrict pointers, so the compiler may vectorise them
template <typename Activation>
void forward_slice(const float *__restrict x, float scale, float *__restrict y, int64_t first, int64_t last) {
#pragma omp simd
  for (int64_t i = first; i < last; ++i) y[i] = scale * Activation::forward(x[i]);
}

template <typename Activation>
void backward_slice(const float *__restrict dy, const float *__restrict x, float scale, float *__restrict dx,
                    int64_t first, int64_t last) {
#pragma omp simd
  for (int64_t i = first; i < last; ++i) dx[i] = scale * dy[i] * Activation::derivative(x[i]);
}

// params: x, scale, y
template <typename Activation>
int forward(void **params, int64_t **shapes, int ndims) {
  const float *x = static_cast<const float *>(params[0]);
  const float scale = *static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  int64_t count = 1;
  for (int i = 0; i < ndims; ++i) count *= shapes[0][i];
  parallel_slices(count, kGrain, [=](int64_t first, int64_t last) {
    forward_slice<Activation>(x, scale, y, first, last);
  });
  return 0;
}

// params: dy, x, scale, dx
template <typename Activation>
int backward(void **params, int64_t **shapes, int ndims) {
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  int64_t count = 1;
  for (int i = 0; i < ndims; ++i) count *= shapes[0][i];
  parallel_slices(count, kGrain, [=](int64_t first, int64_t last) {
    backward_slice<Activation>(dy, x, scale, dx, first, last);
  });
  return 0;
}

}  // namespace

extern "C" {

int GeluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return forward<Gelu>(params, shapes, ndims[0]);
}

int GeluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return backward<Gelu>(params, shapes, ndims[0]);
}

int SiluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return forward<Silu>(params, shapes, ndims[0]);
}

int SiluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return backward<Silu>(params, shapes, ndims[0]);
}

}  // extern "C"
