// SPDX-License-Identifier: MIT
#include "kvmi/vmm/mtrr.hpp"

#include <algorithm>

namespace virtkit::detail::kvmi {

/*
 * Disabled MTRRs answer what KVM's kvm_mtrr_get_guest_memory_type() does
 * (the kernel's GET_MTRR_TYPE): the SDM's UC, unless the guest cannot have
 * MTRRs at all (no MTRR in its CPUID), where firmware never enables them
 * and KVM takes WB.
 */
std::uint8_t mtrr_type(const MtrrState &m, std::uint64_t gpa)
{
	constexpr std::uint64_t def_e = 1u << 11, def_fe = 1u << 10, cap_fix = 1u << 8;
	constexpr std::uint64_t mask_valid = 1u << 11;
	/* Address bits 51:12 take part in variable-range matches. */
	constexpr std::uint64_t addr_bits = ((1ull << 52) - 1) & ~0xfffull;

	if (!(m.def_type & def_e))
		return m.cpuid_mtrr ? mtrr_uc : mtrr_wb;

	if ((m.def_type & def_fe) && (m.cap & cap_fix) && gpa < 0x100000) {
		std::uint64_t msr, unit, base;
		if (gpa < 0x80000) {
			msr = 0, unit = 0x10000, base = 0;
		} else if (gpa < 0xc0000) {
			msr = 1 + (gpa - 0x80000) / 0x20000, unit = 0x4000,
			base = 0x80000 + (msr - 1) * 0x20000;
		} else {
			msr = 3 + (gpa - 0xc0000) / 0x8000, unit = 0x1000,
			base = 0xc0000 + (msr - 3) * 0x8000;
		}
		std::uint64_t byte = (gpa - base) / unit;
		return static_cast<std::uint8_t>(m.fixed[msr] >> (8 * byte));
	}

	const std::size_t vcnt = std::min<std::size_t>(m.cap & 0xff, m.var.size());
	int found = -1;
	bool uc = false, wt = false, other_mix = false;
	for (std::size_t i = 0; i < vcnt; i++) {
		const auto &v = m.var[i];
		if (!(v.mask & mask_valid))
			continue;
		const std::uint64_t mask = v.mask & addr_bits;
		if ((gpa & mask) != (v.base & mask))
			continue;
		const std::uint8_t t = v.base & 0xff;
		if (t == mtrr_uc)
			uc = true;
		if (t == mtrr_wt)
			wt = true;
		if (found >= 0 && found != t && !((found == mtrr_wt || found == mtrr_wb) &&
						   (t == mtrr_wt || t == mtrr_wb)))
			other_mix = true;
		if (found < 0)
			found = t;
	}
	if (found < 0)
		return m.def_type & 0xff;
	if (uc)
		return mtrr_uc;
	/* Overlaps other than UC with anything and WT with WB are undefined: UC. */
	if (other_mix)
		return mtrr_uc;
	if (wt)
		return mtrr_wt;
	return static_cast<std::uint8_t>(found);
}

} // namespace virtkit::detail::kvmi
