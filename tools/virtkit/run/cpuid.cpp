// SPDX-License-Identifier: MIT
/* Per-vCPU CPUID (cpuid.hpp). */
#include "cpuid.hpp"

namespace virtkit::tool::run {

std::vector<kvm_cpuid_entry2> vcpu_cpuid(std::vector<kvm_cpuid_entry2> cpuid,
					 std::uint32_t apic_id)
{
	const CpuidEdit edits[] = {
		/* Initial APIC ID; leaf 1 HTT stays as KVM has it (no SMT topology). */
		{.function = 1, .reg = CpuidReg::ebx, .clear = 0xff000000u,
		 .set = (apic_id & 0xff) << 24},
		{.function = 1, .reg = CpuidReg::ecx, .clear = 1u << 5},		/* VMX */
		{.function = 0x80000001, .reg = CpuidReg::ecx, .clear = 1u << 2},	/* SVM */
	};
	apply_cpuid_edits(cpuid, edits);
	/* Every sub-leaf of the extended topology leaves reports the x2APIC ID. */
	for (auto &e : cpuid)
		if (e.function == 0xb || e.function == 0x1f)
			e.edx = apic_id;
	return cpuid;
}

} // namespace virtkit::tool::run
