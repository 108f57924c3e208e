// SPDX-License-Identifier: MIT
/*
 * virtkit::Vcpu - one virtual CPU: its fd, its kvm_run mapping (mapped once,
 * owned here, never handed out raw), run loop and register state.
 *
 * Threading: run() and the register accessors are called by one thread at a
 * time (normally the thread that runs the vCPU); kick() may be called from any
 * thread at any time.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <virtkit/kvm.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include <virtkit/exit.hpp>
#include <virtkit/page_walk.hpp>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

#pragma GCC visibility push(hidden)
namespace detail {
struct VmState;
struct VcpuState;
class RunControl;
}
#pragma GCC visibility pop

class GuestMemory;

/* XSAVE area as KVM_GET_XSAVE/KVM_GET_XSAVE2 return it (>= 4096 bytes). */
struct Xsave {
	std::vector<std::uint32_t> region;
};

class Vcpu {
public:
	Vcpu(Vcpu &&) noexcept;
	Vcpu &operator=(Vcpu &&) noexcept;
	Vcpu(const Vcpu &) = delete;
	Vcpu &operator=(const Vcpu &) = delete;
	~Vcpu();

	std::uint32_t id() const noexcept;
	/*
	 * The vCPU's fd, for ioctls this class does not wrap. Change its
	 * registers through the setters below, not with raw ioctls: with
	 * sub-page protection or introspection attached, the library reads
	 * them from kvm_run (KVM_CAP_SYNC_REGS) until a setter says they
	 * changed.
	 */
	int fd() const noexcept;

	/*
	 * Enter the guest until an exit that no exit handler consumes. Returns
	 * InterruptedExit after kick() (then the kick is consumed) or a
	 * signal, and MemoryFaultExit for the KVM_EXIT_MEMORY_FAULT that KVM
	 * reports by failing KVM_RUN with EFAULT. Throws Error for any other
	 * failing KVM_RUN.
	 */
	Exit run();
	/*
	 * Make the vCPU leave the guest and its run() return InterruptedExit
	 * as soon as possible. A kick that arrives while run() is not executing
	 * makes the next run() return at once: kicks are never lost.
	 */
	void kick();

	kvm_regs regs() const;
	void set_regs(const kvm_regs &regs);
	kvm_sregs sregs() const;
	void set_sregs(const kvm_sregs &sregs);
	kvm_fpu fpu() const;
	void set_fpu(const kvm_fpu &fpu);
	Xsave xsave() const;
	void set_xsave(const Xsave &xsave);
	kvm_vcpu_events events() const;
	void set_events(const kvm_vcpu_events &events);
	kvm_debugregs debugregs() const;
	void set_debugregs(const kvm_debugregs &regs);
	void set_guest_debug(const kvm_guest_debug &debug);
	/*
	 * KVM_GET_MP_STATE / KVM_SET_MP_STATE: whether the vCPU runs
	 * (KVM_MP_STATE_RUNNABLE), halts, or waits for INIT and SIPI
	 * (KVM_MP_STATE_UNINITIALIZED: an application processor the guest
	 * starts through its in-kernel LAPIC). Other states than RUNNABLE
	 * need the in-kernel irqchip (KVM: EINVAL).
	 */
	kvm_mp_state mp_state() const;
	void set_mp_state(const kvm_mp_state &state);

	/* One MSR; throws Error with EINVAL if KVM does not handle it. */
	std::uint64_t msr(std::uint32_t index) const;
	void set_msr(std::uint32_t index, std::uint64_t value);
	/*
	 * KVM_GET_MSRS / KVM_SET_MSRS: all or throw, naming the first MSR KVM
	 * refused; a set_msrs() that throws has changed nothing.
	 */
	void get_msrs(std::span<kvm_msr_entry> entries) const;
	void set_msrs(std::span<const kvm_msr_entry> entries);
	/*
	 * The same for callers that expect KVM to refuse some MSRs (probing
	 * what a vCPU has): KVM's refusal is an answer, not an error.
	 * try_msr() is empty and try_set_msr() false when KVM does not handle
	 * the MSR (or refuses the value); try_get_msrs() reads entries in
	 * order up to the first refused one and returns how many it read (the
	 * rest are left as they were). A failing ioctl still throws.
	 */
	std::optional<std::uint64_t> try_msr(std::uint32_t index) const;
	bool try_set_msr(std::uint32_t index, std::uint64_t value);
	std::size_t try_get_msrs(std::span<kvm_msr_entry> entries) const;

	/*
	 * KVM_GET_CPUID2 / KVM_SET_CPUID2. A VMM's CPUID is usually
	 * System::supported_cpuid() with its own changes (virtkit/cpuid.hpp).
	 * Set it before the first run(): KVM refuses a different CPUID
	 * once the vCPU has run (EINVAL).
	 */
	std::vector<kvm_cpuid_entry2> cpuid() const;
	void set_cpuid(std::span<const kvm_cpuid_entry2> entries);

	/* KVM_GET_TSC_KHZ: the guest TSC's frequency (KVM_CAP_GET_TSC_KHZ). */
	std::uint32_t tsc_khz() const;
	/*
	 * KVM_SET_TSC_KHZ. Without KVM_CAP_TSC_CONTROL the guest TSC runs at
	 * the host's rate: setting that rate succeeds, another fails with
	 * ENOTSUP naming both (KVM itself would emulate a faster TSC only by
	 * catching up at exits, and refuse a slower one).
	 */
	void set_tsc_khz(std::uint32_t khz);

	/* KVM_TRANSLATE of a guest-virtual address with the vCPU's paging. */
	kvm_translation translate(std::uint64_t gva) const;
	/*
	 * Walk gva for access with the vCPU's current state, with virtkit's
	 * page-walk engine (virtkit/page_walk.hpp): the gpa, or the exact
	 * fault the access would raise - protection keys, SMEP, SMAP and WP
	 * included, which KVM_TRANSLATE ignores. Reads only the state the walk
	 * depends on (RFLAGS only with CR4.SMAP, PKRU only with CR4.PKE,
	 * IA32_PKRS only with CR4.PKS).
	 * Throws Error: a failing ioctl, or "page walk" with ENOTSUP (legacy
	 * or PAE paging) or EFAULT (paging structures outside guest memory).
	 */
	Walk translate(std::uint64_t gva, Access access) const;
	/*
	 * The vCPU's state that page walks depend on: CR0, CR3, CR4, EFER and
	 * RFLAGS (KVM_GET_SREGS, KVM_GET_REGS); the CPL, which is SS.DPL as
	 * KVM itself takes it (3 in virtual-8086 mode, 0 in real mode); PKRU
	 * from the XSAVE area (KVM_GET_XSAVE), at the offset CPUID leaf 0xd
	 * sub-leaf 9 gives (the vCPU's, else the host processor's; 0 where
	 * KVM has no PKRU or the offset is unknown); IA32_PKRS (KVM_GET_MSRS)
	 * when KVM lists MSR 0x6e1 in KVM_GET_MSR_INDEX_LIST, else 0;
	 * MAXPHYADDR from the vCPU's CPUID leaf 0x80000008 (36 without it, as
	 * KVM) and the paging features (NX, Page1GB, SMEP, SMAP, PKU, LA57,
	 * PKS: PagingState::features) from the vCPU's CPUID, those KVM has, as
	 * KVM's own walk takes them (with NPT/EPT, Page1GB is the host
	 * processor's: platform::tdp_enabled()). The CPUID facts are read once and again after set_cpuid().
	 */
	PagingState paging_state() const;

	/*
	 * Harvest this vCPU's dirty ring (when VmOptions::dirty_ring_bytes was
	 * set): guest-physical addresses of the pages written since the last
	 * harvest. Call Vm::reset_dirty_rings() afterwards.
	 */
	std::vector<std::uint64_t> harvest_dirty_ring();

	/* The guest memory of this vCPU's VM. */
	GuestMemory &memory() noexcept;

private:
	friend class Vm;
	friend class detail::RunControl;
	explicit Vcpu(std::shared_ptr<detail::VcpuState> state);
	std::shared_ptr<detail::VcpuState> state_;
};

} // namespace virtkit

#pragma GCC visibility pop
