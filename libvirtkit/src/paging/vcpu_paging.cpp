// SPDX-License-Identifier: MIT
/*
 * Vcpu::paging_state() and Vcpu::translate(gva, access): a vCPU's state as
 * the page-walk engine needs it, from KVM.
 */
#include <virtkit/vcpu.hpp>

#include <cpuid.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <mutex>

#include <virtkit/cpuid.hpp>
#include <virtkit/memory.hpp>
#include <virtkit/system.hpp>

#include "core/memory_map.hpp"
#include "core/vcpu_state.hpp"
#include "paging/paging_support.hpp"

namespace virtkit {

namespace {

constexpr std::uint64_t cr0_pe = 1ull << 0;
constexpr std::uint64_t cr4_smap = 1ull << 21;
constexpr std::uint64_t cr4_pke = 1ull << 22;
constexpr std::uint64_t cr4_pks = 1ull << 24;
constexpr std::uint64_t rflags_vm = 1ull << 17;
constexpr std::uint32_t xfeature_pkru = 9;
/* XSAVE area: the legacy region and the header end at byte 576. */
constexpr std::size_t xsave_header_end = 576;
/* KVM's MAXPHYADDR without CPUID leaf 0x80000008 (cpuid_query_maxphyaddr()). */
constexpr std::uint32_t default_maxphyaddr = 36;

/*
 * The offset of PKRU in the standard-format XSAVE area that KVM_GET_XSAVE
 * returns: CPUID.(0xd,9).EBX of the vCPU; a vCPU without that leaf gets the
 * host processor's (KVM lays the area out as the host does). 0 if neither
 * has it.
 */
std::uint32_t pkru_offset(const std::vector<kvm_cpuid_entry2> &cpuid)
{
	if (auto *e = cpuid_find(cpuid, 0xd, xfeature_pkru))
		return e->ebx;
	unsigned int eax, ebx, ecx, edx;
	/* EAX: the component's size, 8 bytes (PKRU and 4 reserved). */
	if (__get_cpuid_count(0xd, xfeature_pkru, &eax, &ebx, &ecx, &edx) && eax >= 4)
		return ebx;
	return 0;
}

/* As KVM's cpuid_query_maxphyaddr(). */
std::uint32_t maxphyaddr(const std::vector<kvm_cpuid_entry2> &cpuid)
{
	auto *max = cpuid_find(cpuid, 0x80000000, 0);
	if (!max || max->eax < 0x80000008)
		return default_maxphyaddr;
	auto *e = cpuid_find(cpuid, 0x80000008, 0);
	return e ? e->eax & 0xff : default_maxphyaddr;
}

/*
 * PKRU from the XSAVE area KVM_GET_XSAVE returned. Not gated on XSTATE_BV
 * bit 9: KVM keeps the guest's PKRU apart from its XSAVE state and writes it
 * at the component's offset whenever the host supports PKRU, while the
 * header bit comes from the saved XSAVE state, which holds whatever PKRU
 * the thread had when it was saved (see __copy_xstate_to_uabi_buf()). Where
 * KVM does not write the component the area is zero there, PKRU's initial
 * value.
 */
std::uint32_t pkru_of(const Xsave &x, std::uint32_t offset)
{
	const auto *area = reinterpret_cast<const std::byte *>(x.region.data());
	const std::size_t size = x.region.size() * 4;
	if (offset < xsave_header_end || offset + 4 > size)
		return 0;
	std::uint32_t pkru;
	std::memcpy(&pkru, area + offset, sizeof(pkru));
	return pkru;
}

/* Which optional parts of the state to read. */
/* all: Vcpu::paging_state(); walk: a checked walk; mapping: where a gva maps, no checks. */
enum class Want { all, walk, mapping };

/* sregs: the vCPU's current special registers, if the caller has them. */
PagingState read_state(const Vcpu &vcpu, detail::VcpuState &st, Want want,
		       const kvm_sregs *sregs = nullptr)
{
	std::uint32_t offset;
	PagingState p;
	{
		std::lock_guard lock(st.paging_mu);
		auto &c = st.paging;
		if (!c.known) {
			auto cpuid = vcpu.cpuid();
			const detail::KvmPagingSupport &kvm = st.vm->paging;
			c.maxphyaddr = maxphyaddr(cpuid);
			c.features = detail::paging_features(cpuid) & kvm.features;
			if (kvm.tdp_page1gb)
				c.features = *kvm.tdp_page1gb ? c.features | paging_feature::page1gb
							      : c.features & ~paging_feature::page1gb;
			c.pkru_offset = pkru_offset(cpuid);
			c.known = true;
		}
		p.maxphyaddr = c.maxphyaddr;
		p.features = c.features;
		offset = c.pkru_offset;
	}

	kvm_sregs own;
	const kvm_sregs &s = sregs ? *sregs : (own = vcpu.sregs());
	p.cr0 = s.cr0;
	p.cr3 = s.cr3;
	p.cr4 = s.cr4;
	p.efer = s.efer;
	if (want == Want::mapping) {
		/* No access rights are checked: nothing that only checks them is read. */
		p.cr4 &= ~(cr4_smap | cr4_pke | cr4_pks);
		return p;
	}
	/*
	 * A walk reads RFLAGS for AC, which only SMAP looks at. (VM, for the
	 * CPL below, only exists outside long mode, where a walk is either
	 * the identity or not made.)
	 */
	if (want == Want::all || (s.cr4 & cr4_smap))
		p.rflags = vcpu.regs().rflags;
	/*
	 * KVM's CPL is SS.DPL in protected mode (vmx_get_cpl(); SVM keeps
	 * the VMCB's CPL equal to it), 3 in virtual-8086 mode, 0 in real mode.
	 */
	if (!(s.cr0 & cr0_pe))
		p.cpl = 0;
	else if (p.rflags & rflags_vm)
		p.cpl = 3;
	else
		p.cpl = s.ss.dpl & 3;

	if (want == Want::all || (s.cr4 & cr4_pke))
		p.pkru = offset ? pkru_of(vcpu.xsave(), offset) : 0;
	if (st.vm->paging.pkrs_listed && (want == Want::all || (s.cr4 & cr4_pks)))
		p.pkrs = static_cast<std::uint32_t>(vcpu.msr(PksSupport::pkrs_msr));
	return p;
}

} // namespace

/* The paging features of a CPUID (paging_feature::*): the leaves KVM reads. */
std::uint32_t detail::paging_features(const std::vector<kvm_cpuid_entry2> &cpuid)
{
	using enum CpuidReg;
	static const struct {
		std::uint32_t fn;
		CpuidReg reg;
		int bit;
		std::uint32_t feature;
	} bits[] = {
		{0x80000001, edx, 20, paging_feature::nx},   {0x80000001, edx, 26, paging_feature::page1gb},
		{7, ebx, 7, paging_feature::smep},	      {7, ebx, 20, paging_feature::smap},
		{7, ecx, 3, paging_feature::pku},	      {7, ecx, 16, paging_feature::la57},
		{7, ecx, 31, paging_feature::pks},
	};
	std::uint32_t f = 0;
	for (const auto &b : bits)
		if (const kvm_cpuid_entry2 *e = cpuid_find(cpuid, b.fn, 0))
			if (cpuid_reg(*e, b.reg) >> b.bit & 1)
				f |= b.feature;
	return f;
}

PagingState Vcpu::paging_state() const
{
	return read_state(*this, *state_, Want::all);
}

std::optional<std::uint64_t> detail::guest_physical(const Vcpu &vcpu, VcpuState &st,
						    std::uint64_t gva)
{
	const Walk w = virtkit::translate(st.vm->guest_memory, read_state(vcpu, st, Want::mapping),
					  gva, Access::read);
	if (!w.mapped())
		return std::nullopt;
	return w.gpa;
}

namespace {

bool same_state(const PagingState &a, const PagingState &b) noexcept
{
	return a.cr0 == b.cr0 && a.cr3 == b.cr3 && a.cr4 == b.cr4 && a.efer == b.efer &&
	       a.rflags == b.rflags && a.cpl == b.cpl && a.pkru == b.pkru && a.pkrs == b.pkrs &&
	       a.maxphyaddr == b.maxphyaddr && a.features == b.features;
}

/*
 * One linear page's translation as a full walk found it: the state walked
 * with, every paging-structure entry the walk read (where, what, and the
 * host address it was read through) and the guest-physical page reached,
 * with its host address. Host addresses are those of `map` in `generation`.
 */
struct CachedWalk {
	const detail::MemoryMap *map = nullptr;
	std::uint64_t generation = 0;
	PagingState state;
	std::uint64_t la_page = 0;
	int first = 0, top = -1; /* entry levels first..top; none when top < first */
	std::array<std::uint64_t, 6> entry{};
	std::array<const std::uint64_t *, 6> entry_host{};
	std::uint64_t gpa_page = 0;
	const std::byte *host = nullptr; /* the 4 KiB at gpa_page */
};

/*
 * Per thread (a vCPU's exits are handled on the thread that runs it): no
 * lock. A few pages: the code page, the one before it, and those of
 * another vCPU or VM this thread runs.
 */
struct WalkCache {
	std::array<CachedWalk, 4> slot;
	unsigned next = 0;
};
thread_local WalkCache walk_cache;

/*
 * Whether c still holds: the same map generation (its host addresses are
 * valid), state and page, and every entry the walk read still has the
 * value it read, read again top-down as the walk reads them. A walk is a
 * function of its state, the linear address and the values it reads, so
 * equal values give the walk's answer exactly; any change of an entry,
 * accessed and dirty bits included, is a miss. Under map's lock.
 */
bool still_holds(const CachedWalk &c, const detail::MemoryMap &map, std::uint64_t generation,
		 const PagingState &state, std::uint64_t la_page) noexcept
{
	if (c.map != &map || c.generation != generation || c.la_page != la_page ||
	    !same_state(c.state, state))
		return false;
	for (int l = c.top; l >= c.first; l--)
		if (__atomic_load_n(c.entry_host[l], __ATOMIC_RELAXED) != c.entry[l])
			return false;
	return true;
}

/*
 * The host address of the page walk w of la_page reached (nullptr: not
 * guest RAM), and the walk remembered as the cache's newest entry unless an
 * entry it read is no longer in guest memory. Under map's lock.
 */
const std::byte *remember(const detail::MemoryMap &map, const PagingState &state,
			  std::uint64_t la_page, const Walk &w) noexcept
{
	CachedWalk c;
	c.gpa_page = w.gpa & ~std::uint64_t{4095};
	c.host = map.host_ptr_locked(c.gpa_page, 4096);
	if (!c.host)
		return nullptr;
	c.map = &map;
	c.generation = map.generation_locked();
	c.state = state;
	c.la_page = la_page;
	if (w.level > 0) {
		/* IA-32e paging (a walk throws on legacy and PAE paging): 4 or 5 levels. */
		c.first = w.level;
		c.top = (state.cr4 & (1ull << 12)) ? 5 : 4; /* CR4.LA57 */
		for (int l = c.first; l <= c.top; l++) {
			const std::byte *p = map.host_ptr_locked(w.entry_gpa[l], 8);
			if (!p || w.entry_gpa[l] % 8)
				return c.host; /* moved away since the walk: not remembered */
			c.entry[l] = w.entry[l];
			c.entry_host[l] = reinterpret_cast<const std::uint64_t *>(p);
		}
	}
	WalkCache &wc = walk_cache;
	wc.slot[wc.next++ % wc.slot.size()] = c;
	return c.host;
}

} // namespace

std::size_t detail::read_guest_virtual_cached(const Vcpu &vcpu, VcpuState &st,
					      const kvm_sregs &sregs, std::uint64_t gva,
					      std::span<std::uint8_t> out)
{
	const GuestMemory &memory = st.vm->guest_memory;
	const MemoryMap &map = GuestMemoryAccess::map(memory);
	const PagingState state = read_state(vcpu, st, Want::mapping, &sregs);
	std::size_t got = 0;
	while (got < out.size()) {
		const std::uint64_t va = gva + got;
		const std::uint64_t la_page = va & ~std::uint64_t{4095};
		const std::size_t n = std::min<std::uint64_t>(out.size() - got, 4096 - va % 4096);
		/* A hit: one shared lock, the entries compared, the bytes copied. */
		bool hit = false;
		{
			auto lock = map.lock_shared();
			const std::uint64_t generation = map.generation_locked();
			for (const CachedWalk &c : walk_cache.slot)
				if (still_holds(c, map, generation, state, la_page)) {
					std::memcpy(out.data() + got, c.host + va % 4096, n);
					hit = true;
					break;
				}
		}
		if (!hit) {
			/* A miss: the full walk, as guest_physical(), then remembered. */
			const Walk w = virtkit::translate(memory, state, va, Access::read);
			if (!w.mapped())
				break;
			auto lock = map.lock_shared();
			const std::byte *host = remember(map, state, la_page, w);
			if (!host)
				break; /* not guest RAM, as read_guest_virtual() */
			std::memcpy(out.data() + got, host + va % 4096, n);
		}
		got += n;
	}
	return got;
}

Walk Vcpu::translate(std::uint64_t gva, Access access) const
{
	return virtkit::translate(state_->vm->guest_memory, read_state(*this, *state_, Want::walk), gva,
				  access);
}

} // namespace virtkit
