// acrst_fast._C: host-side box operations (pybind11, NumPy buffers, no libtorch link).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "box_ops.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "acrst_fast C++ extension: host-side box operations";
  m.def("box_iou", &box_iou, py::arg("boxes1"), py::arg("boxes2"),
        "Pairwise IoU of float32 [N, 4] and [M, 4] (x1, y1, x2, y2) boxes -> float32 [N, M].");
}
