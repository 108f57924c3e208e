// SPDX-License-Identifier: MIT
/*
 * Helpers of the paging selftests (page_walk_vcpu.cpp, pks_guest.cpp):
 * control-register bits, guest accessors for EFLAGS.AC and PKRU, the
 * accesses guest code performs under guest_catch(), and CPUID queries.
 */
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <virtkit/x86/guest.h>
#include <virtkit/kvm.h>
#include <virtkit/system.hpp>

namespace paging {

inline constexpr std::uint64_t CR0_WP = 1ull << 16;
inline constexpr std::uint64_t CR4_SMEP = 1ull << 20;
inline constexpr std::uint64_t CR4_SMAP = 1ull << 21;
inline constexpr std::uint64_t CR4_PKE = 1ull << 22;
inline constexpr std::uint64_t CR4_PKS = 1ull << 24;
inline constexpr std::uint64_t RFLAGS_AC = 1ull << 18;
inline constexpr std::uint32_t MSR_IA32_PKRS = virtkit::PksSupport::pkrs_msr;

/* AD and WD of protection key k, in PKRU or IA32_PKRS. */
constexpr std::uint32_t pkr_ad(unsigned k) { return 1u << (2 * k); }
constexpr std::uint32_t pkr_wd(unsigned k) { return 2u << (2 * k); }

/* Guest code: EFLAGS.AC through PUSHF/POPF (STAC/CLAC need SMAP). */
static inline void guest_set_ac(bool on)
{
	std::uint64_t f;
	__asm__ volatile("pushfq; pop %0" : "=r"(f));
	f = on ? f | RFLAGS_AC : f & ~RFLAGS_AC;
	__asm__ volatile("push %0; popfq" ::"r"(f) : "cc", "memory");
}

/* Guest code: WRPKRU (CR4.PKE must be set). */
static inline void guest_wrpkru(std::uint32_t v)
{
	__asm__ volatile("wrpkru" ::"a"(v), "c"(0), "d"(0) : "memory");
}

/* Guest code: the accesses, one byte each, for guest_catch(). */
static inline void guest_read_byte(void *p) { (void)*(volatile std::uint8_t *)p; }
static inline void guest_write_byte(void *p) { *(volatile std::uint8_t *)p = 0x5a; }
/* The page must hold a RET (0xc3) at p. */
static inline void guest_call(void *p) { ((void (*)(void))p)(); }

/* Whether bit `bit` of register `reg` ('a', 'b', 'c', 'd') of CPUID (fn, index) is set. */
inline bool cpuid_bit(const std::vector<kvm_cpuid_entry2> &cpuid, std::uint32_t fn,
		      std::uint32_t index, char reg, unsigned bit)
{
	for (auto &e : cpuid) {
		if (e.function != fn || e.index != index)
			continue;
		std::uint32_t v = reg == 'a' ? e.eax : reg == 'b' ? e.ebx : reg == 'c' ? e.ecx : e.edx;
		return v >> bit & 1;
	}
	return false;
}

/* The CPUID features the paging tests use. */
struct Features {
	bool smep, smap, pku, pks, la57, nx;
};

inline Features features(const std::vector<kvm_cpuid_entry2> &cpuid)
{
	return {cpuid_bit(cpuid, 7, 0, 'b', 7),	  cpuid_bit(cpuid, 7, 0, 'b', 20),
		cpuid_bit(cpuid, 7, 0, 'c', 3),	  cpuid_bit(cpuid, 7, 0, 'c', 31),
		cpuid_bit(cpuid, 7, 0, 'c', 16), cpuid_bit(cpuid, 0x80000001, 0, 'd', 20)};
}

} // namespace paging
