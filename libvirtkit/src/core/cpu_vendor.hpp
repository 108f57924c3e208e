// SPDX-License-Identifier: MIT
/*
 * Internal: the CPU vendor from CPUID leaf 0's vendor string, as KVM
 * tells an AMD-compatible guest apart (guest_cpuid_is_amd_compatible()).
 */
#pragma once

#include <cstdint>

namespace virtkit::detail {

/* AuthenticAMD or HygonGenuine in EBX, EDX, ECX of CPUID leaf 0. */
inline bool vendor_is_amd_compatible(std::uint32_t ebx, std::uint32_t ecx, std::uint32_t edx)
{
	return (ebx == 0x68747541 && ecx == 0x444d4163 && edx == 0x69746e65) ||
	       (ebx == 0x6f677948 && ecx == 0x656e6975 && edx == 0x6e65476e);
}

} // namespace virtkit::detail
