// SPDX-License-Identifier: MIT
/*
 * Internal: the state behind Vm and Vcpu handles.
 *
 * VmState is shared (std::shared_ptr) by the Vm handle, every Vcpu and every
 * ExitHandlerRegistration (weakly), so handles can be destroyed in any order;
 * the VM fd closes when the last of them goes.
 */
#pragma once

#include <pthread.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <virtkit/fd.hpp>
#include <virtkit/spp.hpp>
#include <virtkit/vm.hpp>

#include "kmod/kmod_vm.hpp"
#include "core/memory_map.hpp"
#include "core/run_gate.hpp"

namespace virtkit::detail {

struct VcpuState;

/*
 * A feature that acts on a vCPU's own thread between two guest entries
 * (VM introspection raises its events there). Vcpu::run() calls
 * before_entry() when request_vcpu_work() was called for the vCPU since the
 * last call; an Exit it returns ends run() with that exit.
 */
class VcpuWork {
public:
	virtual ~VcpuWork() = default;
	virtual std::optional<Exit> before_entry(Vcpu &vcpu) = 0;
};

struct HandlerEntry {
	std::uint64_t id;
	int priority;
	ExitHandler fn;
};

struct VmState {
	VmState(FileDesc f, std::size_t run_size, std::uint32_t max_slots,
		std::uint32_t ring_bytes)
		: fd(std::move(f)), vcpu_mmap_size(run_size),
		  dirty_ring_bytes(ring_bytes),
		  memory(fd.get(), max_slots, ring_bytes != 0, gate), facade(memory) {}

	FileDesc fd;
	std::size_t vcpu_mmap_size;
	std::uint32_t dirty_ring_bytes;
	RunGate gate;
	MemoryMap memory;
	GuestMemory facade; /* what Vm::memory() and Vcpu::memory() return */

	/*
	 * Exit handlers: copy-on-write list. handlers_mu protects the pointer;
	 * a running vCPU takes a snapshot and calls handlers without the lock.
	 */
	std::mutex handlers_mu;
	std::shared_ptr<const std::vector<HandlerEntry>> handlers =
		std::make_shared<const std::vector<HandlerEntry>>();
	std::uint64_t next_handler_id = 1;

	std::shared_ptr<const std::vector<HandlerEntry>> snapshot_handlers()
	{
		std::lock_guard lock(handlers_mu);
		return handlers;
	}

	/*
	 * virtkit.ko's per-VM file, once attached (attach_kmod(); kmod_mu
	 * guards attaching). Outlives the features that use it.
	 */
	std::mutex kmod_mu;
	std::unique_ptr<KmodVm> kmod;
	/*
	 * The per-VM file through which vCPUs enter the guest
	 * (VIRTKIT_VCPU_RUN), or -1 for KVM_RUN. Read once per entry.
	 */
	std::atomic<int> run_fd{-1};

	/*
	 * Whether KVM lists IA32_PKRS (0x6e1) in KVM_GET_MSR_INDEX_LIST, so
	 * that page walks read it (asked once, when the VM is created).
	 */
	bool pkrs_listed = false;
	/*
	 * The paging features (paging_feature::*) KVM can give a guest
	 * (KVM_GET_SUPPORTED_CPUID, asked when the VM is created): page walks
	 * use those of the vCPU's CPUID that KVM has, as KVM's own walk does
	 * (guest_cpu_cap_has()).
	 */
	std::uint32_t kvm_paging_features = 0;
	/*
	 * With two-dimensional paging (platform::tdp_enabled()) the processor
	 * walks the guest's tables, and 1 GiB pages follow the host processor
	 * (KVM's guest_can_use_gbpages()): whether it has Page1GB. Unset where
	 * KVM shadows the tables (the vCPU's CPUID decides).
	 */
	std::optional<bool> tdp_page1gb;

	/* Sub-page protection, once enabled (spp_mu guards enabling). */
	std::mutex spp_mu;
	std::unique_ptr<SubpageProtection> spp;

	/*
	 * The VM's vCPUs by id, for features that address them by number
	 * (introspection). Weak: a Vcpu handle owns its state.
	 */
	std::mutex vcpus_mu;
	std::map<std::uint32_t, std::weak_ptr<VcpuState>> vcpus;
	std::shared_ptr<VcpuState> find_vcpu(std::uint32_t id);
	/* The live vCPUs, by id. */
	std::vector<std::shared_ptr<VcpuState>> live_vcpus();

	/* The VcpuWork of the VM (one feature at a time), or nullptr. */
	std::mutex work_mu;
	std::shared_ptr<VcpuWork> work;
	std::shared_ptr<VcpuWork> current_work()
	{
		std::lock_guard lock(work_mu);
		return work;
	}
};

/* The VM's attachment to virtkit.ko, attaching it on first use; throws. */
KmodVm &attach_kmod(VmState &vm);

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
	std::condition_variable kick_cv;
	/* request_vcpu_work() was called: run before_entry() before the next entry. */
	std::atomic<bool> work_pending{false};

	/*
	 * What page walks take from the vCPU's CPUID (vcpu_paging.cpp), read
	 * on first use and again after Vcpu::set_cpuid(). paging_mu guards
	 * them.
	 */
	std::mutex paging_mu;
	bool paging_cpuid_known = false;
	std::uint32_t maxphyaddr = 36;
	std::uint32_t paging_features = 0;	/* paging_feature::* */
	std::uint32_t pkru_offset = 0;	/* in the XSAVE area; 0: not known */

	/* The thread whose signal mask KVM_SET_SIGNAL_MASK was derived from. */
	pthread_t mask_thread{};
	bool mask_set = false;
};

/* The paging features (paging_feature::*) a CPUID lists (vcpu_paging.cpp). */
std::uint32_t paging_features(const std::vector<kvm_cpuid_entry2> &cpuid);

/* Make the vCPU leave KVM_RUN without run() reporting it (see RunGate). */
void internal_kick(VcpuState &v);

/* Make the vCPU's thread call the VM's VcpuWork before its next guest entry. */
void request_vcpu_work(VcpuState &v);

/*
 * Keeps one vCPU out of the guest while it exists, so that another thread
 * can read and change its state consistently (KVM serializes vCPU ioctls,
 * but a vCPU that re-entered the guest would run on between two of them).
 * The constructor kicks the vCPU out of KVM_RUN and waits until it is out;
 * a vCPU thread that is elsewhere (an exit handler, not in run() at all) is
 * not disturbed. Holds nest and may be taken on the vCPU's own thread.
 */
class VcpuHold {
public:
	explicit VcpuHold(VcpuState &v);
	~VcpuHold();
	VcpuHold(const VcpuHold &) = delete;
	VcpuHold &operator=(const VcpuHold &) = delete;

private:
	VcpuState &v_;
};

/*
 * KVM_RUN with immediate_exit: KVM completes the exit userspace has just
 * handled (an MMIO access, a user-space MSR access) without entering the
 * guest. A kick that arrived meanwhile stays pending. Returns KVM_RUN's
 * result, errno as KVM_RUN left it. Called on the vCPU's own thread.
 */
int complete_pending_exit(VcpuState &s);

/* One piece of an MMIO access as KVM reports it (at most 8 bytes). */
struct MmioFragment {
	std::uint64_t gpa;
	std::uint32_t len;
	bool is_write;
	std::array<std::byte, 8> data;
};

/*
 * After an MMIO exit: let KVM complete it without running the guest
 * (KVM_RUN with immediate_exit). KVM reports the next piece of the same
 * instruction's access, if there is one, as another MMIO exit: that piece is
 * returned. nullopt once the access is complete. Must be called on the
 * vCPU's thread, from inside run() (an exit handler).
 */
std::optional<MmioFragment> next_mmio_fragment(VcpuState &v);

/* The friend through which library internals reach a Vm's state. */
struct VmAccess {
	static const std::shared_ptr<VmState> &state(Vm &vm);
	/* Another handle on the same VM (for library threads). */
	static Vm handle(std::shared_ptr<VmState> state);
};

/* The friend through which library internals reach a Vcpu's state. */
struct VcpuAccess {
	static VcpuState &state(Vcpu &v);
	/* Another handle on the same vCPU (for library threads). */
	static Vcpu handle(std::shared_ptr<VcpuState> state);
};

} // namespace virtkit::detail
