// SPDX-License-Identifier: MIT
/*
 * Internal: the state behind a Vm handle.
 *
 * VmState is shared (std::shared_ptr) by the Vm handle, every Vcpu and every
 * ExitHandlerRegistration (weakly), so handles can be destroyed in any order;
 * the VM fd closes when the last of them goes. It holds what every VM has;
 * what a library feature adds lives in the feature's own slot (features),
 * which the core does not look into.
 */
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include <virtkit/fd.hpp>
#include <virtkit/memory.hpp>
#include <virtkit/vm.hpp>

#include "core/feature_slots.hpp"
#include "core/memory_map.hpp"
#include "core/run_control.hpp"
#include "core/run_gate.hpp"
#include "core/stall_watch.hpp"
#include "paging/paging_support.hpp"

namespace virtkit::detail {

struct VcpuState;

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
		  memory(fd.get(), max_slots, ring_bytes != 0, gate),
		  guest_memory(memory) {}

	FileDesc fd;
	std::size_t vcpu_mmap_size;
	std::uint32_t dirty_ring_bytes;
	RunGate gate;
	MemoryMap memory;	/* the region table and its memslots */
	GuestMemory guest_memory; /* on it: what Vm::memory(), Vcpu::memory() return */

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
	 * How vCPUs enter the guest when a feature replaced KVM_RUN
	 * (RunControl::set_entry()), else nullptr. Read once per entry.
	 */
	std::atomic<const RunEntry *> entry{nullptr};
	/* RunControl::sync_regs(): KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS at each KVM_RUN. */
	std::atomic<bool> sync_regs{false};

	/* What KVM offers page walks (asked once, when the VM is created). */
	KvmPagingSupport paging;

	/*
	 * The VM's vCPUs by id, for features that address them by number
	 * (introspection). Weak: a Vcpu handle owns its state.
	 */
	std::mutex vcpus_mu;
	std::map<std::uint32_t, std::weak_ptr<VcpuState>> vcpus;
	std::shared_ptr<VcpuState> find_vcpu(std::uint32_t id);
	/* The live vCPUs, by id. */
	std::vector<std::shared_ptr<VcpuState>> live_vcpus();

	/* How many vCPUs KVM_CREATE_VCPU made (the irqchip must come before). */
	std::atomic<std::uint32_t> vcpus_created{0};

	/*
	 * The in-kernel interrupt controllers (vmm-primitives.rst): what was
	 * created and the GSI routing as last set. Under irq_mu, which also
	 * serializes the ioctls that change them.
	 */
	enum class IrqchipKind { none, full, split };
	mutable std::mutex irq_mu;
	IrqchipKind irqchip = IrqchipKind::none;
	bool pit = false;
	std::vector<GsiRoute> gsi_routes;

	/* The VcpuWork of the VM (one feature at a time), or nullptr. */
	std::mutex work_mu;
	std::shared_ptr<VcpuWork> work;
	std::shared_ptr<VcpuWork> current_work()
	{
		std::lock_guard lock(work_mu);
		return work;
	}

	/*
	 * The features' slots. Declared last, so destroyed first: a feature
	 * may still use the memory map, the gate and the handler list while
	 * it is destroyed (feature_slots.hpp).
	 */
	/* Before the features: they unwatch while they are destroyed. */
	StallWatch stalls{gate};

	FeatureSlots features;
};

} // namespace virtkit::detail
