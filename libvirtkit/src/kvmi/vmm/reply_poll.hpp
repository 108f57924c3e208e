// SPDX-License-Identifier: MIT
/*
 * Internal: how long a vCPU that raised an event polls for the reply before
 * it sleeps - KVM's halt polling (virt/kvm/kvm_main.c, halt_poll_ns)
 * applied to the tool's reply. A thread that sleeps pays a wake-up when the
 * reply comes, tens of microseconds where idle CPUs sleep in a hypervisor;
 * one that polls pays CPU time instead. The window adapts per vCPU as
 * KVM's does: it grows (from 10 us, doubling, up to the VMM's maximum,
 * IntrospectionOptions::reply_poll) while replies come just after it, and
 * shrinks (halving, to 0 below 10 us) while they come later than the
 * maximum: a tool that answers slowly, or many VMs sharing a saturated
 * tool, cost no polling.
 */
#pragma once

#include <sched.h>

#include <algorithm>
#include <chrono>

namespace virtkit::detail::kvmi {

class ReplyPoll {
public:
	using ns = std::chrono::nanoseconds;
	static constexpr ns start{10'000};

	/* How long to poll before the next wait sleeps. */
	ns window() const noexcept { return window_; }

	/* After a wait that took `waited`, with `max` the VMM's limit. */
	void update(ns waited, ns max) noexcept
	{
		if (window_ > max)
			window_ = max;
		if (waited <= window_)
			return;			/* polling caught it: keep */
		if (waited > max)
			window_ = window_ / 2 < start ? ns{0} : window_ / 2;
		else
			window_ = window_ < start ? std::min(start, max) : std::min(window_ * 2, max);
	}

private:
	ns window_{0};
};

/*
 * Whether polling can pay: with a single CPU to run on, the tool or the
 * reader needs the CPU the poller holds, and the reply cannot come while it
 * polls. Read when the introspection connects.
 */
inline bool polls_on_this_cpu_set() noexcept
{
	cpu_set_t set;
	return sched_getaffinity(0, sizeof(set), &set) != 0 || CPU_COUNT(&set) > 1;
}

} // namespace virtkit::detail::kvmi
