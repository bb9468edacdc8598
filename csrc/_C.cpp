// subkern._C: the pybind11 module. It reports build facts and CPU features, and binds the direct
// (dispatcher-free) entry points of a few CPU inference kernels (csrc/cpu/direct.h,
// subkern/ops/_direct.py); the kernels register themselves with the torch dispatcher
// (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda) against schemas that subkern/ops defines in
// Python.
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <csignal>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <execinfo.h>
#include <unistd.h>
#endif

#include "cpu/cpu_features.h"
#include "cpu/direct.h"

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
  // facts that decide whether C++ exceptions cross into torch and pybind11 cleanly
  info["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                             std::to_string(PYBIND11_VERSION_MINOR) + "." +
                             std::to_string(PYBIND11_VERSION_PATCH);
  info["pybind11_internals_id"] = std::string(PYBIND11_INTERNALS_ID);
#if defined(_GLIBCXX_USE_CXX11_ABI)
  info["glibcxx_cxx11_abi"] = static_cast<int>(_GLIBCXX_USE_CXX11_ABI);
#endif
#if defined(_GLIBCXX_RELEASE)
  info["glibcxx_release"] = static_cast<int>(_GLIBCXX_RELEASE);
#endif
  return info;
}

// fn recorded for the profiler as `name`, with c10::Error rethrown as std::runtime_error carrying
// the message without the C++ backtrace (pybind11 turns it into RuntimeError, the type the
// torch.ops path raises).
template <class R, class... Args>
auto without_backtrace(const char* name, R (*fn)(Args...)) {
  return [name, fn](Args... args) -> R {
    RECORD_FUNCTION(name, std::vector<c10::IValue>());  // visible to torch.profiler
    try {
      return fn(args...);
    } catch (const c10::Error& err) {
      throw std::runtime_error(err.what_without_backtrace());
    }
  };
}

#if defined(__linux__)
// Handlers installed before ours (e.g. Python's faulthandler), indexed by signal number.
using SignalHandler = void (*)(int);
SignalHandler previous_handler[NSIG] = {};

// Diagnostics (benchmarks/exception_probe.py): on SIGSEGV / SIGBUS / SIGILL / SIGABRT, write the
// native stack (glibc backtrace: return addresses with their object files and nearest exported
// symbols) to stderr, then hand the signal to the handler installed before (faulthandler prints
// the Python stack) or die of it with the default action.
void crash_backtrace(int sig) {
  const char* head = "\n[subkern crash handler] native backtrace:\n";
  ssize_t unused = write(STDERR_FILENO, head, std::strlen(head));
  (void)unused;
  void* frames[64];
  const int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  const SignalHandler before = previous_handler[sig];
  std::signal(sig, before != nullptr && before != SIG_ERR && before != SIG_IGN ? before : SIG_DFL);
  std::raise(sig);
}
#endif

bool install_crash_handler() {
#if defined(__linux__)
  void* warm[1];
  backtrace(warm, 1);   // loads libgcc_s now, not inside the signal handler
  for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGABRT}) {
    const SignalHandler before = std::signal(sig, crash_backtrace);
    if (before != crash_backtrace) previous_handler[sig] = before;
  }
  return true;
#else
  return false;
#endif
}

// Raises one TORCH_CHECK error from this extension (the probe's control case without any kernel).
void raise_torch_check(bool catch_here) {
  if (!catch_here) TORCH_CHECK(false, "subkern._C.raise_torch_check: a deliberate TORCH_CHECK");
  try {
    TORCH_CHECK(false, "subkern._C.raise_torch_check: a deliberate TORCH_CHECK");
  } catch (const c10::Error& err) {
    throw std::runtime_error(err.what_without_backtrace());
  }
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
  m.def("install_crash_handler", &install_crash_handler,
        "Diagnostics: print the native backtrace to stderr on SIGSEGV/SIGBUS/SIGILL/SIGABRT "
        "(then die of the signal). Returns False where unsupported.");
  m.def("raise_torch_check", &raise_torch_check, py::arg("catch_here") = false,
        "Diagnostics: raise a TORCH_CHECK error inside this extension (caught and rethrown as "
        "std::runtime_error first when catch_here).");
  // The GIL is released while the kernels run (as torch.ops calls do); c10::Error becomes a
  // RuntimeError with the message alone (the op path's text), not the C++ backtrace.
  m.def("direct_ternary_linear_prepacked",
        without_backtrace("subkern::ternary_linear_prepacked",
                          &subkern::cpu::direct_ternary_linear_prepacked),
        py::call_guard<py::gil_scoped_release>(),
        "The CPU kernel of subkern::ternary_linear_prepacked without the dispatcher (inference).");
  m.def("direct_csr_linear", without_backtrace("subkern::csr_linear", &subkern::cpu::direct_csr_linear),
        py::call_guard<py::gil_scoped_release>(),
        "The CPU kernel of subkern::csr_linear without the dispatcher (inference).");
  m.def("direct_csr_matmul", without_backtrace("subkern::csr_matmul", &subkern::cpu::direct_csr_matmul),
        py::call_guard<py::gil_scoped_release>(),
        "The CPU kernel of subkern::csr_matmul without the dispatcher (inference).");
  m.def("csr_permute_supported", &subkern::cpu::csr_permute_supported,
        "Whether this CPU runs the permuted-chunk csr_linear kernel (AVX-512).");
  m.def("csr_permute_slots", without_backtrace("csr_permute_slots", &subkern::cpu::csr_permute_slots),
        py::call_guard<py::gil_scoped_release>(),
        "Slots per (row, 32-column chunk) of the permuted-chunk layout its cost model picks; 0 "
        "keeps the CSR kernel.");
  m.def("csr_permute_pack", without_backtrace("csr_permute_pack", &subkern::cpu::csr_permute_pack),
        py::call_guard<py::gil_scoped_release>(),
        "The permuted-chunk layout of a CSR weight: [slot_idx, slot_val, res_ptr, res_col, "
        "res_val].");
  m.def("direct_csr_linear_permuted",
        without_backtrace("subkern::csr_linear", &subkern::cpu::direct_csr_linear_permuted),
        py::call_guard<py::gil_scoped_release>(),
        "csr_linear's product (batch <= 3) from the permuted-chunk layout (inference).");
}
