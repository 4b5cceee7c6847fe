// What the C++ loss tests share: the error of a result against its naive float64 value, relative to the
// largest magnitude of the expected tensor (at least 1), the EXPECT that reports it, and torch's reduction.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "expect.h"

inline double rel_err(const at::Tensor& actual, const at::Tensor& expected) {
  return (actual.to(at::kDouble) - expected).abs().max().item<double>() /
         std::max(expected.abs().max().item<double>(), 1.0);
}

inline void expect_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected, double tol) {
  const double err = rel_err(actual, expected);
  EXPECT(err < tol, "%s: error %.2e (tolerance %.0e)", what.c_str(), err, tol);
}

// "none", "sum", or the mean over the valid (non-ignored) rows, 0 when there are none: torch's ignore_index mean.
inline at::Tensor reduce_rows(const at::Tensor& rows, const at::Tensor& valid, const std::string& reduction) {
  if (reduction == "none") return rows;
  if (reduction == "sum") return rows.sum();
  return rows.sum() / valid.sum().clamp_min(1).to(rows.scalar_type());
}
