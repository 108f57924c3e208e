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

#include <climits>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "core/feature_slots.hpp"

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

/*
 * Debug exits the introspection caused after it stopped asking for them.
 * KVM_SET_GUEST_DEBUG happens under a VcpuHold, which waits only until the
 * vCPU is out of KVM_RUN: the exit of that last entry - a #DB of
 * KVM_GUESTDBG_SINGLESTEP, a #BP of KVM_GUESTDBG_USE_SW_BP - may still be
 * on its way to the exit handlers, which see the new setting (or, after a
 * disconnect, no introspection at all). Such an exit is consumed here as
 * the introspection consumes it without an event: a step resumes, a #BP is
 * the guest's. It is recognized by the entry that produced it (the one
 * before the change); from the next entry on KVM makes no such exit.
 *
 * One per VM, in a feature slot: it outlives every connection, so a stray
 * exit still finds it after the server and its exit handler are gone. Its
 * handler runs after the server's (which passes such an exit on).
 */
class StrayDebugExits {
public:
	explicit StrayDebugExits(Vm &vm)
	{
		reg_ = vm.add_exit_handler([this](Vcpu &v, Exit &e) { return on_exit(v, e); },
					   INT_MIN + 2);
	}

	/* The vCPU is held: its controls go from `from` to `to`. */
	void changed(Vcpu &vcpu, std::uint32_t from, std::uint32_t to)
	{
		const std::uint32_t dropped = from & ~to & (KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_USE_SW_BP);
		if (!dropped)
			return;
		const std::uint64_t entry = RunControl::entries(vcpu);
		std::lock_guard lock(mu_);
		auto &s = stale_[vcpu.id()];
		if (s.entry != entry)
			s = Stale{0, entry};
		s.control |= dropped;
		any_.store(true, std::memory_order_release);
	}

private:
	struct Stale {
		std::uint32_t control = 0; /* what the entry had and the setting no longer has */
		std::uint64_t entry = 0;
	};

	ExitAction on_exit(Vcpu &vcpu, Exit &e)
	{
		/* Every exit the VMM sees passes here: no lock while nothing is stale. */
		if (!any_.load(std::memory_order_acquire))
			return ExitAction::pass;
		auto *d = std::get_if<DebugExit>(&e);
		std::uint32_t control;
		{
			std::lock_guard lock(mu_);
			auto it = stale_.find(vcpu.id());
			if (it == stale_.end())
				return ExitAction::pass;
			/*
			 * A debug exit of the old setting may come from the
			 * entry the change caught or from a later KVM_RUN: a
			 * trap KVM had already made pending is delivered on the
			 * next entry, and entries that only returned EINTR (the
			 * hold's or a memslot pause's kick) come in between. It
			 * stays ours until the vCPU ran the guest under the new
			 * setting: any other exit of a later entry ends that.
			 * No one else enables guest debugging meanwhile (the
			 * introspection owns it).
			 */
			if (!d) {
				if (!std::holds_alternative<InterruptedExit>(e) &&
				    RunControl::entries(vcpu) != it->second.entry)
					erase_locked(it);
				return ExitAction::pass;
			}
			control = it->second.control;
			erase_locked(it); /* one exit, then the setting is the vCPU's again */
		}
		if (d->exception == db_vector && (control & KVM_GUESTDBG_SINGLESTEP))
			return ExitAction::resume;
		if (d->exception == bp_vector && (control & KVM_GUESTDBG_USE_SW_BP)) {
			reinject_bp(vcpu);
			return ExitAction::resume;
		}
		return ExitAction::pass;
	}

	void erase_locked(std::map<std::uint32_t, Stale>::iterator it)
	{
		stale_.erase(it);
		any_.store(!stale_.empty(), std::memory_order_release);
	}

	std::mutex mu_;
	std::map<std::uint32_t, Stale> stale_; /* by vCPU id */
	std::atomic<bool> any_{false};		/* !stale_.empty(), read without mu_ */
	ExitHandlerRegistration reg_;
};

StrayDebugExits &stray_debug_exits(Vm &vm)
{
	return RunControl::features(vm).get_or_attach<StrayDebugExits>(
		[&] { return std::make_unique<StrayDebugExits>(vm); });
}

/* The vCPU is held; its KVM_SET_GUEST_DEBUG control goes from `from` to `to`. */
void note_debug_change(Vm &vm, Vcpu &vcpu, std::uint32_t from, std::uint32_t to)
{
	if (!(from & ~to))
		return;
	stray_debug_exits(vm).changed(vcpu, from, to);
}

} // namespace

void attach_stray_debug_exits(Vm &vm)
{
	stray_debug_exits(vm);
}

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
	std::uint32_t control = 0, old;
	{
		std::lock_guard lock(mu_);
		auto &r = record_locked(id);
		if (r.enabled(KVMI_EVENT_BREAKPOINT))
			control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
		if (r.singlestep)
			control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
		if (control == r.debug_control)
			return;
		old = r.debug_control;
	}
	/* Before KVM_SET_GUEST_DEBUG: a pending exit of the old setting finds it. */
	note_debug_change(vm_, vcpu, old, control);
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
	std::vector<std::pair<std::uint16_t, std::uint32_t>> ids;
	{
		std::lock_guard lock(mu_);
		for (auto &[id, r] : vcpus_) {
			r->singlestep = false;
			if (r->debug_control)
				ids.push_back({id, r->debug_control});
		}
	}
	for (auto [id, control] : ids) {
		auto v = RunControl::vcpu(vm_, id);
		if (!v)
			continue;
		try {
			VcpuHold hold(*v);
			note_debug_change(vm_, *v, control, 0);
			v->set_guest_debug(kvm_guest_debug{});
		} catch (const Error &) {
		}
		std::lock_guard lock(mu_);
		record_locked(id).debug_control = 0;
	}
}

} // namespace virtkit::detail
