// C++ tests of csrc/paste_plan.h, run by ctest (and by tests/test_ext.py through it).
#include <cmath>
#include <cstdio>
#include <vector>

#include "check.h"
#include "paste_plan.h"

int main() {
  // union of two overlapping rectangles inside a box: 10x10 + 10x10 - 5x5 overlap
  const float box[4] = {0, 0, 20, 20};
  const double r1[4] = {0, 0, 10, 10}, r2[4] = {5, 5, 15, 15}, outside[4] = {30, 30, 40, 40};
  CHECK(std::fabs(acrst::covered_area(box, {r1, r2}) - 175.0) < 1e-9);
  CHECK(acrst::covered_area(box, {outside}) == 0.0);
  CHECK(acrst::covered_area(box, {}) == 0.0);

  // own box [10,10,20,20] is covered by the union of two pastes (neither alone covers it): removed;
  // the first paste is partly covered by the second: kept; a paste smaller than min_size: dropped.
  const int64_t image_hw[2] = {40, 40};
  const float own[4] = {10, 10, 20, 20};
  const int64_t own_labels[1] = {1}, box_counts[1] = {1};
  const int64_t ops[3 * 7] = {0, 5, 8, 8, 7, 14, 0,    // rows 8..15, cols 8..22
                              0, 6, 8, 15, 7, 14, 1,   // rows 15..22
                              0, 7, -2, -2, 4, 4, 0};  // clipped to 2x2: below min_size 4
  const int64_t op_labels[3] = {2, 3, 4};
  acrst::PasteParams prm;
  acrst::Plan plan = acrst::merge_pastes(image_hw, 1, own, own_labels, box_counts, ops, op_labels, 3, prm);
  CHECK(plan.ops.size() == 2 * 7);
  CHECK(plan.labels.size() == 2 && plan.labels[0] == 2 && plan.labels[1] == 3);
  CHECK(plan.pasted[0] == 1 && plan.pasted[1] == 1);
  CHECK(plan.counts.size() == 1 && plan.counts[0] == 2);

  // sampled plan: one class with one crop, uniforms fixed -> exact geometry
  const int64_t slots[1] = {9}, classes[1] = {2};
  const float size_hw[2] = {10, 20};
  const double probs[2] = {0.7, 0.3};  // class 1 has no crop: all mass goes to class 2
  const int64_t counts[1] = {1};
  const double u[6] = {0.99, 0.5, 0.5, 0.0, 0.999, 0.9};  // scale 1.0, leftmost x, lowest y, no flip
  acrst::Plan sampled = acrst::plan_paste(image_hw, 1, own, own_labels, box_counts, slots, classes, size_hw, 1, probs,
                                          2, counts, u, 1, prm);
  CHECK(sampled.ops.size() == 7);
  CHECK(sampled.ops[1] == 9 && sampled.ops[4] == 10 && sampled.ops[5] == 20 && sampled.ops[6] == 0);
  CHECK(sampled.ops[2] == -10);          // x0 = -(w / 2)
  CHECK(sampled.ops[3] == 40 - 10 + 5);  // y0 = H - h + h / 2
  CHECK(sampled.labels.back() == 2);

  if (failures) return 1;
  std::printf("paste_plan: all checks passed\n");
  return 0;
}
