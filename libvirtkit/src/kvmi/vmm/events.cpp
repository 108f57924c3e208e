// SPDX-License-Identifier: MIT
/*
 * Events: raised on the vCPU's own thread, which then waits for the tool's
 * reply (or the disconnect, which counts as CONTINUE). The reader thread
 * completes replies after checking them whole; a reply that does not fit
 * the event it answers closes the connection.
 *
 * Also the VcpuWork of the VM: before a vCPU enters the guest it reports
 * what is due - a CRASH reply's exit, UNHOOK, CREATE_VCPU, PAUSE_VCPU
 * events, an injected exception and its TRAP - one at a time, re-checking
 * after each event (the tool may queue more while the vCPU waits).
 */
#include "kvmi/vmm/server.hpp"

#include <sched.h>

#include <algorithm>
#include <cstring>

#include <virtkit/error.hpp>

namespace virtkit::detail {

namespace {

/* The MSRs every event carries, in kvmi_event_arch.msrs order. */
constexpr std::uint32_t event_msrs[] = {
	0x174,		/* SYSENTER_CS */
	0x175,		/* SYSENTER_ESP */
	0x176,		/* SYSENTER_EIP */
	0xc0000080,	/* EFER */
	0xc0000081,	/* STAR */
	0xc0000082,	/* LSTAR */
	0xc0000083,	/* CSTAR */
	0x277,		/* PAT */
	0xc0000102,	/* KERNEL_GS_BASE (shadow_gs) */
};
static_assert(sizeof(kvmi_event_arch::msrs) == sizeof(event_msrs) * 2);

/* PAUSE_VCPU events one vCPU may have queued (a flood gets -KVMI_EBUSY). */
constexpr unsigned max_queued_pauses = 64;

} // namespace

kvmi_event_arch IntrospectionServer::event_arch(Vcpu &vcpu, std::span<kvm_msr_entry> extra)
{
	kvmi_event_arch arch{};
	arch.regs = vcpu.regs();
	arch.sregs = vcpu.sregs();
	arch.mode = kvmi::cpu_mode(arch.sregs);
	/* The event's MSRs and the caller's in one KVM_GET_MSRS. */
	constexpr std::size_t own = std::size(event_msrs), most = own + 4;
	kvm_msr_entry e[most]{};
	const std::size_t n = own + std::min(extra.size(), most - own);
	for (std::size_t i = 0; i < own; i++)
		e[i].index = event_msrs[i];
	for (std::size_t i = own; i < n; i++)
		e[i].index = extra[i - own].index;
	/* One the vCPU lacks (no SYSCALL, say) reads as 0; the rest as they are. */
	for (std::size_t i = vcpu.try_get_msrs(std::span(e, n)); i < n; i++)
		e[i].data = vcpu.try_msr(e[i].index).value_or(0);
	__u64 vals[own];
	for (std::size_t i = 0; i < own; i++)
		vals[i] = e[i].data;
	std::memcpy(&arch.msrs, vals, sizeof(arch.msrs));
	for (std::size_t i = own; i < n; i++)
		extra[i - own].data = e[i].data;
	return arch;
}

IntrospectionServer::Outcome IntrospectionServer::raise(std::uint16_t id, Vcpu *vcpu,
							std::uint8_t event,
							std::span<const std::byte> data,
							std::optional<kvmi::Clock::time_point> deadline,
							const kvmi_event_arch *arch)
{
	Outcome out;
	kvmi_event ev{};
	ev.size = sizeof(ev);
	ev.vcpu = id;
	ev.event = event;
	if (arch)
		ev.arch = *arch;
	else if (vcpu)
		ev.arch = event_arch(*vcpu);

	KvmiWaiter w;
	w.vcpu = id;
	w.event = event;
	w.regs = ev.arch.regs;
	std::chrono::nanoseconds window;
	std::uint64_t settled;
	{
		std::lock_guard lock(mu_);
		if (!connected_)
			return out;
		w.seq = next_seq_++;
		waiters_[w.seq] = &w;
		auto &r = record_locked(id);
		r.waiting = &w;
		window = r.reply_poll.window();
		settled = settled_.load(std::memory_order_acquire);
	}
	kvmi_msg_hdr hdr{KVMI_EVENT, static_cast<std::uint16_t>(sizeof(ev) + data.size()), w.seq};
	n_events_++;
	const auto sent = kvmi::Clock::now();
	if (!conn_->send(hdr, {std::as_bytes(std::span(&ev, 1)), data}))
		request_stop();
	auto poll_end = sent + window;
	if (deadline)
		poll_end = std::min(poll_end, *deadline);
	poll_for_reply(w, settled, poll_end);

	bool crash, set_regs;
	{
		std::unique_lock lock(mu_);
		auto ready = [&] { return w.done || !connected_; };
		if (deadline)
			cv_.wait_until(lock, *deadline, ready);
		else
			cv_.wait(lock, ready);
		waiters_.erase(w.seq);
		auto &r = record_locked(id);
		if (r.waiting == &w)
			r.waiting = nullptr;
		if (w.done) {
			r.reply_poll.update(kvmi::Clock::now() - sent, reply_poll_);
			out.replied = true;
			out.action = w.action;
			out.reply = w.reply;
		}
		crash = out.action == KVMI_EVENT_ACTION_CRASH;
		if (crash)
			r.crash = true;
		/* Registers the tool set in an event it answered (not one it abandoned). */
		set_regs = w.done && w.regs_set;
	}
	if (vcpu && set_regs)
		vcpu->set_regs(w.regs);
	if (vcpu && crash)
		RunControl::request_work(*vcpu);
	return out;
}

/*
 * Until poll_end, look for the reply without sleeping (reply_poll.hpp).
 * When the read role is free, take it and run what the socket has
 * (drain_locked(), never waiting): the reply then completes on this thread,
 * with no wake-up of the reader; commands that came first run here, in
 * order, as the reader would run them. Otherwise watch settled_, which
 * moves with every completed reply and the disconnect, and take mu_ only
 * when it moved. Each turn yields the CPU to any other thread ready to run
 * on it (the tool, the reader) - what KVM's halt polling gets from
 * single_task_running() - so polling never delays the reply it waits for.
 */
void IntrospectionServer::poll_for_reply(const KvmiWaiter &w, std::uint64_t settled,
					 kvmi::Clock::time_point poll_end)
{
	if (kvmi::Clock::now() >= poll_end)
		return;
	/* While we poll, the reader leaves the socket to us (reader_main()). */
	{
		std::lock_guard lock(mu_);
		pollers_++;
	}
	struct Done {
		IntrospectionServer &s;
		~Done()
		{
			{
				std::lock_guard lock(s.mu_);
				if (--s.pollers_)
					return;
			}
			s.cv_.notify_all();
		}
	} done{*this};
	while (kvmi::Clock::now() < poll_end) {
		if (read_mu_.try_lock()) {
			std::lock_guard role(read_mu_, std::adopt_lock);
			/*
			 * The end of the stream, or a broken message: the reader's to
			 * act on (teardown). Stop polling so that it reads again, and
			 * wake it for a broken message.
			 */
			if (!drain_locked(false)) {
				if (read_error_)
					request_stop();
				return;
			}
		}
		if (const auto now = settled_.load(std::memory_order_acquire); now != settled) {
			settled = now;
			std::lock_guard lock(mu_);
			if (w.done || !connected_)
				return;
		}
		for (int i = 0; i < 32; i++)
			__builtin_ia32_pause();
		sched_yield();
	}
}

bool IntrospectionServer::complete_event(const kvmi_msg_hdr &hdr, std::span<const std::byte> p)
{
	std::unique_lock lock(mu_);
	auto it = waiters_.find(hdr.seq);
	if (it == waiters_.end() || it->second->done)
		return false;
	KvmiWaiter &w = *it->second;
	const std::size_t head = sizeof(kvmi_vcpu_hdr) + sizeof(kvmi_event_reply);
	const std::size_t specific = kvmi::event_reply_size(w.event);
	/*
	 * As the kernel: the event-specific part may be shorter (zero-filled;
	 * libkvmi's kvmi_reply_event() sends the size its caller passes) but
	 * not longer, and .event is not checked - seq names the event.
	 */
	if (p.size() < head || p.size() > head + specific)
		return false;
	auto vh = kvmi::load<kvmi_vcpu_hdr>(p);
	auto er = kvmi::load<kvmi_event_reply>(p, sizeof(vh));
	if (vh.vcpu != w.vcpu || !VK_KVMI_ZERO(vh.padding1) || !VK_KVMI_ZERO(vh.padding2))
		return false;
	if (er.action > KVMI_EVENT_ACTION_CRASH || !VK_KVMI_ZERO(er.padding1) ||
	    !VK_KVMI_ZERO(er.padding2))
		return false;
	std::array<std::byte, sizeof(w.reply)> data{};
	std::copy(p.begin() + head, p.end(), data.begin());
	if (w.event == KVMI_EVENT_PF) {
		/* Context and single-step hints mean nothing here: valid, ignored. */
		auto pf = kvmi::load<kvmi_event_pf_reply>(std::span<const std::byte>(data));
		if (pf.ctx_size > sizeof(pf.ctx_data) || pf.singlestep > 1 || pf.rep_complete > 1 ||
		    !VK_KVMI_ZERO(pf.padding))
			return false;
	}
	w.reply = data;
	w.action = er.action;
	w.done = true;
	settled_.fetch_add(1, std::memory_order_release);
	/* Not under mu_: the woken vCPU would only block on it again. */
	lock.unlock();
	cv_.notify_all();
	return true;
}

bool IntrospectionServer::wants(std::uint16_t vcpu, std::uint16_t event)
{
	std::lock_guard lock(mu_);
	return connected_ && record_locked(vcpu).enabled(event);
}

int IntrospectionServer::pause_vcpu(Vcpu &vcpu, std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_pause_vcpu>(p);
	if (c.wait > 1 || !VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2) ||
	    !VK_KVMI_ZERO(c.padding3))
		return -KVMI_EINVAL;
	if (!event_allowed(KVMI_EVENT_PAUSE_VCPU))
		return -KVMI_EPERM;
	{
		std::lock_guard lock(mu_);
		auto &r = record_locked(static_cast<std::uint16_t>(vcpu.id()));
		if (r.pauses >= max_queued_pauses)
			return -KVMI_EBUSY;
		r.pauses++;
	}
	RunControl::request_work(vcpu);
	/* wait: answer once the vCPU is out of the guest (the hold kicks it out). */
	if (c.wait)
		VcpuHold hold(vcpu);
	return 0;
}

/*
 * The exception goes in as KVM's "injected" event of the next entry (the
 * way KVM re-delivers an event an exit interrupted); #PF gets its CR2 here
 * since without KVM_CAP_EXCEPTION_PAYLOAD KVM does not set it. If the
 * guest already has an exception in flight, that one is delivered and ours
 * dropped: TRAP reports what the guest really gets.
 */
kvmi_event_trap IntrospectionServer::apply_injection(Vcpu &vcpu, const kvmi_inject_exception &e)
{
	constexpr std::uint8_t pf = 14;
	kvmi_event_trap t{};
	auto ev = vcpu.events();
	if (ev.exception.injected) {
		t.vector = ev.exception.nr;
		t.error_code = ev.exception.has_error_code ? ev.exception.error_code : 0;
		t.cr2 = ev.exception.nr == pf ? vcpu.sregs().cr2 : 0;
		return t;
	}
	if (e.nr == pf) {
		auto s = vcpu.sregs();
		s.cr2 = e.address;
		vcpu.set_sregs(s);
	}
	const bool has_ec = kvmi::vector_has_error_code(e.nr);
	ev.exception.injected = 1;
	ev.exception.nr = e.nr;
	ev.exception.has_error_code = has_ec;
	ev.exception.error_code = has_ec ? e.error_code : 0;
	vcpu.set_events(ev);
	t.vector = e.nr;
	t.error_code = ev.exception.error_code;
	t.cr2 = e.nr == pf ? e.address : 0;
	return t;
}

std::optional<Exit> IntrospectionServer::before_entry(Vcpu &vcpu)
{
	if (vcpu.id() > 0xffff)
		return std::nullopt; /* KVMI addresses vCPUs with 16 bits */
	const auto id = static_cast<std::uint16_t>(vcpu.id());
	for (;;) {
		enum class Due { nothing, crash, unhook, create, pause, inject } due = Due::nothing;
		kvmi_inject_exception inject{};
		{
			std::lock_guard lock(mu_);
			auto &r = record_locked(id);
			if (r.crash) {
				r.crash = false;
				due = Due::crash;
			} else if (!connected_) {
				due = Due::nothing;
			} else if (unhook_ == Unhook::requested && unhook_vcpu_ == id) {
				unhook_ = Unhook::claimed;
				due = Due::unhook;
			} else if (r.create_pending) {
				r.create_pending = false;
				r.create_sent = true;
				due = Due::create;
			} else if (r.pauses) {
				r.pauses--;
				due = Due::pause;
			} else if (r.inject) {
				inject = *r.inject;
				r.inject.reset();
				due = Due::inject;
			}
		}
		switch (due) {
		case Due::nothing:
			return std::nullopt;
		case Due::crash:
			return SystemEventExit{KVM_SYSTEM_EVENT_CRASH, {}};
		case Due::unhook:
			raise(id, &vcpu, KVMI_EVENT_UNHOOK, {});
			break;
		case Due::create:
			raise(id, &vcpu, KVMI_EVENT_CREATE_VCPU, {});
			break;
		case Due::pause:
			raise(id, &vcpu, KVMI_EVENT_PAUSE_VCPU, {});
			break;
		case Due::inject: {
			auto trap = apply_injection(vcpu, inject);
			if (wants(id, KVMI_EVENT_TRAP))
				raise(id, &vcpu, KVMI_EVENT_TRAP, std::as_bytes(std::span(&trap, 1)));
			break;
		}
		}
	}
}

/*
 * UNHOOK: the vCPU's own thread raises it when it runs; a VMM that stopped
 * running its vCPUs (shutting down) still gets the event out, from this
 * thread with the vCPU held outside the guest.
 */
bool IntrospectionServer::unhook(std::chrono::milliseconds timeout)
{
	const auto deadline = kvmi::Clock::now() + timeout;
	bool enabled;
	{
		std::lock_guard lock(mu_);
		enabled = connected_ && (vm_events_ >> KVMI_EVENT_UNHOOK & 1);
	}
	if (enabled) {
		std::optional<Vcpu> target;
		for (auto &v : RunControl::vcpus(vm_))
			if (v.id() <= 0xffff && (!target || v.id() < target->id()))
				target = std::move(v);
		const std::uint16_t id = target ? static_cast<std::uint16_t>(target->id()) : 0;
		{
			std::lock_guard lock(mu_);
			unhook_ = Unhook::requested;
			unhook_vcpu_ = id;
		}
		if (target) {
			RunControl::request_work(*target);
			std::unique_lock lock(mu_);
			cv_.wait_until(lock, std::min(deadline, kvmi::Clock::now() + std::chrono::milliseconds(100)),
				       [&] { return unhook_ != Unhook::requested || !connected_; });
		}
		bool ours = false;
		{
			std::lock_guard lock(mu_);
			if (unhook_ == Unhook::requested && connected_) {
				unhook_ = Unhook::claimed;
				ours = true;
			}
		}
		if (ours) {
			try {
				if (target) {
					VcpuHold hold(*target);
					raise(id, &*target, KVMI_EVENT_UNHOOK, {}, deadline);
				} else {
					raise(0, nullptr, KVMI_EVENT_UNHOOK, {}, deadline);
				}
			} catch (const Error &) {
				/* The vCPU's state is unreadable: disconnect anyway. */
			}
		}
		std::unique_lock lock(mu_);
		cv_.wait_until(lock, deadline, [&] { return !connected_; });
	}
	disconnect();
	std::lock_guard lock(mu_);
	return closed_by_tool_;
}

} // namespace virtkit::detail
