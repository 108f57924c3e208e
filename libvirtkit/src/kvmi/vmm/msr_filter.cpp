// SPDX-License-Identifier: MIT
/*
 * MSR events: CONTROL_MSR makes a vCPU control writes of an MSR. The VM's
 * MSR filter (KVM_X86_SET_MSR_FILTER, VM-wide) denies writes of every MSR
 * any vCPU controls, and KVM_CAP_X86_USER_SPACE_MSR(FILTER) turns a denied
 * write into KVM_EXIT_X86_WRMSR instead of a #GP. On that exit the vCPU
 * thread raises the MSR event if this vCPU has MSR events enabled and
 * controls the MSR, and writes the tool's new_val as the guest's WRMSR
 * (perform_guest_wrmsr(): with virtkit.ko KVM's own guest write, else
 * KVM_SET_MSRS after KVM's guest-only rules, so the guest gets #GP where
 * it would without introspection; guest_wrmsr_path() decides once per VM,
 * when the filter is first used); otherwise it writes the guest's value
 * itself, so the filter is invisible to the guest.
 *
 * KVM_CAP_X86_USER_SPACE_MSR cannot be switched back off; after the
 * disconnect the filter allows everything again, so no new filter exit
 * occurs. One that is already out of KVM_RUN when the filter goes may reach
 * the exit handlers after the server's handler is gone: StrayMsrExits
 * completes it.
 */
#include "kvmi/vmm/server.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <map>
#include <mutex>

#include <virtkit/error.hpp>

#include "core/feature_slots.hpp"
#include "core/ioctl.hpp"
#include "kvmi/vmm/guest_wrmsr.hpp"

namespace virtkit::detail {

namespace {

/* The two MSR ranges kvmi lets a tool control (the VMX/SVM bitmaps' ranges). */
constexpr std::uint32_t low_base = 0, high_base = 0xc0000000, range_msrs = 0x2000;
/* x2APIC MSRs: KVM ignores filter ranges for them. */
constexpr std::uint32_t x2apic_first = 0x800, x2apic_last = 0x8ff;

bool controllable(std::uint32_t msr)
{
	return msr - low_base < range_msrs || msr - high_base < range_msrs;
}

void set_filter(int vm_fd, const std::set<std::uint32_t> &deny)
{
	std::vector<std::uint8_t> low(range_msrs / 8, 0xff), high(range_msrs / 8, 0xff);
	bool any_low = false, any_high = false;
	for (auto msr : deny) {
		if (msr - low_base < range_msrs) {
			low[(msr - low_base) / 8] &= ~(1u << (msr - low_base) % 8);
			any_low = true;
		} else {
			high[(msr - high_base) / 8] &= ~(1u << (msr - high_base) % 8);
			any_high = true;
		}
	}
	kvm_msr_filter f{};
	f.flags = KVM_MSR_FILTER_DEFAULT_ALLOW;
	int n = 0;
	if (any_low)
		f.ranges[n++] = {KVM_MSR_FILTER_WRITE, range_msrs, low_base, low.data()};
	if (any_high)
		f.ranges[n++] = {KVM_MSR_FILTER_WRITE, range_msrs, high_base, high.data()};
	VK_IOCTL(vm_fd, KVM_X86_SET_MSR_FILTER, &f,
		 std::to_string(deny.size()) + " write-denied MSRs", vm_fd);
}

/* Perform a guest WRMSR from the VMM, with the guest's semantics (#GP as the guest gets it). */
void complete_write(const GuestWrmsrPath *path, Vcpu &vcpu, MsrExit &m, std::uint64_t value)
{
	if (!perform_guest_wrmsr(path, vcpu, m.index, value))
		m.fail();
}

/*
 * RETRY: the guest executes the WRMSR again. KVM completes a user-space MSR
 * exit on the next KVM_RUN by skipping the instruction; let it do that now
 * (KVM_RUN with immediate_exit completes without entering the guest), then
 * put the registers back.
 */
void retry_instruction(Vcpu &vcpu)
{
	auto regs = vcpu.regs();
	RunControl::complete_pending_exit(vcpu, "WRMSR");
	vcpu.set_regs(regs);
}

/*
 * Filter exits of a filter that is gone. KVM_X86_SET_MSR_FILTER waits until
 * no vCPU can still be checking a WRMSR against the old filter, but an exit
 * it already produced may be on its way to the exit handlers (the vCPU is
 * not held): after a disconnect, the server's handler is no longer there to
 * complete it. It is recognized by its entry: one the vCPU had started by
 * the time the filter was removed. One per VM, in a feature slot, so that
 * it outlives the connection; its handler runs after the server's.
 */
class StrayMsrExits {
public:
	explicit StrayMsrExits(Vm &vm)
	{
		reg_ = vm.add_exit_handler([this](Vcpu &v, Exit &e) { return on_exit(v, e); },
					   INT_MIN + 2);
	}

	/* The filter is gone: exits of the entries up to now are stray. */
	void filter_removed(Vm &vm)
	{
		/* Decided when the filter was first set: attached before this slot. */
		path_ = find_guest_wrmsr_path(vm);
		for (auto &v : RunControl::vcpus(vm)) {
			const std::uint64_t entry = RunControl::entries(v);
			std::lock_guard lock(mu_);
			last_filtered_entry_[v.id()] = entry;
		}
	}

private:
	ExitAction on_exit(Vcpu &vcpu, Exit &e)
	{
		auto *m = std::get_if<MsrExit>(&e);
		if (!m || !m->is_write() || m->reason != KVM_MSR_EXIT_REASON_FILTER)
			return ExitAction::pass;
		{
			std::lock_guard lock(mu_);
			auto it = last_filtered_entry_.find(vcpu.id());
			if (it == last_filtered_entry_.end())
				return ExitAction::pass;
			const bool stray = RunControl::entries(vcpu) <= it->second;
			last_filtered_entry_.erase(it);
			if (!stray)
				return ExitAction::pass;
		}
		complete_write(path_, vcpu, *m, m->value());
		return ExitAction::resume;
	}

	std::mutex mu_;
	std::map<std::uint32_t, std::uint64_t> last_filtered_entry_; /* by vCPU id */
	std::atomic<const GuestWrmsrPath *> path_{nullptr};
	ExitHandlerRegistration reg_;
};

StrayMsrExits &stray_msr_exits(Vm &vm)
{
	return RunControl::features(vm).get_or_attach<StrayMsrExits>(
		[&] { return std::make_unique<StrayMsrExits>(vm); });
}

} // namespace

void attach_stray_msr_exits(Vm &vm)
{
	stray_msr_exits(vm);
}

int IntrospectionServer::control_msr(Vcpu &vcpu, std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_control_msr>(p);
	if (c.enable > 1 || !VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2) ||
	    !controllable(c.msr))
		return -KVMI_EINVAL;
	if (!event_allowed(KVMI_EVENT_MSR) || (c.msr >= x2apic_first && c.msr <= x2apic_last))
		return -KVMI_EPERM;
	if (vm_.check_extension(KVM_CAP_X86_MSR_FILTER) <= 0 ||
	    vm_.check_extension(KVM_CAP_X86_USER_SPACE_MSR) <= 0)
		return -KVMI_EOPNOTSUPP;
	const auto id = static_cast<std::uint16_t>(vcpu.id());
	bool changed;
	{
		std::lock_guard lock(mu_);
		auto &msrs = record_locked(id).msrs;
		changed = c.enable ? msrs.insert(c.msr).second : msrs.erase(c.msr) > 0;
	}
	if (!changed)
		return 0;
	if (int err = update_msr_filter()) {
		std::lock_guard lock(mu_);
		auto &msrs = record_locked(id).msrs;
		if (c.enable)
			msrs.erase(c.msr);
		else
			msrs.insert(c.msr);
		return err;
	}
	return 0;
}

int IntrospectionServer::update_msr_filter()
{
	std::set<std::uint32_t> deny;
	{
		std::lock_guard lock(mu_);
		for (auto &[id, r] : vcpus_)
			deny.insert(r->msrs.begin(), r->msrs.end());
	}
	if (deny == filtered_msrs_)
		return 0;
	try {
		if (!deny.empty() && !msr_filter_used_) {
			/* How CONTINUE will write: before any write can be denied. */
			guest_wrmsr_path(vm_);
			vm_.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, {KVM_MSR_EXIT_REASON_FILTER});
			msr_filter_used_ = true;
		}
		set_filter(vm_.fd(), deny);
	} catch (const Error &e) {
		return e.err() == EINVAL ? -KVMI_EPERM : kvmi_error(e.err());
	}
	filtered_msrs_ = std::move(deny);
	return 0;
}

ExitAction IntrospectionServer::on_msr_exit(Vcpu &vcpu, MsrExit &m)
{
	/* Only our filter denies writes: every FILTER write exit is ours. */
	if (!m.is_write() || m.reason != KVM_MSR_EXIT_REASON_FILTER || !msr_filter_used_)
		return ExitAction::pass;
	const std::uint64_t value = m.value();
	const GuestWrmsrPath *path = find_guest_wrmsr_path(vm_);
	if (vcpu.id() > 0xffff) {
		complete_write(path, vcpu, m, value);
		return ExitAction::resume;
	}
	const auto id = static_cast<std::uint16_t>(vcpu.id());
	bool report;
	{
		std::lock_guard lock(mu_);
		auto &r = record_locked(id);
		report = connected_ && r.enabled(KVMI_EVENT_MSR) && r.msrs.count(m.index);
	}
	if (!report) {
		complete_write(path, vcpu, m, value);
		return ExitAction::resume;
	}
	kvmi_event_msr e{};
	e.msr = m.index;
	e.new_value = value;
	kvm_msr_entry old{};
	old.index = m.index;
	const kvmi_event_arch arch = event_arch(vcpu, std::span(&old, 1));
	e.old_value = old.data;
	auto out = raise(id, &vcpu, KVMI_EVENT_MSR, std::as_bytes(std::span(&e, 1)), std::nullopt,
			 &arch);
	switch (out.action) {
	case KVMI_EVENT_ACTION_RETRY:
		retry_instruction(vcpu);
		break;
	case KVMI_EVENT_ACTION_CRASH:
		break; /* not written; run() returns the crash exit before the next entry */
	default: {
		/* A disconnect while waiting answers CONTINUE with the guest's value. */
		std::uint64_t new_val = value;
		if (out.replied)
			new_val = kvmi::load<kvmi_event_msr_reply>(std::span<const std::byte>(out.reply))
					  .new_val;
		complete_write(path, vcpu, m, new_val);
		break;
	}
	}
	return ExitAction::resume;
}

void IntrospectionServer::remove_msr_filter() noexcept
{
	if (!msr_filter_used_)
		return;
	try {
		auto &stray = stray_msr_exits(vm_);
		set_filter(vm_.fd(), {});
		/* After the filter: every exit it made comes from these entries. */
		stray.filter_removed(vm_);
	} catch (const Error &) {
		/* The VM is dead: nothing runs that could see the filter. */
	} catch (const std::bad_alloc &) {
	}
	filtered_msrs_.clear();
}

} // namespace virtkit::detail
