// SPDX-License-Identifier: MIT
/*
 * Vcpu::paging_state() and Vcpu::translate(gva, access): a vCPU's state as
 * the page-walk engine needs it, from KVM.
 */
#include <virtkit/vcpu.hpp>

#include <cpuid.h>

#include <cstring>
#include <mutex>

#include <virtkit/cpuid.hpp>
#include <virtkit/memory.hpp>
#include <virtkit/system.hpp>

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

PagingState read_state(const Vcpu &vcpu, detail::VcpuState &st, Want want)
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

	const kvm_sregs s = vcpu.sregs();
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

Walk Vcpu::translate(std::uint64_t gva, Access access) const
{
	return virtkit::translate(state_->vm->guest_memory, read_state(*this, *state_, Want::walk), gva,
				  access);
}

} // namespace virtkit
