// Run-time CPU feature detection and the instruction-set level the CPU kernels dispatch to.
#pragma once

#include <string>
#include <vector>

namespace subkern::cpu {

// Instruction-set levels of the CPU kernels, best first.
enum class Isa { Avx512Vpopcnt = 0, Avx2 = 1, Portable = 2 };

const char* isa_name(Isa isa);

// Levels compiled into this build (x86-64 builds carry all three; others only Portable).
std::vector<Isa> compiled_isas();

// Whether this CPU can run `isa` (checked with cpuid at run time).
bool cpu_supports(Isa isa);

// The level kernels use now: the best supported one, unless forced with set_isa() or the
// environment variable SUBKERN_CPU_ISA=avx512|avx2|portable|auto (read once, at first use).
Isa active_isa();

// Force a level ("avx512", "avx2", "portable") or go back to "auto". Throws std::invalid_argument
// for unknown names and std::runtime_error when the CPU cannot run the requested level.
void set_isa(const std::string& name);

// CPU features relevant to subkern, as detected at run time, e.g. {"avx2", "avx512f", ...}.
std::vector<std::string> detected_features();

}  // namespace subkern::cpu
