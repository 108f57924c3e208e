// SPDX-License-Identifier: MIT
/*
 * Internal: the memory type of a guest-physical address from a vCPU's MTRRs
 * (Intel SDM vol. 3, 12.11.4.1 "MTRR Precedences"). Pure; unit-tested.
 */
#pragma once

#include <array>
#include <cstdint>
#include <span>

namespace virtkit::detail::kvmi {

inline constexpr std::uint32_t msr_mtrr_cap = 0xfe;
inline constexpr std::uint32_t msr_mtrr_def_type = 0x2ff;
inline constexpr std::uint32_t msr_mtrr_phys_base0 = 0x200; /* mask: base + 1 */
/* The eleven fixed-range MTRRs, in address order. */
inline constexpr std::array<std::uint32_t, 11> msr_mtrr_fixed = {
	0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
};
inline constexpr std::uint8_t mtrr_uc = 0, mtrr_wc = 1, mtrr_wt = 4, mtrr_wp = 5, mtrr_wb = 6;

struct MtrrState {
	std::uint64_t cap = 0;		/* IA32_MTRRCAP: VCNT in 7:0, FIX in bit 8 */
	std::uint64_t def_type = 0;	/* IA32_MTRR_DEF_TYPE: type 7:0, FE 10, E 11 */
	std::array<std::uint64_t, 11> fixed{};
	struct Var {
		std::uint64_t base, mask;
	};
	std::array<Var, 255> var{};	/* the first min(VCNT, 255) are meaningful */
	bool cpuid_mtrr = true;		/* the guest's CPUID has MTRR (leaf 1, EDX bit 12) */
};

/*
 * The memory type of gpa. With MTRRs disabled (E clear): UC as the SDM
 * says, or WB when the guest's CPUID has no MTRR - KVM's
 * mtrr_disabled_type(), which GET_MTRR_TYPE answers in the kernel.
 */
std::uint8_t mtrr_type(const MtrrState &m, std::uint64_t gpa);

} // namespace virtkit::detail::kvmi
