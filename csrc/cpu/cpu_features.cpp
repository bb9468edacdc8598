#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace subkern::cpu {
namespace {

constexpr int kAuto = -1;
std::atomic<int> g_forced{-2};  // -2: not read from the environment yet

Isa parse_isa(const std::string& name, bool* is_auto) {
  *is_auto = false;
  if (name == "avx512" || name == "avx512vpopcntdq") return Isa::Avx512Vpopcnt;
  if (name == "avx2") return Isa::Avx2;
  if (name == "portable" || name == "scalar") return Isa::Portable;
  if (name == "auto" || name.empty()) {
    *is_auto = true;
    return Isa::Portable;
  }
  throw std::invalid_argument("unknown CPU ISA '" + name +
                              "': expected one of avx512, avx2, portable, auto");
}

Isa best_supported() {
  for (Isa isa : compiled_isas()) {
    if (cpu_supports(isa)) return isa;
  }
  return Isa::Portable;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vpopcnt: return "avx512vpopcntdq";
    case Isa::Avx2: return "avx2";
    case Isa::Portable: return "portable";
  }
  return "portable";
}

std::vector<Isa> compiled_isas() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return {Isa::Avx512Vpopcnt, Isa::Avx2, Isa::Portable};
#else
  return {Isa::Portable};
#endif
}

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Avx512Vpopcnt:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq") &&
             __builtin_cpu_supports("popcnt");
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case Isa::Portable:
      return true;
  }
  return false;
#else
  return isa == Isa::Portable;
#endif
}

Isa active_isa() {
  int forced = g_forced.load(std::memory_order_acquire);
  if (forced == -2) {
    const char* env = std::getenv("SUBKERN_CPU_ISA");
    int value = kAuto;
    if (env != nullptr) {
      bool is_auto = false;
      Isa isa = Isa::Portable;
      try {
        isa = parse_isa(env, &is_auto);
      } catch (const std::invalid_argument&) {
        is_auto = true;  // an unknown value falls back to auto; set_isa() reports errors
      }
      if (!is_auto && cpu_supports(isa)) value = static_cast<int>(isa);
    }
    g_forced.store(value, std::memory_order_release);
    forced = value;
  }
  if (forced == kAuto) return best_supported();
  return static_cast<Isa>(forced);
}

void set_isa(const std::string& name) {
  bool is_auto = false;
  Isa isa = parse_isa(name, &is_auto);
  if (is_auto) {
    g_forced.store(kAuto, std::memory_order_release);
    return;
  }
  bool compiled = false;
  for (Isa c : compiled_isas()) compiled = compiled || c == isa;
  if (!compiled) {
    throw std::runtime_error(std::string("CPU ISA '") + isa_name(isa) +
                             "' is not compiled into this build of subkern._C");
  }
  if (!cpu_supports(isa)) {
    throw std::runtime_error(std::string("this CPU cannot run the '") + isa_name(isa) +
                             "' kernels (missing instructions)");
  }
  g_forced.store(static_cast<int>(isa), std::memory_order_release);
}

std::vector<std::string> detected_features() {
  std::vector<std::string> out;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("popcnt")) out.emplace_back("popcnt");
  if (__builtin_cpu_supports("avx2")) out.emplace_back("avx2");
  if (__builtin_cpu_supports("fma")) out.emplace_back("fma");
  if (__builtin_cpu_supports("avx512f")) out.emplace_back("avx512f");
  if (__builtin_cpu_supports("avx512bw")) out.emplace_back("avx512bw");
  if (__builtin_cpu_supports("avx512vl")) out.emplace_back("avx512vl");
  if (__builtin_cpu_supports("avx512vpopcntdq")) out.emplace_back("avx512vpopcntdq");
  if (__builtin_cpu_supports("avx512bf16")) out.emplace_back("avx512bf16");
  if (__builtin_cpu_supports("amx-tile")) out.emplace_back("amx-tile");
#elif defined(__aarch64__)
  out.emplace_back("neon");
#endif
  return out;
}

}  // namespace subkern::cpu
