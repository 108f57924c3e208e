// SPDX-License-Identifier: MIT
#include <virtkit/cpuid.hpp>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"

namespace virtkit {

const kvm_cpuid_entry2 *cpuid_find(std::span<const kvm_cpuid_entry2> cpuid,
				   std::uint32_t function, std::uint32_t index)
{
	for (auto &e : cpuid)
		if (e.function == function &&
		    (e.index == index || !(e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)))
			return &e;
	return nullptr;
}

std::uint32_t &cpuid_reg(kvm_cpuid_entry2 &e, CpuidReg reg) noexcept
{
	switch (reg) {
	case CpuidReg::eax:
		return e.eax;
	case CpuidReg::ebx:
		return e.ebx;
	case CpuidReg::ecx:
		return e.ecx;
	case CpuidReg::edx:
		break;
	}
	return e.edx;
}

std::uint32_t cpuid_reg(const kvm_cpuid_entry2 &e, CpuidReg reg) noexcept
{
	return cpuid_reg(const_cast<kvm_cpuid_entry2 &>(e), reg);
}

void apply_cpuid_edits(std::vector<kvm_cpuid_entry2> &cpuid, std::span<const CpuidEdit> edits)
{
	/* On a copy: a missing leaf leaves the caller's table as it was. */
	std::vector<kvm_cpuid_entry2> out = cpuid;
	for (auto &ed : edits) {
		auto *e = cpuid_find(out, ed.function, ed.index);
		if (!e)
			throw Error("apply_cpuid_edits", ENOENT,
				    "leaf " + detail::hex(ed.function) + " index " +
					    std::to_string(ed.index) + " is not in the table");
		auto &r = cpuid_reg(*const_cast<kvm_cpuid_entry2 *>(e), ed.reg);
		r = (r & ~ed.clear) | ed.set;
	}
	cpuid = std::move(out);
}

} // namespace virtkit
