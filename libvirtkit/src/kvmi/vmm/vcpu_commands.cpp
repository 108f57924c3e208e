// SPDX-License-Identifier: MIT
/*
 * Commands about one vCPU, executed on the reader thread while the vCPU is
 * held outside the guest (VcpuHold): its state cannot change under us. When
 * the vCPU waits in an event, GET/SET_REGISTERS work on the event's
 * registers, which the vCPU thread applies when the reply arrives.
 */
#include "kvmi/vmm/server.hpp"

#include <algorithm>
#include <cstring>

#include <virtkit/cpuid.hpp>
#include <virtkit/error.hpp>

#include "core/ioctl.hpp"
#include "kvmi/vmm/mtrr.hpp"

namespace virtkit::detail {

int IntrospectionServer::vcpu_command(std::uint16_t id, Vcpu &vcpu, std::span<const std::byte> p,
				      std::vector<std::byte> &out)
{
	/* PAUSE_VCPU without wait must not wait for the vCPU to leave the guest. */
	if (id == KVMI_PAUSE_VCPU)
		return pause_vcpu(vcpu, p);
	VcpuHold hold(vcpu);
	switch (id) {
	case KVMI_GET_VCPU_INFO: {
		int khz = value_ioctl<KVM_GET_TSC_KHZ>(vcpu.fd(), 0);
		kvmi_get_vcpu_info_reply r{khz > 0 ? std::uint64_t(khz) * 1000 : 0};
		append_bytes(out, r);
		return 0;
	}
	case KVMI_CONTROL_EVENTS:
		return control_events(vcpu, p);
	case KVMI_CONTROL_MSR:
		return control_msr(vcpu, p);
	case KVMI_GET_REGISTERS:
		return get_registers(vcpu, p, out);
	case KVMI_SET_REGISTERS:
		return set_registers(vcpu, p);
	case KVMI_GET_CPUID:
		return get_cpuid(vcpu, p, out);
	case KVMI_GET_XSAVE:
		return get_xsave(vcpu, out);
	case KVMI_VCPU_SET_XSAVE:
		return set_xsave(vcpu, p);
	case KVMI_VCPU_GET_XCR:
		return get_xcr(vcpu, p, out);
	case KVMI_INJECT_EXCEPTION:
		return inject_exception(vcpu, p);
	case KVMI_GET_MTRR_TYPE:
		return get_mtrr_type(vcpu, p, out);
	case KVMI_VCPU_TRANSLATE_GVA:
		return translate_gva(vcpu, p, out);
	case KVMI_VCPU_CONTROL_SINGLESTEP:
		return control_singlestep(vcpu, p);
	default:
		return -KVMI_ENOSYS;
	}
}

/*
 * CONTROL_EVENTS enables the vCPU events: MSR, BREAKPOINT, PF, TRAP,
 * SINGLESTEP (PAUSE_VCPU is always reported - it answers a command - and
 * accepted as a no-op). UNHOOK and CREATE_VCPU are VM events
 * (CONTROL_VM_EVENTS): -KVMI_EINVAL here, like unknown ids.
 */
int IntrospectionServer::control_events(Vcpu &vcpu, std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_control_events>(p);
	if (c.enable > 1 || !VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2))
		return -KVMI_EINVAL;
	if (!kvmi::known_event(c.event_id) || kvmi::vm_event(c.event_id))
		return -KVMI_EINVAL;
	if (!event_allowed(c.event_id))
		return -KVMI_EPERM;
	if (!kvmi::supported_event(c.event_id,
				   c.event_id == KVMI_EVENT_BREAKPOINT && int3_exits()))
		return -KVMI_EOPNOTSUPP;
	const auto id = static_cast<std::uint16_t>(vcpu.id());
	std::uint32_t old;
	{
		std::lock_guard lock(mu_);
		auto &r = record_locked(id);
		old = r.events;
		const std::uint32_t bit = 1u << c.event_id;
		r.events = c.enable ? r.events | bit : r.events & ~bit;
	}
	if (c.event_id == KVMI_EVENT_BREAKPOINT) {
		try {
			apply_guest_debug(vcpu);
		} catch (const Error &e) {
			std::lock_guard lock(mu_);
			record_locked(id).events = old;
			return kvmi_error(e.err());
		}
	}
	return 0;
}

int IntrospectionServer::get_registers(Vcpu &vcpu, std::span<const std::byte> p,
				       std::vector<std::byte> &out)
{
	auto c = kvmi::load<kvmi_get_registers>(p);
	if (!VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2))
		return -KVMI_EINVAL;
	if (c.nmsrs > kvmi::max_get_registers_msrs)
		return -KVMI_E2BIG;
	std::vector<kvm_msr_entry> msrs(c.nmsrs);
	for (std::size_t i = 0; i < msrs.size(); i++)
		msrs[i].index = kvmi::load<std::uint32_t>(p, sizeof(c) + 4 * i);
	/* KVM_GET_MSRS takes fewer than 256 (MAX_IO_MSRS) at a time. */
	constexpr std::size_t kvm_max_msrs = 255;
	for (std::size_t i = 0; i < msrs.size(); i += kvm_max_msrs)
		vcpu.get_msrs(std::span(msrs).subspan(i, std::min(kvm_max_msrs, msrs.size() - i)));

	kvmi_get_registers_reply r{};
	std::optional<kvm_regs> in_event;
	{
		std::lock_guard lock(mu_);
		auto &rec = record_locked(static_cast<std::uint16_t>(vcpu.id()));
		if (rec.waiting && !rec.waiting->done)
			in_event = rec.waiting->regs;
	}
	r.regs = in_event ? *in_event : vcpu.regs();
	r.sregs = vcpu.sregs();
	r.mode = kvmi::cpu_mode(r.sregs);
	r.msrs.nmsrs = c.nmsrs;
	append_bytes(out, r);
	auto b = std::as_bytes(std::span(msrs));
	out.insert(out.end(), b.begin(), b.end());
	return 0;
}

/* Only inside an event (the kvmi documentation's rule): -KVMI_EOPNOTSUPP otherwise. */
int IntrospectionServer::set_registers(Vcpu &vcpu, std::span<const std::byte> p)
{
	auto regs = kvmi::load<kvm_regs>(p);
	std::lock_guard lock(mu_);
	auto &rec = record_locked(static_cast<std::uint16_t>(vcpu.id()));
	if (!rec.waiting || rec.waiting->done)
		return -KVMI_EOPNOTSUPP;
	rec.waiting->regs = regs;
	rec.waiting->regs_set = true;
	return 0;
}

int IntrospectionServer::get_cpuid(Vcpu &vcpu, std::span<const std::byte> p,
				   std::vector<std::byte> &out)
{
	auto c = kvmi::load<kvmi_get_cpuid>(p);
	for (const auto &e : vcpu.cpuid()) {
		if (e.function != c.function)
			continue;
		if ((e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) && e.index != c.index)
			continue;
		kvmi_get_cpuid_reply r{e.eax, e.ebx, e.ecx, e.edx};
		append_bytes(out, r);
		return 0;
	}
	return -KVMI_ENOENT;
}

int IntrospectionServer::get_xsave(Vcpu &vcpu, std::vector<std::byte> &out)
{
	auto x = vcpu.xsave();
	auto b = std::as_bytes(std::span(x.region));
	if (b.size() > kvmi::max_reply_data)
		return -KVMI_E2BIG; /* AMX-sized areas do not fit one message */
	out.assign(b.begin(), b.end());
	return 0;
}

/* The area the tool sends may be shorter than KVM's: the rest is zero (init state). */
int IntrospectionServer::set_xsave(Vcpu &vcpu, std::span<const std::byte> p)
{
	auto x = vcpu.xsave();
	if (p.size() > x.region.size() * 4)
		return -KVMI_EINVAL;
	std::fill(x.region.begin(), x.region.end(), 0);
	std::memcpy(x.region.data(), p.data(), p.size());
	vcpu.set_xsave(x);
	return 0;
}

int IntrospectionServer::get_xcr(Vcpu &vcpu, std::span<const std::byte> p,
				 std::vector<std::byte> &out)
{
	auto c = kvmi::load<kvmi_vcpu_get_xcr>(p);
	if (c.xcr != 0 || !VK_KVMI_ZERO(c.padding))
		return -KVMI_EINVAL; /* XCR0 is the only one */
	kvm_xcrs xcrs{};
	VK_IOCTL(vcpu.fd(), KVM_GET_XCRS, &xcrs, "vcpu " + std::to_string(vcpu.id()), -1);
	for (std::uint32_t i = 0; i < xcrs.nr_xcrs && i < KVM_MAX_XCRS; i++) {
		if (xcrs.xcrs[i].xcr == c.xcr) {
			kvmi_vcpu_get_xcr_reply r{xcrs.xcrs[i].value};
			append_bytes(out, r);
			return 0;
		}
	}
	return -KVMI_EINVAL;
}

/* Kept for the vCPU thread, which injects before its next entry (events.cpp). */
int IntrospectionServer::inject_exception(Vcpu &vcpu, std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_inject_exception>(p);
	if (!kvmi::injectable_vector(c.nr) || !VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2))
		return -KVMI_EINVAL;
	{
		std::lock_guard lock(mu_);
		auto &r = record_locked(static_cast<std::uint16_t>(vcpu.id()));
		if (r.inject)
			return -KVMI_EBUSY;
		r.inject = c;
	}
	RunControl::request_work(vcpu);
	return 0;
}

int IntrospectionServer::get_mtrr_type(Vcpu &vcpu, std::span<const std::byte> p,
				       std::vector<std::byte> &out)
{
	auto c = kvmi::load<kvmi_get_mtrr_type>(p);
	/* An MSR KVM refuses reads as 0: no MTRRs means disabled. */
	auto read = [&](std::uint32_t index) { return vcpu.try_msr(index).value_or(0); };
	kvmi::MtrrState m;
	const auto cpuid = vcpu.cpuid();
	auto *leaf1 = cpuid_find(cpuid, 1, 0);
	m.cpuid_mtrr = leaf1 && leaf1->edx >> 12 & 1;
	m.def_type = read(kvmi::msr_mtrr_def_type);
	if (m.def_type & (1u << 11)) {
		m.cap = read(kvmi::msr_mtrr_cap);
		for (std::size_t i = 0; i < m.fixed.size(); i++)
			m.fixed[i] = read(kvmi::msr_mtrr_fixed[i]);
		const std::size_t vcnt = std::min<std::size_t>(m.cap & 0xff, m.var.size());
		for (std::size_t i = 0; i < vcnt; i++) {
			m.var[i].base = read(kvmi::msr_mtrr_phys_base0 + 2 * i);
			m.var[i].mask = read(kvmi::msr_mtrr_phys_base0 + 2 * i + 1);
		}
	}
	kvmi_get_mtrr_type_reply r{};
	r.type = kvmi::mtrr_type(m, c.gpa);
	append_bytes(out, r);
	return 0;
}

/*
 * The one place guest-virtual addresses are translated: virtkit's page walk
 * with the vCPU's current state, asking where the gva maps rather than
 * whether some access would succeed - a walk that reaches a leaf answers its
 * gpa even when the read itself would fault (SMAP, a protection key, a
 * supervisor page at CPL 3). A gva that does not map answers gpa ~0, as the
 * kvmi implementation did (INVALID_GPA), not an error; so do walks the
 * engine cannot make (legacy or PAE paging, page tables outside guest
 * memory).
 */
std::uint64_t gva_to_gpa(Vcpu &vcpu, std::uint64_t gva)
{
	try {
		Walk w = vcpu.translate(gva, Access::read);
		return w.mapped() ? w.gpa : ~0ull;
	} catch (const Error &e) {
		if (e.operation() != "page walk")
			throw;
		return ~0ull;
	}
}

int IntrospectionServer::translate_gva(Vcpu &vcpu, std::span<const std::byte> p,
				       std::vector<std::byte> &out)
{
	auto c = kvmi::load<kvmi_vcpu_translate_gva>(p);
	kvmi_vcpu_translate_gva_reply r{gva_to_gpa(vcpu, c.gva)};
	append_bytes(out, r);
	return 0;
}

} // namespace virtkit::detail
