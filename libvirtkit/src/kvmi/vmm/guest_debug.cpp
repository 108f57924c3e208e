// SPDX-License-Identifier: MIT
/*
 * BREAKPOINT and SINGLESTEP through KVM's guest debugging: while a vCPU has
 * BREAKPOINT enabled, KVM_GUESTDBG_USE_SW_BP makes an INT3 exit with
 * KVM_EXIT_DEBUG (#BP) instead of reaching the guest; CONTROL_SINGLESTEP
 * sets KVM_GUESTDBG_SINGLESTEP and every instruction exits with #DB.
 *
 * Not every host intercepts INT3 although it accepts USE_SW_BP (a
 * PVM-based host ends in KVM_EXIT_INTERNAL_ERROR, QEMU's nested SVM lets
 * the guest take #BP itself): a platform probe (platform::guest_debug_int3())
 * finds out once per process, and where it fails BREAKPOINT is not supported.
 */
#include "kvmi/vmm/server.hpp"

#include <condition_variable>
#include <mutex>
#include <thread>

#include <virtkit/error.hpp>
#include <virtkit/memory.hpp>
#include <virtkit/platform.hpp>
#include <virtkit/system.hpp>

namespace virtkit::detail {

namespace {

constexpr std::uint32_t bp_vector = 3, db_vector = 1;

/* CONTINUE: the guest takes the #BP it would have taken without us. */
void reinject_bp(Vcpu &vcpu)
{
	auto ev = vcpu.events();
	ev.exception.injected = 1;
	ev.exception.nr = bp_vector;
	ev.exception.has_error_code = 0;
	ev.exception.error_code = 0;
	vcpu.set_events(ev);
}

} // namespace

bool IntrospectionServer::int3_exits()
{
	try {
		return static_cast<bool>(platform::guest_debug_int3(System::open()));
	} catch (const Error &) {
		return false;
	}
}

int IntrospectionServer::control_singlestep(Vcpu &vcpu, std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_vcpu_control_singlestep>(p);
	if (c.enable > 1 || !VK_KVMI_ZERO(c.padding))
		return -KVMI_EINVAL;
	if (!event_allowed(KVMI_EVENT_SINGLESTEP))
		return -KVMI_EPERM;
	if (vm_.check_extension(KVM_CAP_SET_GUEST_DEBUG) <= 0)
		return -KVMI_EOPNOTSUPP;
	const auto id = static_cast<std::uint16_t>(vcpu.id());
	bool old;
	{
		std::lock_guard lock(mu_);
		auto &r = record_locked(id);
		old = r.singlestep;
		r.singlestep = c.enable;
	}
	try {
		apply_guest_debug(vcpu);
	} catch (const Error &e) {
		std::lock_guard lock(mu_);
		record_locked(id).singlestep = old;
		return kvmi_error(e.err());
	}
	return 0;
}

void IntrospectionServer::apply_guest_debug(Vcpu &vcpu)
{
	const auto id = static_cast<std::uint16_t>(vcpu.id());
	std::uint32_t control = 0;
	{
		std::lock_guard lock(mu_);
		auto &r = record_locked(id);
		if (r.enabled(KVMI_EVENT_BREAKPOINT))
			control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
		if (r.singlestep)
			control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
		if (control == r.debug_control)
			return;
	}
	kvm_guest_debug d{};
	d.control = control;
	vcpu.set_guest_debug(d);
	std::lock_guard lock(mu_);
	record_locked(id).debug_control = control;
}

ExitAction IntrospectionServer::on_debug_exit(Vcpu &vcpu, DebugExit &d)
{
	if (vcpu.id() > 0xffff)
		return ExitAction::pass;
	const auto id = static_cast<std::uint16_t>(vcpu.id());
	std::uint32_t control;
	bool bp_event, step_event;
	{
		std::lock_guard lock(mu_);
		auto &r = record_locked(id);
		control = r.debug_control;
		bp_event = connected_ && r.enabled(KVMI_EVENT_BREAKPOINT);
		step_event = connected_ && r.singlestep && r.enabled(KVMI_EVENT_SINGLESTEP);
	}
	if (d.exception == bp_vector) {
		if (!(control & KVM_GUESTDBG_USE_SW_BP))
			return ExitAction::pass;
		if (!bp_event) {
			reinject_bp(vcpu);
			return ExitAction::resume;
		}
		kvmi_event_breakpoint b{};
		b.gpa = gva_to_gpa(vcpu, d.pc); /* pc: the INT3's linear address */
		b.insn_len = 1;
		auto out = raise(id, &vcpu, KVMI_EVENT_BREAKPOINT, std::as_bytes(std::span(&b, 1)));
		/* RETRY: re-enter at the INT3 (the tool removed it, or wants it again). */
		if (out.action == KVMI_EVENT_ACTION_CONTINUE)
			reinject_bp(vcpu);
		return ExitAction::resume;
	}
	if (d.exception == db_vector) {
		if (!(control & KVM_GUESTDBG_SINGLESTEP))
			return ExitAction::pass;
		if (step_event) {
			kvmi_event_singlestep s{};
			raise(id, &vcpu, KVMI_EVENT_SINGLESTEP, std::as_bytes(std::span(&s, 1)));
		}
		return ExitAction::resume;
	}
	return ExitAction::pass;
}

void IntrospectionServer::remove_guest_debug() noexcept
{
	std::vector<std::uint16_t> ids;
	{
		std::lock_guard lock(mu_);
		for (auto &[id, r] : vcpus_) {
			r->singlestep = false;
			if (r->debug_control)
				ids.push_back(id);
		}
	}
	for (auto id : ids) {
		auto v = RunControl::vcpu(vm_, id);
		if (!v)
			continue;
		try {
			VcpuHold hold(*v);
			v->set_guest_debug(kvm_guest_debug{});
		} catch (const Error &) {
		}
		std::lock_guard lock(mu_);
		record_locked(id).debug_control = 0;
	}
}

} // namespace virtkit::detail
