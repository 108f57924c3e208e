// SPDX-License-Identifier: MIT
/*
 * Internal: how library features drive a VM and its vCPUs - the one door
 * from feature code (spp/, kmod/, kvmi/vmm/) into the core's state.
 *
 * Features hold the public handles (Vm, Vcpu) and see exits through public
 * exit handlers (Vm::add_exit_handler; the library's own register at
 * INT_MIN and just above, ahead of the VMM's). What a public handle cannot
 * do, RunControl does; nothing else of the core's state is theirs to touch:
 *
 *   the VM, from any thread
 *     features(vm)            typed per-VM slots (feature_slots.hpp)
 *     memory_map(vm)          regions and memslots: trap, hide, complete
 *     vcpu(vm, id), vcpus()   handles on the live vCPUs, by id
 *     claim_work(vm, w)       the VM's VcpuWork (one feature at a time)
 *     set_entry(vm, e)        enter the guest through e instead of KVM_RUN
 *   one vCPU, from any thread
 *     request_work(vcpu)      run the VcpuWork on the vCPU's own thread
 *                             before its next entry (kicks it out)
 *     VcpuHold(vcpu)          keep it out of the guest while the hold lives
 *     entries(vcpu)           guest entries so far (which entry an exit is from)
 *     registers_changed(vcpu) its registers changed behind Vcpu's setters
 *   one vCPU, on its own thread, inside an exit handler
 *     complete_pending_exit(vcpu, what)
 *                             let KVM finish the exit being handled without
 *                             entering the guest
 *     next_mmio_fragment(vcpu)
 *                             the same for MMIO, yielding the next piece of
 *                             the access, if any
 *
 * The core's own state (vm_state.hpp, vcpu_state.hpp) stays the core's:
 * RunControl is the only friend of Vm and Vcpu, and features include
 * neither header.
 *
 * Lock order, outer first: a feature's own locks (KVMI's restr_mu_) ->
 * FeatureSlots attaching -> the memory map's lock -> RunGate -> a vCPU's
 * kick lock. The exit-handler list, the vCPU table, the VcpuWork slot and
 * FeatureSlots' table are leaves: held for a copy or a lookup only. Exit
 * handlers run with none of the core's locks held.
 */
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include <virtkit/exit.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>

namespace virtkit::detail {

class FeatureSlots;
class MemoryMap;
class StallWatch;
struct VcpuState;

/*
 * A feature that acts on a vCPU's own thread between two guest entries
 * (VM introspection raises its events there). Vcpu::run() calls
 * before_entry() when request_work() was called for the vCPU since the last
 * call, and before a new vCPU's first entry; an Exit it returns ends run()
 * with that exit.
 */
class VcpuWork {
public:
	virtual ~VcpuWork() = default;
	virtual std::optional<Exit> before_entry(Vcpu &vcpu) = 0;
};

/*
 * A way into the guest other than KVM_RUN (virtkit.ko's VIRTKIT_VCPU_RUN).
 * enter() is called on the vCPU's thread instead of KVM_RUN and behaves
 * like it: the same result, errno and kvm_run contents. The object must
 * live as long as the VM's state (a feature slot does).
 */
class RunEntry {
public:
	virtual int enter(int vcpu_fd) const noexcept = 0;
	/* The request as errors name it ("VIRTKIT_VCPU_RUN"). */
	virtual const char *name() const noexcept = 0;

protected:
	~RunEntry() = default;
};

/* One piece of an MMIO access as KVM reports it (at most 8 bytes). */
struct MmioFragment {
	std::uint64_t gpa;
	std::uint32_t len;
	bool is_write;
	std::array<std::byte, 8> data;
};

class RunControl {
public:
	/* --- the VM, from any thread --- */

	static FeatureSlots &features(Vm &vm) noexcept;
	static MemoryMap &memory_map(Vm &vm) noexcept;
	/* Another handle on the same VM (for library threads). */
	static Vm handle(Vm &vm);
	/* A handle on the live vCPU `id`, or nullopt. */
	static std::optional<Vcpu> vcpu(Vm &vm, std::uint32_t id);
	/* Handles on the live vCPUs, by id. */
	static std::vector<Vcpu> vcpus(Vm &vm);
	/*
	 * Install the VM's VcpuWork; false (nothing changed) when another one
	 * is installed. vCPUs that exist already run it before their next
	 * entry only once request_work() asks them to.
	 */
	static bool claim_work(Vm &vm, std::shared_ptr<VcpuWork> work);
	/* Remove it again, if `work` is the one installed. */
	static void release_work(Vm &vm, const VcpuWork *work) noexcept;
	/* Enter the guest through `entry` (nullptr: KVM_RUN) from the next entry on. */
	static void set_entry(Vm &vm, const RunEntry *entry) noexcept;
	/*
	 * Have KVM return the registers and special registers with every
	 * exit (KVM_CAP_SYNC_REGS, where KVM offers both), so that exit
	 * handlers read them without ioctls (Vcpu::regs(), sregs()). For
	 * features that look at the vCPU on most exits they handle. Not with
	 * a RunEntry in place.
	 */
	static void sync_regs(Vm &vm);
	/*
	 * Install the VM's stall check (stall_watch.hpp): a vCPU that stays
	 * inside one KVM_RUN for a StallWatch::period is kicked out and runs
	 * check->before_entry() on its own thread. One per VM: false (nothing
	 * changed) when another one is installed. The returned registration
	 * removes it; it must not outlive the VM's state (a feature slot).
	 */
	class StallRegistration {
	public:
		StallRegistration() = default;
		StallRegistration(StallWatch &w, const VcpuWork *c) : watch_(&w), check_(c) {}
		StallRegistration(StallRegistration &&o) noexcept
			: watch_(std::exchange(o.watch_, nullptr)), check_(o.check_) {}
		StallRegistration &operator=(StallRegistration &&o) noexcept
		{
			if (this != &o) {
				reset();
				watch_ = std::exchange(o.watch_, nullptr);
				check_ = o.check_;
			}
			return *this;
		}
		~StallRegistration() { reset(); }
		void reset() noexcept;

	private:
		StallWatch *watch_ = nullptr;
		const VcpuWork *check_ = nullptr;
	};
	static std::optional<StallRegistration> watch_stalls(Vm &vm,
							     std::shared_ptr<VcpuWork> check);

	/* --- one vCPU, from any thread --- */

	/* Make the vCPU's thread call the VM's VcpuWork before its next entry. */
	static void request_work(Vcpu &vcpu);
	/*
	 * How many guest entries Vcpu::run() has started. Under a VcpuHold,
	 * the entry whose exit (if any) the vCPU has yet to handle; in an exit
	 * handler, the entry that produced the exit. A feature that changes
	 * how the guest exits compares the two to recognize an exit the old
	 * setting produced.
	 */
	static std::uint64_t entries(Vcpu &vcpu) noexcept;

	/*
	 * The vCPU's registers were changed other than through Vcpu's
	 * setters (a virtkit.ko ioctl that performs a guest WRMSR, which may
	 * change EFER): regs() and sregs() read them from KVM again.
	 */
	static void registers_changed(Vcpu &vcpu) noexcept;

	/* --- one vCPU, on its own thread, inside an exit handler --- */

	/*
	 * KVM_RUN with immediate_exit: KVM completes the exit being handled
	 * (an MMIO access, a user-space MSR access) without entering the
	 * guest. A kick that arrived meanwhile stays pending. Returns false
	 * when KVM_RUN was interrupted (EINTR, EAGAIN) before it completed
	 * the exit; throws Error("KVM_RUN") naming the vCPU and `completing`
	 * ("WRMSR") for any other failure.
	 */
	static bool complete_pending_exit(Vcpu &vcpu, const char *completing);
	/*
	 * After an MMIO exit: complete it without running the guest. KVM
	 * reports the next piece of the same instruction's access, if there
	 * is one, as another MMIO exit: that piece is returned; nullopt once
	 * the access is complete. Throws for a failing KVM_RUN.
	 */
	static std::optional<MmioFragment> next_mmio_fragment(Vcpu &vcpu);
	/* Where gva maps in the vCPU's paging (a software walk, rights unchecked). */
	static std::optional<std::uint64_t> guest_physical(Vcpu &vcpu, std::uint64_t gva);
	/*
	 * Guest-virtual bytes at gva as guest_physical() maps them, as far as
	 * they are guest RAM (how many were read), with sregs the vCPU's
	 * current special registers: through a cache of the pages'
	 * translations, checked against the paging structures on every use
	 * (detail::read_guest_virtual_cached()). For the code around RIP.
	 */
	static std::size_t read_code(Vcpu &vcpu, const kvm_sregs &sregs, std::uint64_t gva,
				     std::span<std::uint8_t> out);
	/*
	 * Whether the VMM or a tool single-steps the vCPU with
	 * KVM_GUESTDBG_SINGLESTEP (the last KVM_SET_GUEST_DEBUG that succeeded).
	 */
	static bool guest_debug_single_steps(Vcpu &vcpu) noexcept;
	/*
	 * The MMIO exit the VMM gets for fragment f of an access the feature
	 * decided: f is put in kvm_run as KVM reports MMIO (so the exit reads
	 * as any other), whether KVM still waits for its completion (the
	 * fragment being handled) or has completed it (next_mmio_fragment()
	 * went past it: KVM then takes no completion from kvm_run).
	 */
	static MmioExit replay_mmio(Vcpu &vcpu, const MmioFragment &f);

private:
	friend class VcpuHold;
	static VcpuState &state(Vcpu &vcpu) noexcept;
};

/*
 * Keeps one vCPU out of the guest while it exists, so that another thread
 * can read and change its state consistently (KVM serializes vCPU ioctls,
 * but a vCPU that re-entered the guest would run on between two of them).
 * The constructor kicks the vCPU out of KVM_RUN and waits until it is out;
 * a vCPU thread that is elsewhere (an exit handler, not in run() at all) is
 * not disturbed. Holds nest and may be taken on the vCPU's own thread. The
 * Vcpu handle must outlive the hold.
 */
class VcpuHold {
public:
	explicit VcpuHold(Vcpu &vcpu);
	~VcpuHold();
	VcpuHold(const VcpuHold &) = delete;
	VcpuHold &operator=(const VcpuHold &) = delete;

private:
	Vcpu &vcpu_;
};

} // namespace virtkit::detail
