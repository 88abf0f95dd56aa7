// Box operations on (x1, y1, x2, y2) boxes in absolute pixels, float32, row-major [N, 4].
// Header-only so the pybind11 module and the C++ tests compile the same code.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace acrst {

// Index of the first box that is non-finite or inverted (x2 < x1 or y2 < y1), or -1 if all are valid.
inline int64_t first_invalid_box(const float* boxes, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float* b = boxes + 4 * i;
    bool finite = std::isfinite(b[0]) && std::isfinite(b[1]) && std::isfinite(b[2]) && std::isfinite(b[3]);
    if (!finite || b[2] < b[0] || b[3] < b[1]) return i;
  }
  return -1;
}

// Pairwise IoU: out[i * m + j] = IoU(a[i], b[j]). A pair whose union is empty has IoU 0.
inline void box_iou(const float* a, int64_t n, const float* b, int64_t m, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* p = a + 4 * i;
    const float area_p = (p[2] - p[0]) * (p[3] - p[1]);
    for (int64_t j = 0; j < m; ++j) {
      const float* q = b + 4 * j;
      const float w = std::max(0.0f, std::min(p[2], q[2]) - std::max(p[0], q[0]));
      const float h = std::max(0.0f, std::min(p[3], q[3]) - std::max(p[1], q[1]));
      const float inter = w * h;
      const float uni = area_p + (q[2] - q[0]) * (q[3] - q[1]) - inter;
      out[i * m + j] = uni > 0.0f ? inter / uni : 0.0f;
    }
  }
}

}  // namespace acrst
