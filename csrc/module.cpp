// The Python module tbd_ops._C. Importing it loads the shared library, which
// runs the static operator registrations of csrc/<op>.cpp (with their CUDA
// registrations in CUDA builds) and csrc/cpu/*.cpp: the ops themselves are dispatcher operators
// (torch.ops.tbd_ops.*), which autograd, autocast, torch.compile and FX see.
// This pybind11 module holds the rest of the native API, which is not an
// operator: how this build was made.
//
// setup.py passes the build facts as macros (host compiler only):
//   TBD_OPS_BUILD_TORCH_VERSION  torch.__version__ at build time, as a token
//   TBD_OPS_BUILD_DEBUG          1 for TBD_OPS_DEBUG=1 builds, else 0
//   TBD_OPS_BUILD_CUDA_MAJOR/MINOR, TBD_OPS_BUILD_SASS_ARCHS, TBD_OPS_BUILD_PTX_ARCHS
//                                (CUDA builds) nvcc's release and the compute
//                                capabilities compiled to SASS and to PTX, comma separated

// Stringified before any header is included, so that no library macro can
// rewrite a part of the version.
#define TBD_OPS_STR_(x) #x
#define TBD_OPS_STR(x) TBD_OPS_STR_(x)
#ifndef TBD_OPS_BUILD_TORCH_VERSION
#error "TBD_OPS_BUILD_TORCH_VERSION is not defined (build with setup.py)"
#endif
// Found by tbd_ops/__init__.py in the file itself when the library cannot be
// loaded (e.g. built against another torch: undefined symbols), so that the
// import error can name both versions.
extern "C" __attribute__((used)) const char tbd_ops_build_torch_version[] =
    "\ntbd_ops built against torch " TBD_OPS_STR(TBD_OPS_BUILD_TORCH_VERSION) "\n";

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr const char kTorchVersion[] = TBD_OPS_STR(TBD_OPS_BUILD_TORCH_VERSION);

std::string host_compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " TBD_OPS_STR(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

#ifdef TBD_OPS_WITH_CUDA
std::vector<int> sass_archs() { return {TBD_OPS_BUILD_SASS_ARCHS}; }
std::vector<int> ptx_archs() { return {TBD_OPS_BUILD_PTX_ARCHS}; }
std::optional<std::string> cuda_version() {
  return std::to_string(TBD_OPS_BUILD_CUDA_MAJOR) + "." + std::to_string(TBD_OPS_BUILD_CUDA_MINOR);
}
constexpr bool kWithCuda = true;
#else
std::vector<int> sass_archs() { return {}; }
std::vector<int> ptx_archs() { return {}; }
std::optional<std::string> cuda_version() { return std::nullopt; }
constexpr bool kWithCuda = false;
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tbd_ops' native library: loading it registers the torch.ops.tbd_ops operators; "
            "the functions here say how it was built.";
  m.def("with_cuda", [] { return kWithCuda; }, "Whether the CUDA kernels were compiled into this build.");
  m.def("cuda_version", &cuda_version,
        "Release of the nvcc that compiled the CUDA kernels, e.g. '13.0'; None for a CPU-only build.");
  m.def("sass_archs", &sass_archs,
        "Compute capabilities compiled to SASS (machine code), e.g. [80, 90]; empty for a CPU-only build.");
  m.def("ptx_archs", &ptx_archs,
        "Compute capabilities compiled to PTX (JIT-compiled by the driver for newer GPUs), e.g. [90].");
  m.def("compiler", &host_compiler, "The C++ compiler of the host code, e.g. 'gcc 12.2.0'.");
  m.def("torch_version", [] { return std::string(kTorchVersion); },
        "torch.__version__ of the torch this build was compiled against.");
  m.def("debug", [] { return TBD_OPS_BUILD_DEBUG != 0; }, "Whether this is a TBD_OPS_DEBUG=1 (-O0 -g) build.");
  m.attr("WITH_CUDA") = kWithCuda;
}
