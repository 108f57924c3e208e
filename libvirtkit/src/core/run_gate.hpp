// SPDX-License-Identifier: MIT
/*
 * Internal: the gate every vCPU of a VM passes to enter KVM_RUN, so that the
 * library can hold all vCPUs outside the guest while it re-cuts memslots.
 *
 * Splitting a memslot (to write-protect one page of it) means deleting it
 * and creating its pieces. In between, the guest-physical range has no
 * memslot: a vCPU that fetched code, walked its page tables or read data
 * there would see an MMIO exit or an emulation failure. Like QEMU's
 * accel_ioctl_inhibit, a Pause kicks every vCPU out of KVM_RUN and keeps it
 * out until the layout is whole again; the vCPU threads re-enter on their
 * own and their callers never see the interruption.
 *
 * Only KVM_RUN calls that may run the guest pass the gate. A vCPU thread that
 * is outside KVM_RUN (in an exit handler, or not running at all) does not
 * hold it, so a Pause may be taken from an exit handler.
 */
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

namespace virtkit::detail {

struct VcpuState;

class RunGate {
public:
	/* vCPU side: around each KVM_RUN. enter() blocks while paused. */
	void enter();
	void leave();

	/* Vcpus register so that a Pause can kick them. */
	void add(VcpuState *v);
	void remove(VcpuState *v);
	/* fn on each registered vCPU, under the gate's lock (they stay alive). */
	void for_each(const std::function<void(VcpuState &)> &fn);

	/* Keeps every vCPU of the VM out of the guest while it exists. */
	class Pause {
	public:
		explicit Pause(RunGate &gate);
		~Pause();
		Pause(const Pause &) = delete;
		Pause &operator=(const Pause &) = delete;

	private:
		RunGate &gate_;
	};

private:
	std::mutex mu_;
	std::condition_variable cv_;
	int in_guest_ = 0;
	int pausers_ = 0;
	std::vector<VcpuState *> vcpus_;
};

} // namespace virtkit::detail
