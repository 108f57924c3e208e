// SPDX-License-Identifier: MIT
/*
 * virtkit page walks - what the processor would do with one guest linear
 * address: the guest-physical address, page size and rights it reaches, or
 * the exact fault (#PF with its error code, #GP for a non-canonical
 * address). Documentation/pks.rst lists the rules.
 *
 *	Walk w = vcpu.translate(gva, Access::write);
 *	if (w.page_fault() && (w.error_code & pfec::pk))
 *		... // a protection key (PKRU or IA32_PKRS) forbids the write
 *
 * Vcpu::translate(gva, access) walks with the vCPU's current state
 * (Vcpu::paging_state()); translate(memory, state, gva, access) below walks
 * with a state the caller gives (a snapshot, a state to try) over a VM's
 * guest memory, without a vCPU. Both are one implementation, the engine
 * that virtkit.ko runs too: IA-32e paging (4 and 5 levels), 4 KiB, 2 MiB and
 * 1 GiB pages, reserved bits, NX, CR0.WP, U/S, SMEP, SMAP (with EFLAGS.AC
 * and implicit accesses) and protection keys (PKRU with CR4.PKE, IA32_PKRS
 * with CR4.PKS). A walk is a pure query: it sets no accessed or dirty bits
 * and has no TLB (the answer is what the tables give now). Paging-structure
 * entries are read through the VMM's view of guest memory.
 *
 * A guest fault is an answer, not an error. Errors (virtkit::Error, with the
 * operation "page walk"):
 *   ENOTSUP  legacy 32-bit or PAE paging (CR0.PG=1 with EFER.LMA=0)
 *   EFAULT   a paging-structure entry lies outside the VM's guest memory
 *            (the tables CR3 points to are not backed by any region): the
 *            processor would not raise a #PF for that, so neither do we
 *   EINVAL   a state the engine cannot use (cpl > 3, maxphyaddr outside
 *            32..52) or that no processor with the state's features can
 *            be in (CR4.SMEP, SMAP, PKE, PKS, LA57 or EFER.NXE set without
 *            the feature)
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <array>
#include <cstdint>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

class GuestMemory;

/*
 * An access to a linear address. Whether it is a user-mode or a
 * supervisor-mode access follows from the CPL: an explicit access at CPL 3
 * is user-mode, every other one supervisor-mode. The implicit kinds are the
 * processor's own supervisor-mode accesses (GDT, LDT, IDT, TSS, ...) at any
 * CPL; they differ from explicit ones under SMAP.
 */
enum class Access : std::uint8_t {
	read,
	write,
	fetch,
	implicit_read,
	implicit_write,
};

/*
 * The processor features a walk depends on (PagingState::features), from
 * the vCPU's CPUID. Without page1gb, PS in a PDPTE is a reserved bit (the
 * walk gives #PF with pfec::rsvd); without one of the others its CR4 or
 * EFER bit cannot be set.
 */
namespace paging_feature {
inline constexpr std::uint32_t nx = 1u << 0;		/* CPUID.80000001H:EDX[20] */
inline constexpr std::uint32_t page1gb = 1u << 1;	/* CPUID.80000001H:EDX[26] */
inline constexpr std::uint32_t smep = 1u << 2;		/* CPUID.(7,0):EBX[7] */
inline constexpr std::uint32_t smap = 1u << 3;		/* CPUID.(7,0):EBX[20] */
inline constexpr std::uint32_t pku = 1u << 4;		/* CPUID.(7,0):ECX[3] */
inline constexpr std::uint32_t la57 = 1u << 5;		/* CPUID.(7,0):ECX[16] */
inline constexpr std::uint32_t pks = 1u << 6;		/* CPUID.(7,0):ECX[31] */
inline constexpr std::uint32_t all = 0x7fu;
} // namespace paging_feature

/* The vCPU state a walk depends on. */
struct PagingState {
	std::uint64_t cr0 = 0;
	std::uint64_t cr3 = 0;
	std::uint64_t cr4 = 0;
	std::uint64_t efer = 0;		/* LMA is used as given */
	std::uint64_t rflags = 0;	/* AC only */
	std::uint32_t cpl = 0;		/* 0..3 */
	std::uint32_t pkru = 0;
	std::uint32_t pkrs = 0;		/* IA32_PKRS bits 31:0 (63:32 are reserved) */
	std::uint32_t maxphyaddr = 36;	/* CPUID.80000008H:EAX[7:0] */
	/*
	 * paging_feature::* the processor has (Vcpu::paging_state(): the
	 * vCPU's CPUID); the default is a processor with all of them.
	 */
	std::uint32_t features = paging_feature::all;
};

/* #PF error code bits (Walk::error_code). */
namespace pfec {
inline constexpr std::uint32_t present = 1u << 0;	/* P: a protection violation */
inline constexpr std::uint32_t write = 1u << 1;		/* W */
inline constexpr std::uint32_t user = 1u << 2;		/* U: a user-mode access */
inline constexpr std::uint32_t rsvd = 1u << 3;		/* a reserved bit is set */
inline constexpr std::uint32_t fetch = 1u << 4;		/* I/D */
inline constexpr std::uint32_t pk = 1u << 5;		/* a protection key */
} // namespace pfec

/* The answer of a walk. */
struct Walk {
	enum class Outcome {
		ok,			/* the access would succeed */
		page_fault,		/* #PF with error_code */
		general_protection,	/* #GP(0): a non-canonical address */
	};

	/* Walk::rights: the page's own rights, combined over the levels. */
	static constexpr std::uint32_t right_write = 1u << 0;	/* R/W=1 at every level */
	static constexpr std::uint32_t right_user = 1u << 1;	/* U/S=1 at every level */
	static constexpr std::uint32_t right_exec = 1u << 2;	/* XD=0 at every level (or NXE=0) */

	/* Walk::allowed: the access types that would succeed. */
	static constexpr std::uint32_t allow_read = 1u << 0;
	static constexpr std::uint32_t allow_write = 1u << 1;
	static constexpr std::uint32_t allow_fetch = 1u << 2;

	Outcome outcome = Outcome::ok;
	std::uint32_t error_code = 0;	/* page_fault: pfec::* bits */
	/*
	 * ok, and a #PF with P=1 and RSVD=0 (a protection or key violation:
	 * the walk reached the leaf): the translation, the page size, the
	 * page's rights (right_*), its protection key (leaf bits 62:59; 0
	 * without paging) and the access types (allow_*) that an access of
	 * the same mode (CPL, implicit or not) may perform, keys included.
	 * Zero otherwise.
	 */
	std::uint64_t gpa = 0;
	std::uint64_t page_size = 0;
	std::uint32_t rights = 0;
	std::uint32_t key = 0;
	std::uint32_t allowed = 0;
	/*
	 * The level of the last entry read: 1 (PTE) .. 5 (PML5E); the leaf
	 * on success, where a #PF stopped the walk otherwise; 0 without
	 * paging and on #GP. entry[l] and entry_gpa[l] are the entries read
	 * at each level l (level..top) and where they are; the others are 0.
	 */
	int level = 0;
	std::array<std::uint64_t, 6> entry{};
	std::array<std::uint64_t, 6> entry_gpa{};

	bool ok() const noexcept { return outcome == Outcome::ok; }
	bool page_fault() const noexcept { return outcome == Outcome::page_fault; }
	bool general_protection() const noexcept
	{
		return outcome == Outcome::general_protection;
	}
	/* Whether the walk reached a leaf: gpa, page_size, rights, key are set. */
	bool mapped() const noexcept
	{
		return ok() || (page_fault() && (error_code & pfec::present) &&
				!(error_code & pfec::rsvd));
	}
	bool writable() const noexcept { return rights & right_write; }
	bool user() const noexcept { return rights & right_user; }
	bool executable() const noexcept { return rights & right_exec; }
	/*
	 * Whether an access of the given type and of this walk's mode would
	 * succeed on the page (false when the walk reached no leaf).
	 */
	bool allows(Access access) const noexcept
	{
		switch (access) {
		case Access::read:
		case Access::implicit_read:
			return allowed & allow_read;
		case Access::write:
		case Access::implicit_write:
			return allowed & allow_write;
		case Access::fetch:
			return allowed & allow_fetch;
		}
		return false;
	}
};

/*
 * Walk guest linear address gva for access in state, reading the paging
 * structures from memory (a VM's GuestMemory). Thread safety: may be
 * called from any thread, as GuestMemory::read. Throws Error (see above).
 */
Walk translate(const GuestMemory &memory, const PagingState &state, std::uint64_t gva,
	       Access access);

} // namespace virtkit

#pragma GCC visibility pop
