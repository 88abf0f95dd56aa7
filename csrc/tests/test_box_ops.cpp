// C++ tests of csrc/box_ops.h, run by ctest (and by tests/test_ext.py through it).
#include <cmath>
#include <cstdio>
#include <limits>

#include "box_ops.h"
#include "check.h"

int main() {
  const float a[] = {0, 0, 10, 10, 5, 5, 15, 15};
  const float b[] = {0, 0, 10, 10, 20, 20, 20, 20};
  float out[4];
  acrst::box_iou(a, 2, b, 2, out);
  CHECK(std::fabs(out[0] - 1.0f) < 1e-6f);          // identical boxes
  CHECK(out[1] == 0.0f);                            // degenerate, disjoint box
  CHECK(std::fabs(out[2] - 25.0f / 175.0f) < 1e-6f); // partial overlap
  CHECK(out[3] == 0.0f);

  CHECK(acrst::first_invalid_box(a, 2) == -1);
  const float inverted[] = {0, 0, 1, 1, 5, 5, 4, 9};
  CHECK(acrst::first_invalid_box(inverted, 2) == 1);
  const float nan_box[] = {0, std::numeric_limits<float>::quiet_NaN(), 1, 1};
  CHECK(acrst::first_invalid_box(nan_box, 1) == 0);

  if (failures) return 1;
  std::printf("box_ops: all checks passed\n");
  return 0;
}
