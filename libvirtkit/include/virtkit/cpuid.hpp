// SPDX-License-Identifier: MIT
/*
 * CPUID tables as KVM_GET_SUPPORTED_CPUID returns them (System::supported_cpuid())
 * and KVM_SET_CPUID2 takes them (Vcpu::set_cpuid()), and the VMM's changes
 * between the two:
 *
 *   auto cpuid = system.supported_cpuid();
 *   apply_cpuid_edits(cpuid, {{.function = 1, .reg = CpuidReg::ecx,
 *                              .clear = 1u << 5}});	// no VMX for the guest
 *   vcpu.set_cpuid(cpuid);
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <virtkit/kvm.h>

#include <cstdint>
#include <initializer_list>
#include <span>
#include <vector>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

enum class CpuidReg { eax, ebx, ecx, edx };

/*
 * The entry the CPU would answer (function, index) with, as KVM looks it up:
 * index counts only for leaves KVM flags KVM_CPUID_FLAG_SIGNIFCANT_INDEX.
 * nullptr when the table has none.
 */
const kvm_cpuid_entry2 *cpuid_find(std::span<const kvm_cpuid_entry2> cpuid,
				   std::uint32_t function, std::uint32_t index = 0);

std::uint32_t &cpuid_reg(kvm_cpuid_entry2 &entry, CpuidReg reg) noexcept;
std::uint32_t cpuid_reg(const kvm_cpuid_entry2 &entry, CpuidReg reg) noexcept;

/* A VMM's change of one register of one leaf: reg = (reg & ~clear) | set. */
struct CpuidEdit {
	std::uint32_t function;
	std::uint32_t index = 0;
	CpuidReg reg;
	std::uint32_t clear = 0;
	std::uint32_t set = 0;
};

/*
 * Apply edits in order, all or nothing: an edit of a leaf the table lacks
 * throws Error("apply_cpuid_edits", ENOENT) naming it, with cpuid unchanged.
 * (Setting bits KVM did not offer is the VMM's choice; KVM_SET_CPUID2
 * accepts most, but the guest may then fault using the feature.)
 */
void apply_cpuid_edits(std::vector<kvm_cpuid_entry2> &cpuid, std::span<const CpuidEdit> edits);
/* The same for a braced list of edits (a span cannot be built from one). */
inline void apply_cpuid_edits(std::vector<kvm_cpuid_entry2> &cpuid,
			      std::initializer_list<CpuidEdit> edits)
{
	apply_cpuid_edits(cpuid, std::span<const CpuidEdit>(edits.begin(), edits.size()));
}

} // namespace virtkit

#pragma GCC visibility pop
