// rotorquant._core CUDA entry points: device queries, CudaRotation, CudaQuantizer and CudaQuantizerGroup (launches
// on raw device pointers). Without a CUDA build the same names exist as stubs: no devices, and
// CudaRotation's constructor raises RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "rotorquant/error.hpp"
#include "rotorquant/quantizer.hpp"
#include "rotorquant/rotation.hpp"

#ifdef ROTORQUANT_WITH_CUDA
#include "rotorquant/cuda/codec.hpp"
#include "rotorquant/cuda/rotation.hpp"
#endif

namespace py = pybind11;

namespace rotorquant_bindings {

namespace {

#ifdef ROTORQUANT_WITH_CUDA

const float* as_device_pointer(std::uintptr_t address) { return reinterpret_cast<const float*>(address); }
float* as_mutable_device_pointer(std::uintptr_t address) { return reinterpret_cast<float*>(address); }
void* as_stream(std::uintptr_t handle) { return reinterpret_cast<void*>(handle); }
std::uint8_t* as_bytes(std::uintptr_t address) { return reinterpret_cast<std::uint8_t*>(address); }

#else

constexpr const char* kNoCudaMessage = "rotorquant was built without CUDA support";

// Placeholder types so that `_core.CudaRotation` / `_core.CudaQuantizer` exist in every build.
struct CudaRotationUnavailable {};
struct CudaQuantizerUnavailable {};
struct CudaQuantizerGroupUnavailable {};

#endif

}  // namespace

void bind_cuda(py::module_& m) {
#ifdef ROTORQUANT_WITH_CUDA
  using rotorquant::cuda::DeviceRotation;

  m.def("cuda_device_count", &rotorquant::cuda::device_count,
        "Number of usable CUDA devices (0 without a driver or device).");
  m.def("cuda_device_name", &rotorquant::cuda::device_name, py::arg("device"), "Name of a CUDA device.");
  m.def("cuda_runtime_version", &rotorquant::cuda::runtime_version_string,
        "CUDA runtime version rotorquant was built with, as 'major.minor'.");

  py::class_<DeviceRotation>(m, "CudaRotation",
                             "A Rotation's parameters on a CUDA device; apply/inverse launch on raw device pointers.")
      .def(py::init<const rotorquant::Rotation&, int>(), py::arg("rotation"), py::arg("device") = -1,
           "Uploads rotation's parameters to `device` (-1: the current device).")
      .def_property_readonly("device", &DeviceRotation::device)
      .def_property_readonly("dim", &DeviceRotation::dim)
      .def_property_readonly("padded_dim", &DeviceRotation::padded_dim)
      .def_property_readonly("num_parameters", &DeviceRotation::num_parameters)
      .def(
          "apply",
          [](const DeviceRotation& self, std::uintptr_t in_ptr, std::uintptr_t out_ptr, std::int64_t n,
             std::uintptr_t stream) {
            self.apply(as_device_pointer(in_ptr), as_mutable_device_pointer(out_ptr), n, as_stream(stream));
          },
          py::arg("in_ptr"), py::arg("out_ptr"), py::arg("n"), py::arg("stream") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "Asynchronous on `stream` (a cudaStream_t as int, 0 = default): in (n, dim) float32 -> "
          "out (n, padded_dim) float32, C-contiguous device memory.")
      .def(
          "inverse",
          [](const DeviceRotation& self, std::uintptr_t in_ptr, std::uintptr_t out_ptr, std::int64_t n,
             std::uintptr_t stream) {
            self.inverse(as_device_pointer(in_ptr), as_mutable_device_pointer(out_ptr), n, as_stream(stream));
          },
          py::arg("in_ptr"), py::arg("out_ptr"), py::arg("n"), py::arg("stream") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "Asynchronous on `stream`: in (n, padded_dim) float32 -> out (n, dim) float32, C-contiguous device memory.");

  using rotorquant::cuda::DeviceQuantizer;
  py::class_<DeviceQuantizer>(m, "CudaQuantizer",
                              "A Quantizer's derived data on a CUDA device; fused encode / decode / scores kernels "
                              "launched on raw device pointers (see cuda/include/rotorquant/cuda/codec.hpp).")
      .def(py::init<const rotorquant::Quantizer&, int>(), py::arg("quantizer"), py::arg("device") = -1)
      .def_property_readonly("device", &DeviceQuantizer::device)
      .def(
          "encode",
          [](const DeviceQuantizer& self, std::uintptr_t x, std::int64_t n, std::uintptr_t indices,
             std::uintptr_t norms, std::uintptr_t signs, std::uintptr_t residual_norms, std::uintptr_t stream,
             bool check) {
            const rotorquant::CodesView view{as_bytes(indices), as_bytes(norms), as_bytes(signs),
                                             as_bytes(residual_norms)};
            self.encode(as_device_pointer(x), n, view, as_stream(stream), check);
          },
          py::arg("x_ptr"), py::arg("n"), py::arg("indices_ptr"), py::arg("norms_ptr"), py::arg("signs_ptr"),
          py::arg("residual_norms_ptr"), py::arg("stream") = 0, py::arg("check") = true,
          py::call_guard<py::gil_scoped_release>(),
          "x (n, dim) float32 -> the four code arrays (device pointers, sized by the quantizer's code sizes).")
      .def(
          "decode",
          [](const DeviceQuantizer& self, std::uintptr_t indices, std::uintptr_t norms, std::uintptr_t signs,
             std::uintptr_t residual_norms, std::int64_t n, std::uintptr_t out, int dtype, std::uintptr_t stream,
             bool check) {
            const rotorquant::ConstCodesView view{as_bytes(indices), as_bytes(norms), as_bytes(signs),
                                                  as_bytes(residual_norms)};
            self.decode(view, n, reinterpret_cast<void*>(out), static_cast<rotorquant::cuda::OutputDtype>(dtype),
                        as_stream(stream), check);
          },
          py::arg("indices_ptr"), py::arg("norms_ptr"), py::arg("signs_ptr"), py::arg("residual_norms_ptr"),
          py::arg("n"), py::arg("out_ptr"), py::arg("dtype") = 0, py::arg("stream") = 0, py::arg("check") = true,
          py::call_guard<py::gil_scoped_release>(),
          "codes -> out (n, dim); dtype 0 = float32, 1 = float16, 2 = bfloat16.")
      .def(
          "scores",
          [](const DeviceQuantizer& self, std::uintptr_t indices, std::uintptr_t norms, std::uintptr_t signs,
             std::uintptr_t residual_norms, std::int64_t n, std::int64_t heads, std::uintptr_t queries,
             std::int64_t group, std::uintptr_t out, std::uintptr_t stream, bool check) {
            const rotorquant::ConstCodesView view{as_bytes(indices), as_bytes(norms), as_bytes(signs),
                                                  as_bytes(residual_norms)};
            self.scores(view, n, heads, as_device_pointer(queries), group, as_mutable_device_pointer(out),
                        as_stream(stream), check);
          },
          py::arg("indices_ptr"), py::arg("norms_ptr"), py::arg("signs_ptr"), py::arg("residual_norms_ptr"),
          py::arg("n"), py::arg("heads"), py::arg("queries_ptr"), py::arg("group"), py::arg("out_ptr"),
          py::arg("stream") = 0, py::arg("check") = true, py::call_guard<py::gil_scoped_release>(),
          "heads * n codes, queries (heads * group, dim) float32 -> out (heads, group, n) float32.");

  using rotorquant::cuda::DeviceQuantizerGroup;
  using rotorquant::cuda::HeadLayout;
  py::class_<DeviceQuantizerGroup>(m, "CudaQuantizerGroup",
                                   "The CUDA codecs of several heads (quantizers with equal parameters except the "
                                   "seed) on one device: encode / decode of every head and group in one kernel launch, "
                                   "on raw device pointers (see cuda/include/rotorquant/cuda/codec.hpp, HeadLayout).")
      .def(py::init([](const std::vector<const rotorquant::Quantizer*>& quantizers, int device) {
             return new DeviceQuantizerGroup(quantizers, device);
           }),
           py::arg("quantizers"), py::arg("device") = -1, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("device", &DeviceQuantizerGroup::device)
      .def_property_readonly("heads", &DeviceQuantizerGroup::heads)
      .def(
          "encode",
          [](const DeviceQuantizerGroup& self, std::uintptr_t x, std::int64_t n, std::int64_t groups,
             std::int64_t x_head_stride, std::int64_t x_group_stride, std::uintptr_t indices, std::uintptr_t norms,
             std::uintptr_t signs, std::uintptr_t residual_norms, std::int64_t code_head_stride,
             std::int64_t code_group_stride, std::uintptr_t stream, bool check) {
            const rotorquant::CodesView view{as_bytes(indices), as_bytes(norms), as_bytes(signs),
                                             as_bytes(residual_norms)};
            const HeadLayout layout{groups, x_head_stride, x_group_stride, code_head_stride, code_group_stride};
            self.encode(as_device_pointer(x), n, layout, view, as_stream(stream), check);
          },
          py::arg("x_ptr"), py::arg("n"), py::arg("groups"), py::arg("x_head_stride"), py::arg("x_group_stride"),
          py::arg("indices_ptr"), py::arg("norms_ptr"), py::arg("signs_ptr"), py::arg("residual_norms_ptr"),
          py::arg("code_head_stride"), py::arg("code_group_stride"), py::arg("stream") = 0, py::arg("check") = true,
          py::call_guard<py::gil_scoped_release>(),
          "heads x groups x n float32 rows of x (element strides) -> codes (row strides), one launch.")
      .def(
          "decode",
          [](const DeviceQuantizerGroup& self, std::uintptr_t indices, std::uintptr_t norms, std::uintptr_t signs,
             std::uintptr_t residual_norms, std::int64_t n, std::int64_t groups, std::int64_t code_head_stride,
             std::int64_t code_group_stride, std::uintptr_t out, std::int64_t out_head_stride,
             std::int64_t out_group_stride, int dtype, std::uintptr_t stream, bool check) {
            const rotorquant::ConstCodesView view{as_bytes(indices), as_bytes(norms), as_bytes(signs),
                                                  as_bytes(residual_norms)};
            const HeadLayout layout{groups, out_head_stride, out_group_stride, code_head_stride, code_group_stride};
            self.decode(view, n, layout, reinterpret_cast<void*>(out),
                        static_cast<rotorquant::cuda::OutputDtype>(dtype), as_stream(stream), check);
          },
          py::arg("indices_ptr"), py::arg("norms_ptr"), py::arg("signs_ptr"), py::arg("residual_norms_ptr"),
          py::arg("n"), py::arg("groups"), py::arg("code_head_stride"), py::arg("code_group_stride"),
          py::arg("out_ptr"), py::arg("out_head_stride"), py::arg("out_group_stride"), py::arg("dtype") = 0,
          py::arg("stream") = 0, py::arg("check") = true, py::call_guard<py::gil_scoped_release>(),
          "heads x groups x n codes (row strides) -> out rows (element strides); dtype 0 = float32, 1 = float16, "
          "2 = bfloat16; one launch.");
#else
  m.def("cuda_device_count", []() { return 0; }, "Number of usable CUDA devices (always 0: built without CUDA).");
  m.def(
      "cuda_device_name",
      [](int) -> std::string { throw rotorquant::RuntimeError(kNoCudaMessage); }, py::arg("device"));
  m.def("cuda_runtime_version", []() { return std::string(); }, "Empty: rotorquant was built without CUDA.");

  py::class_<CudaRotationUnavailable>(m, "CudaRotation", "Unavailable: rotorquant was built without CUDA support.")
      .def(py::init([](const rotorquant::Rotation&, int) -> CudaRotationUnavailable* {
             throw rotorquant::RuntimeError(kNoCudaMessage);
           }),
           py::arg("rotation"), py::arg("device") = -1);
  py::class_<CudaQuantizerUnavailable>(m, "CudaQuantizer", "Unavailable: rotorquant was built without CUDA support.")
      .def(py::init([](const rotorquant::Quantizer&, int) -> CudaQuantizerUnavailable* {
             throw rotorquant::RuntimeError(kNoCudaMessage);
           }),
           py::arg("quantizer"), py::arg("device") = -1);
  py::class_<CudaQuantizerGroupUnavailable>(m, "CudaQuantizerGroup",
                                            "Unavailable: rotorquant was built without CUDA support.")
      .def(py::init([](const std::vector<const rotorquant::Quantizer*>&, int) -> CudaQuantizerGroupUnavailable* {
             throw rotorquant::RuntimeError(kNoCudaMessage);
           }),
           py::arg("quantizers"), py::arg("device") = -1);
#endif
}

}  // namespace rotorquant_bindings
