// subkern._C: the pybind11 module. It only reports build facts and CPU features; the kernels
// register themselves with the torch dispatcher (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda)
// against schemas that subkern/ops defines in Python.
#include <torch/extension.h>

#include <string>

#include "cpu/cpu_features.h"

#ifndef SUBKERN_WITH_CUDA
#define SUBKERN_WITH_CUDA 0
#endif
// setup.py passes the torch version as bare tokens (-DSUBKERN_TORCH_VERSION=2.13.0+cpu).
#define SUBKERN_STRINGIFY_(x) #x
#define SUBKERN_STRINGIFY(x) SUBKERN_STRINGIFY_(x)
#ifdef SUBKERN_TORCH_VERSION
#define TORCH_VERSION_STRING_FOR_SUBKERN SUBKERN_STRINGIFY(SUBKERN_TORCH_VERSION)
#else
#define TORCH_VERSION_STRING_FOR_SUBKERN "unknown"
#endif

// Read by subkern/_ext.py from the .so file *before* importing it, so that an extension built
// against another torch is refused instead of crashing the process.
extern "C" __attribute__((used, visibility("default"))) const char subkern_build_marker[] =
    "SUBKERN_BUILT_FOR_TORCH=" TORCH_VERSION_STRING_FOR_SUBKERN ";";

namespace {

std::string compiler_string() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::string(TORCH_VERSION_STRING_FOR_SUBKERN);
  info["compiler"] = compiler_string();
  info["with_cuda"] = static_cast<bool>(SUBKERN_WITH_CUDA);
  py::list isas;
  for (auto isa : subkern::cpu::compiled_isas()) isas.append(subkern::cpu::isa_name(isa));
  info["compiled_cpu_isas"] = isas;
  info["cpu_features"] = subkern::cpu::detected_features();
  info["active_cpu_isa"] = std::string(subkern::cpu::isa_name(subkern::cpu::active_isa()));
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "subkern compiled kernels (CPU, optionally CUDA)";
  m.def("build_info", &build_info, "Build facts: torch version, compiler, CUDA, CPU ISAs.");
  m.def("torch_version", []() { return std::string(TORCH_VERSION_STRING_FOR_SUBKERN); },
        "The torch version this extension was compiled against.");
  m.def("cpu_isa", []() { return std::string(subkern::cpu::isa_name(subkern::cpu::active_isa())); },
        "The instruction-set level the CPU kernels use now.");
  m.def("set_cpu_isa", &subkern::cpu::set_isa, py::arg("name"),
        "Force the CPU kernels' level: 'avx512', 'avx2', 'portable' or 'auto'.");
  m.def("cpu_features", &subkern::cpu::detected_features, "CPU features detected at run time.");
}
