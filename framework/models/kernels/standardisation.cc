// Weight standardisation (NFNet's ScaledStdConv2d) for MindSpore's CPU training (framework/models/kernels/__init__.py
// builds it): each output channel's weights, one row of fan-in values, to zero mean and unit variance, times
// gain * scale; forward and backward each one pass over a row (its statistics recomputed while the row is in cache).
// MindSpore's BatchNorm on the weight reshaped to (1, O, fan-in, 1), as timm runs F.batch_norm, took 158 ms of
// NFNet-F0's train step (64 px, batch 32) plus the reshapes' copies. float32; spec: (scale, eps).
#include <cmath>
#include <cstdint>

#include "parallel.h"

namespace {

struct Rows {
  int64_t count, length;  // output channels, fan-in
};

// weight (O, I, k, k) as O rows
Rows rows_of(const int64_t *shape) { return {shape[0], shape[1] * shape[2] * shape[3]}; }

// mean and 1 / sqrt(variance + eps) of one row (the biased variance, as batch norm's)
void moments(const float *row, int64_t length, float eps, float &mean, float &inv_std) {
  float sum = 0.0f, squares = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < length; ++j) sum += row[j];
  mean = sum / length;
#pragma omp simd reduction(+ : squares)
  for (int64_t j = 0; j < length; ++j) squares += (row[j] - mean) * (row[j] - mean);
  inv_std = 1.0f / std::sqrt(squares / length + eps);
}

// y = (w - mean) / std * gain * scale, row by row
void forward(const float *w, const float *gain, const float *spec, float *y, Rows rows) {
  parallel_for(rows.count, [=](int64_t o) {
    const float *row = w + o * rows.length;
    float mean, inv_std;
    moments(row, rows.length, spec[1], mean, inv_std);
    const float factor = inv_std * gain[o] * spec[0];
    float *out = y + o * rows.length;
#pragma omp simd
    for (int64_t j = 0; j < rows.length; ++j) out[j] = (row[j] - mean) * factor;
  });
}

// with xhat the standardised row: dgain = scale * sum(dy xhat), dw = gain scale / std (dy - mean(dy) - xhat
// mean(dy xhat))
void backward(const float *dy, const float *w, const float *gain, const float *spec, float *dw, float *dgain,
              Rows rows) {
  parallel_for(rows.count, [=](int64_t o) {
    const float *row = w + o * rows.length, *grad = dy + o * rows.length;
    float mean, inv_std, sum = 0.0f, dot = 0.0f;
    moments(row, rows.length, spec[1], mean, inv_std);
#pragma omp simd reduction(+ : sum, dot)
    for (int64_t j = 0; j < rows.length; ++j) {
      sum += grad[j];
      dot += grad[j] * (row[j] - mean) * inv_std;
    }
    dgain[o] = spec[0] * dot;
    const float factor = gain[o] * spec[0] * inv_std, mean_grad = sum / rows.length, mean_dot = dot / rows.length;
    float *out = dw + o * rows.length;
#pragma omp simd
    for (int64_t j = 0; j < rows.length; ++j) {
      out[j] = factor * (grad[j] - mean_grad - (row[j] - mean) * inv_std * mean_dot);
    }
  });
}

}  // namespace

extern "C" {

// params: weight (O, I, k, k), gain (O, 1, 1, 1), spec (float32: scale, eps), y (as weight)
int StandardiseForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  forward(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
          static_cast<const float *>(params[2]), static_cast<float *>(params[3]), rows_of(shapes[0]));
  return 0;
}

// params: dy, weight, gain, spec, dweight, dgain
int StandardiseBackward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  backward(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
           static_cast<float *>(params[4]), static_cast<float *>(params[5]), rows_of(shapes[1]));
  return 0;
}

}  // extern "C"
