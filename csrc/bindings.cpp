// acrst_fast._C: host-side box operations (pybind11, NumPy buffers, no libtorch link).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <tuple>

#include "box_ops.h"
#include "paste_plan.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

const float* checked_boxes(const FloatArray& arr, const char* name) {
  if (arr.ndim() != 2 || arr.shape(1) != 4) {
    throw py::value_error(std::string(name) + ": expected shape [N, 4] of (x1, y1, x2, y2) boxes, got ndim " +
                          std::to_string(arr.ndim()));
  }
  const int64_t bad = acrst::first_invalid_box(arr.data(), arr.shape(0));
  if (bad >= 0) {
    throw py::value_error(std::string(name) + ": box " + std::to_string(bad) +
                          " is non-finite or inverted (x2 < x1 or y2 < y1)");
  }
  return arr.data();
}

FloatArray box_iou(const FloatArray& a, const FloatArray& b) {
  const float* pa = checked_boxes(a, "boxes1");
  const float* pb = checked_boxes(b, "boxes2");
  const int64_t n = a.shape(0), m = b.shape(0);
  FloatArray out({n, m});
  {
    py::gil_scoped_release release;
    acrst::box_iou(pa, n, pb, m, out.mutable_data());
  }
  return out;
}


[[noreturn]] void fail(const std::string& msg) { throw py::value_error("paste planner: " + msg); }

void expect_shape(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  bool ok = a.ndim() == int64_t(shape.size());
  int64_t d = 0;
  std::string want;
  for (int64_t s : shape) {
    ok = ok && (s < 0 || a.shape(d) == s);
    want += (d++ ? ", " : "") + (s < 0 ? std::string("*") : std::to_string(s));
  }
  if (!ok) {
    std::string got;
    for (int64_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
    fail(std::string(name) + " has shape [" + got + "], expected [" + want + "]");
  }
}

// Validates the per-image inputs shared by both entry points; returns the number of images.
int64_t check_images(const IntArray& image_hw, const FloatArray& boxes, const IntArray& labels,
                     const IntArray& box_counts) {
  expect_shape(image_hw, "image_hw", {-1, 2});
  const int64_t n_images = image_hw.shape(0);
  expect_shape(box_counts, "box_counts", {n_images});
  expect_shape(boxes, "boxes", {-1, 4});
  expect_shape(labels, "labels", {boxes.shape(0)});
  int64_t total = 0;
  for (int64_t i = 0; i < n_images; ++i) {
    if (image_hw.data()[2 * i] < 1 || image_hw.data()[2 * i + 1] < 1)
      fail("image " + std::to_string(i) + " has size " + std::to_string(image_hw.data()[2 * i]) + " x " +
           std::to_string(image_hw.data()[2 * i + 1]) + "; sizes must be positive");
    if (box_counts.data()[i] < 0) fail("box_counts[" + std::to_string(i) + "] is negative");
    total += box_counts.data()[i];
  }
  if (total != boxes.shape(0))
    fail("box_counts sum to " + std::to_string(total) + " but " + std::to_string(boxes.shape(0)) + " boxes were given");
  const int64_t bad = acrst::first_invalid_box(boxes.data(), boxes.shape(0));
  if (bad >= 0) {
    int64_t img = 0, off = 0;
    while (off + box_counts.data()[img] <= bad) off += box_counts.data()[img++];
    fail("box " + std::to_string(bad - off) + " of image " + std::to_string(img) +
         " is non-finite or inverted (x2 < x1 or y2 < y1)");
  }
  return n_images;
}

acrst::PasteParams params(double scale_min, double scale_max, double flip_prob, int64_t min_size, double vis) {
  if (!(std::isfinite(scale_min) && std::isfinite(scale_max) && 0 < scale_min && scale_min <= scale_max))
    fail("need 0 < scale_min <= scale_max, got " + std::to_string(scale_min) + ", " + std::to_string(scale_max));
  if (!(0 <= flip_prob && flip_prob <= 1)) fail("flip_prob must be in [0, 1]");
  if (!(0 <= vis && vis < 1)) fail("visibility_threshold must be in [0, 1)");
  if (min_size < 0) fail("min_size must be >= 0");
  acrst::PasteParams p;
  p.scale_min = scale_min, p.scale_max = scale_max, p.flip_prob = flip_prob, p.min_size = min_size;
  p.visibility_threshold = vis;
  return p;
}

py::tuple to_python(const acrst::Plan& plan) {
  const int64_t p = int64_t(plan.ops.size()) / acrst::kOpCols, m = int64_t(plan.labels.size());
  IntArray ops({p, int64_t(acrst::kOpCols)});
  std::copy(plan.ops.begin(), plan.ops.end(), ops.mutable_data());
  FloatArray boxes({m, int64_t(4)});
  std::copy(plan.boxes.begin(), plan.boxes.end(), boxes.mutable_data());
  IntArray labels(m);
  std::copy(plan.labels.begin(), plan.labels.end(), labels.mutable_data());
  py::array_t<bool> pasted(m);
  std::copy(plan.pasted.begin(), plan.pasted.end(), pasted.mutable_data());
  IntArray counts(int64_t(plan.counts.size()));
  std::copy(plan.counts.begin(), plan.counts.end(), counts.mutable_data());
  return py::make_tuple(ops, boxes, labels, pasted, counts);
}

py::tuple plan_paste(const IntArray& image_hw, const FloatArray& boxes, const IntArray& labels,
                     const IntArray& box_counts, const IntArray& slots, const IntArray& classes,
                     const FloatArray& size_hw, const DoubleArray& class_probs, const IntArray& counts,
                     const DoubleArray& uniforms, double scale_min, double scale_max, double flip_prob,
                     int64_t min_size, double visibility_threshold) {
  const int64_t n_images = check_images(image_hw, boxes, labels, box_counts);
  const acrst::PasteParams prm = params(scale_min, scale_max, flip_prob, min_size, visibility_threshold);
  expect_shape(slots, "bank slots", {-1});
  const int64_t n_entries = slots.shape(0);
  expect_shape(classes, "bank classes", {n_entries});
  expect_shape(size_hw, "bank size_hw", {n_entries, 2});
  expect_shape(class_probs, "class_probs", {-1});
  const int64_t k = class_probs.shape(0);
  expect_shape(counts, "counts", {n_images});
  expect_shape(uniforms, "uniforms", {n_images, -1, acrst::kUCols});
  for (int64_t e = 0; e < n_entries; ++e) {
    if (classes.data()[e] < 1 || classes.data()[e] > k)
      fail("bank entry " + std::to_string(e) + " has class " + std::to_string(classes.data()[e]) + ", outside 1.." +
           std::to_string(k));
    const float h = size_hw.data()[2 * e], w = size_hw.data()[2 * e + 1];
    if (!(std::isfinite(h) && std::isfinite(w) && h > 0 && w > 0))
      fail("bank entry " + std::to_string(e) + " has size " + std::to_string(h) + " x " + std::to_string(w));
  }
  for (int64_t c = 0; c < k; ++c) {
    const double p = class_probs.data()[c];
    if (!(std::isfinite(p) && p >= 0)) fail("class_probs[" + std::to_string(c) + "] = " + std::to_string(p));
  }
  const int64_t n_max = uniforms.shape(1);
  for (int64_t i = 0; i < n_images; ++i) {
    if (counts.data()[i] < 0 || counts.data()[i] > n_max)
      fail("counts[" + std::to_string(i) + "] = " + std::to_string(counts.data()[i]) + " is outside [0, " +
           std::to_string(n_max) + "]");
  }
  for (int64_t i = 0; i < uniforms.size(); ++i) {
    const double u = uniforms.data()[i];
    if (!(0 <= u && u < 1)) fail("uniforms must lie in [0, 1); element " + std::to_string(i) + " is " + std::to_string(u));
  }
  acrst::Plan plan;
  {
    py::gil_scoped_release release;
    plan = acrst::plan_paste(image_hw.data(), n_images, boxes.data(), labels.data(), box_counts.data(), slots.data(),
                             classes.data(), size_hw.data(), n_entries, class_probs.data(), k, counts.data(),
                             uniforms.data(), n_max, prm);
  }
  return to_python(plan);
}

py::tuple merge_pastes(const IntArray& image_hw, const FloatArray& boxes, const IntArray& labels,
                       const IntArray& box_counts, const IntArray& ops, const IntArray& op_labels, int64_t min_size,
                       double visibility_threshold) {
  const int64_t n_images = check_images(image_hw, boxes, labels, box_counts);
  const acrst::PasteParams prm = params(1.0, 1.0, 0.0, min_size, visibility_threshold);
  expect_shape(ops, "ops", {-1, acrst::kOpCols});
  const int64_t n_ops = ops.shape(0);
  expect_shape(op_labels, "op_labels", {n_ops});
  const int64_t* o = ops.data();
  for (int64_t p = 0; p < n_ops; ++p) {
    const int64_t* r = o + acrst::kOpCols * p;
    const std::string where = "op " + std::to_string(p);
    if (r[0] < 0 || r[0] >= n_images) fail(where + " names image " + std::to_string(r[0]) + " of " + std::to_string(n_images));
    if (p > 0 && r[0] < o[acrst::kOpCols * (p - 1)]) fail(where + ": ops must be grouped by image in increasing order");
    const int64_t h_img = image_hw.data()[2 * r[0]], w_img = image_hw.data()[2 * r[0] + 1];
    if (r[4] < 1 || r[5] < 1) fail(where + " has an empty crop (" + std::to_string(r[4]) + " x " + std::to_string(r[5]) + ")");
    if (r[4] > h_img || r[5] > w_img)
      fail(where + ": crop " + std::to_string(r[4]) + " x " + std::to_string(r[5]) + " is larger than image " +
           std::to_string(r[0]) + " (" + std::to_string(h_img) + " x " + std::to_string(w_img) + ")");
    if (r[1] < 0) fail(where + " has a negative slot");
  }
  acrst::Plan plan;
  {
    py::gil_scoped_release release;
    plan = acrst::merge_pastes(image_hw.data(), n_images, boxes.data(), labels.data(), box_counts.data(), o,
                               op_labels.data(), n_ops, prm);
  }
  return to_python(plan);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "acrst_fast C++ extension: box operations and batched paste planning";
  m.def("box_iou", &box_iou, py::arg("boxes1"), py::arg("boxes2"),
        "Pairwise IoU of float32 [N, 4] and [M, 4] (x1, y1, x2, y2) boxes -> float32 [N, M].");
  m.def("plan_paste", &plan_paste, py::arg("image_hw"), py::arg("boxes"), py::arg("labels"), py::arg("box_counts"),
        py::arg("slots"), py::arg("classes"), py::arg("size_hw"), py::arg("class_probs"), py::arg("counts"),
        py::arg("uniforms"), py::arg("scale_min"), py::arg("scale_max"), py::arg("flip_prob"), py::arg("min_size"),
        py::arg("visibility_threshold"),
        "Sample, place and merge a batch's pastes from uniforms -> (ops, boxes, labels, pasted, counts).");
  m.def("merge_pastes", &merge_pastes, py::arg("image_hw"), py::arg("boxes"), py::arg("labels"),
        py::arg("box_counts"), py::arg("ops"), py::arg("op_labels"), py::arg("min_size"),
        py::arg("visibility_threshold"),
        "Given placements: drop too-small pastes, merge boxes -> (ops, boxes, labels, pasted, counts).");
}
