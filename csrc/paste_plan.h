// Paste planning for a whole batch (paper Eq. 6-7), the C++ twin of acrst_fast/augment/paste.py.
//
// Boxes are (x1, y1, x2, y2) pixels; labels 1..K; an op is (image, slot, x0, y0, h, w, flip) with
// integer top-left corner (x0, y0) and size h x w of the resampled crop. Ops of an image are in
// paste order, images in increasing order. The random draws come in as uniforms (one row of six
// per paste: class, member, scale, x, y, flip), so this code and the Python reference turn the
// same draws into the same plan. Header-only: the pybind11 module and the C++ tests share it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace acrst {

constexpr int kOpCols = 7;
constexpr int kUCols = 6;
enum { U_CLASS = 0, U_MEMBER, U_SCALE, U_X, U_Y, U_FLIP };

struct PasteParams {
  double scale_min = 0.5, scale_max = 1.5, flip_prob = 0.5, visibility_threshold = 0.0;
  int64_t min_size = 4;
};

struct Plan {
  std::vector<int64_t> ops;     // [P, 7]
  std::vector<float> boxes;     // [M, 4]
  std::vector<int64_t> labels;  // [M]
  std::vector<uint8_t> pasted;  // [M]
  std::vector<int64_t> counts;  // [B] merged boxes per image
};

// Exact area of `box` covered by the union of `rects` (each [4], pointers into a row-major array),
// by coordinate compression over the rectangles clipped to the box. Sums in double.
inline double covered_area(const float* box, const std::vector<const double*>& rects) {
  const double bx1 = box[0], by1 = box[1], bx2 = box[2], by2 = box[3];
  std::vector<double> clipped;
  clipped.reserve(rects.size() * 4);
  for (const double* r : rects) {
    const double x1 = std::clamp(r[0], bx1, bx2), x2 = std::clamp(r[2], bx1, bx2);
    const double y1 = std::clamp(r[1], by1, by2), y2 = std::clamp(r[3], by1, by2);
    if (x2 > x1 && y2 > y1) clipped.insert(clipped.end(), {x1, y1, x2, y2});
  }
  const size_t n = clipped.size() / 4;
  if (n == 0) return 0.0;
  std::vector<double> xs, ys;
  for (size_t i = 0; i < n; ++i) {
    xs.push_back(clipped[4 * i]), xs.push_back(clipped[4 * i + 2]);
    ys.push_back(clipped[4 * i + 1]), ys.push_back(clipped[4 * i + 3]);
  }
  std::sort(xs.begin(), xs.end());
  xs.erase(std::unique(xs.begin(), xs.end()), xs.end());
  std::sort(ys.begin(), ys.end());
  ys.erase(std::unique(ys.begin(), ys.end()), ys.end());
  double area = 0.0;
  for (size_t yi = 0; yi + 1 < ys.size(); ++yi) {
    const double cy = (ys[yi] + ys[yi + 1]) / 2;
    for (size_t xi = 0; xi + 1 < xs.size(); ++xi) {
      const double cx = (xs[xi] + xs[xi + 1]) / 2;
      for (size_t i = 0; i < n; ++i) {
        const double* r = &clipped[4 * i];
        if (r[0] <= cx && cx < r[2] && r[1] <= cy && cy < r[3]) {
          area += (ys[yi + 1] - ys[yi]) * (xs[xi + 1] - xs[xi]);
          break;
        }
      }
    }
  }
  return area;
}

// Own boxes (below every paste) then the kept pastes (each below the later ones); a box whose
// visible fraction is <= threshold is removed. Appends to plan.
inline void merge_image(const float* own, const int64_t* own_labels, int64_t n_own, const std::vector<double>& pboxes,
                        const std::vector<int64_t>& plabels, double threshold, Plan& plan) {
  const size_t n_paste = plabels.size();
  int64_t kept = 0;
  auto emit = [&](const float* b, int64_t label, bool pasted) {
    plan.boxes.insert(plan.boxes.end(), b, b + 4);
    plan.labels.push_back(label);
    plan.pasted.push_back(pasted ? 1 : 0);
    ++kept;
  };
  auto visible_enough = [&](const float* b, size_t first_later) {
    if (first_later >= n_paste) return true;
    const double area = (double(b[2]) - b[0]) * (double(b[3]) - b[1]);
    if (area <= 0) return true;
    std::vector<const double*> later;
    for (size_t j = first_later; j < n_paste; ++j) later.push_back(&pboxes[4 * j]);
    const double visible = 1.0 - covered_area(b, later) / area;
    return !(visible <= threshold + 1e-9);
  };
  for (int64_t i = 0; i < n_own; ++i) {
    if (visible_enough(own + 4 * i, 0)) emit(own + 4 * i, own_labels[i], false);
  }
  for (size_t j = 0; j < n_paste; ++j) {
    const float b[4] = {float(pboxes[4 * j]), float(pboxes[4 * j + 1]), float(pboxes[4 * j + 2]),
                        float(pboxes[4 * j + 3])};
    if (visible_enough(b, j + 1)) emit(b, plabels[j], true);
  }
  plan.counts.push_back(kept);
}

// Keep the ops whose clipped box is at least min_size each way, then merge each image's boxes.
// ops [P, 7] grouped by image; boxes [N, 4] with box_counts [B] per image.
inline Plan merge_pastes(const int64_t* image_hw, int64_t n_images, const float* boxes, const int64_t* labels,
                         const int64_t* box_counts, const int64_t* ops, const int64_t* op_labels, int64_t n_ops,
                         const PasteParams& prm) {
  Plan plan;
  int64_t op = 0, box_off = 0;
  for (int64_t img = 0; img < n_images; ++img) {
    const int64_t h_img = image_hw[2 * img], w_img = image_hw[2 * img + 1];
    std::vector<double> pboxes;
    std::vector<int64_t> plabels;
    for (; op < n_ops && ops[kOpCols * op] == img; ++op) {
      const int64_t* r = ops + kOpCols * op;
      const int64_t x0 = r[2], y0 = r[3], h = r[4], w = r[5];
      const int64_t cx1 = std::max<int64_t>(x0, 0), cy1 = std::max<int64_t>(y0, 0);
      const int64_t cx2 = std::min(x0 + w, w_img), cy2 = std::min(y0 + h, h_img);
      if (cx2 - cx1 < prm.min_size || cy2 - cy1 < prm.min_size) continue;
      plan.ops.insert(plan.ops.end(), r, r + kOpCols);
      pboxes.insert(pboxes.end(), {double(cx1), double(cy1), double(cx2), double(cy2)});
      plabels.push_back(op_labels[op]);
    }
    merge_image(boxes + 4 * box_off, labels + box_off, box_counts[img], pboxes, plabels, prm.visibility_threshold,
                plan);
    box_off += box_counts[img];
  }
  return plan;
}

inline int64_t pick(double u, int64_t n) { return std::min<int64_t>(int64_t(std::floor(u * double(n))), n - 1); }

// Sample and place counts[b] pastes per image from uniforms [B, n_max, 6], then merge.
// Bank candidates: slots [E], classes [E] (1..K), size_hw [E, 2]; probs [K] (class distribution,
// classes without a candidate are left out and the rest renormalised).
inline Plan plan_paste(const int64_t* image_hw, int64_t n_images, const float* boxes, const int64_t* labels,
                       const int64_t* box_counts, const int64_t* slots, const int64_t* classes, const float* size_hw,
                       int64_t n_entries, const double* class_probs, int64_t n_classes, const int64_t* counts,
                       const double* uniforms, int64_t n_max, const PasteParams& prm) {
  std::vector<std::vector<int64_t>> members(n_classes);
  for (int64_t e = 0; e < n_entries; ++e) members[classes[e] - 1].push_back(e);
  std::vector<double> probs(n_classes);
  double total = 0.0;
  for (int64_t k = 0; k < n_classes; ++k) {
    probs[k] = members[k].empty() ? 0.0 : class_probs[k];
    total += probs[k];
  }
  std::vector<int64_t> ops, op_labels;
  for (int64_t img = 0; total > 0 && img < n_images; ++img) {
    const int64_t h_img = image_hw[2 * img], w_img = image_hw[2 * img + 1];
    for (int64_t j = 0; j < counts[img]; ++j) {
      const double* u = uniforms + (img * n_max + j) * kUCols;
      const double target = u[U_CLASS] * total;
      double cum = 0.0;
      int64_t cls = -1;
      for (int64_t k = 0; k < n_classes; ++k) {
        if (probs[k] > 0) {
          cum += probs[k];
          cls = k;
          if (target < cum) break;
        }
      }
      const std::vector<int64_t>& mem = members[cls];
      const int64_t e = mem[pick(u[U_MEMBER], int64_t(mem.size()))];
      const double bh = size_hw[2 * e], bw = size_hw[2 * e + 1];
      double s = prm.scale_min + (prm.scale_max - prm.scale_min) * u[U_SCALE];
      s = std::min({s, double(h_img) / bh, double(w_img) / bw});
      const int64_t h = std::max<int64_t>(1, int64_t(std::floor(bh * s + 0.5)));
      const int64_t w = std::max<int64_t>(1, int64_t(std::floor(bw * s + 0.5)));
      const int64_t x0 = -(w / 2) + pick(u[U_X], w_img - w + 2 * (w / 2) + 1);
      const int64_t y0 = -(h / 2) + pick(u[U_Y], h_img - h + 2 * (h / 2) + 1);
      ops.insert(ops.end(), {img, slots[e], x0, y0, h, w, int64_t(u[U_FLIP] < prm.flip_prob)});
      op_labels.push_back(cls + 1);
    }
  }
  return merge_pastes(image_hw, n_images, boxes, labels, box_counts, ops.data(), op_labels.data(),
                      int64_t(op_labels.size()), prm);
}

}  // namespace acrst
