// SPDX-License-Identifier: MIT
/*
 * Internal: the state behind a Vcpu handle - its fd, its kvm_run mapping,
 * the kick protocol and what page walks cache of its CPUID. Features do not
 * touch it; they drive a vCPU through RunControl (run_control.hpp).
 */
#pragma once

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include <virtkit/fd.hpp>

#include "core/vm_state.hpp"
#include "paging/paging_support.hpp"

namespace virtkit::detail {

struct VcpuState {
	VcpuState() = default;
	VcpuState(const VcpuState &) = delete;
	VcpuState &operator=(const VcpuState &) = delete;
	~VcpuState()
	{
		if (vm && gated)
			vm->gate.remove(this);
	}

	std::shared_ptr<VmState> vm;
	bool gated = false;	/* registered with vm->gate */
	std::uint32_t id;
	FileDesc fd;
	Mapping run;		/* kvm_run, mapped once */
	Mapping ring;		/* dirty ring, when enabled */
	std::uint32_t ring_entries = 0;
	std::uint32_t ring_next = 0;

	/*
	 * Kick protocol. kick_mu protects running_thread/in_run so that a
	 * kicker never signals a thread that has left run() (it may have
	 * exited). A kick sets kvm_run.immediate_exit first: if the vCPU thread
	 * is about to enter KVM_RUN it returns EINTR at once; if it is in the
	 * guest the signal forces an exit. run() clears immediate_exit when
	 * it reports the kick. An internal kick (RunGate::Pause) sets
	 * internal_kick instead of kick_pending: run() re-enters the guest
	 * without reporting it.
	 */
	std::mutex kick_mu;
	pthread_t running_thread{};
	bool in_run = false;
	bool kick_pending = false;
	bool internal_kick = false;
	/*
	 * VcpuHold: while holds > 0 the vCPU does not enter the guest;
	 * kick_cv signals in_run turning false and holds reaching 0.
	 */
	unsigned holds = 0;
	/* Guest entries started by Vcpu::run() (RunControl::entries()); under kick_mu. */
	std::uint64_t entries = 0;
	std::condition_variable kick_cv;
	/* RunControl::request_work(): run before_entry() before the next entry. */
	std::atomic<bool> work_pending{false};
	/*
	 * StallWatch: run the VM's stall check before the next entry; the
	 * entry it last saw the vCPU in (under kick_mu).
	 */
	std::atomic<bool> stall_check_pending{false};
	std::uint64_t stall_seen = 0;

	/*
	 * KVM_CAP_SYNC_REGS, while the VM asks for it (VmState::sync_regs):
	 * every return from KVM_RUN leaves the registers and special
	 * registers in kvm_run.s.regs. regs() and sregs() read them there on
	 * the thread that ran the vCPU until any setter changes the vCPU.
	 */
	std::atomic<bool> regs_synced{false};
	/*
	 * The control word of the last KVM_SET_GUEST_DEBUG that succeeded:
	 * features that complete guest instructions in the library (SPP's
	 * rep-string continuation) do one instruction step at most while the
	 * VMM or an introspection tool single-steps the vCPU.
	 */
	std::atomic<std::uint32_t> guest_debug_control{0};
	std::atomic<pthread_t> synced_thread{};

	/*
	 * What page walks take from the vCPU's CPUID (vcpu_paging.cpp), read
	 * on first use and again after Vcpu::set_cpuid(). paging_mu guards
	 * it.
	 */
	std::mutex paging_mu;
	VcpuPagingCpuid paging;

	/* The thread whose signal mask KVM_SET_SIGNAL_MASK was derived from. */
	pthread_t mask_thread{};
	bool mask_set = false;
};

/* The signal that kicks a vCPU thread out of KVM_RUN (vcpu.cpp). */
int kick_signal();

/* Make the vCPU leave KVM_RUN without run() reporting it (see RunGate). */
void internal_kick(VcpuState &v);
/* The same with v.kick_mu held. */
void internal_kick_locked(VcpuState &v);
/* After a KVM_RUN that returned r (errno err) on this thread: kvm_run.s.regs is fresh. */
void note_synced_regs(VcpuState &v, int r, int err);

} // namespace virtkit::detail
