// SPDX-License-Identifier: MIT
/*
 * virtkit::Vm - one KVM virtual machine.
 *
 * A Vm owns the VM fd and the guest memory. Vcpus and exit-handler
 * registrations share the VM's state, so they may outlive the Vm handle
 * (as the kernel keeps a VM alive while its vCPU fds are open).
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <virtkit/kvm.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include <virtkit/exit.hpp>
#include <virtkit/fd.hpp>
#include <virtkit/irq.hpp>
#include <virtkit/memory.hpp>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

class Vcpu;
class System;
struct VmOptions;

#pragma GCC visibility push(hidden)
namespace detail {
struct VmState;
class RunControl;
}
#pragma GCC visibility pop

/* What an exit handler did with an exit. */
enum class ExitAction {
	pass,	/* not mine: offer it to the next handler, then the caller */
	resume,	/* consumed: re-enter the guest */
};

/*
 * Exit handlers see every exit of every vCPU of the VM before Vcpu::run()
 * returns it; they run on the vCPU's thread, in priority order (lower first,
 * then registration order). A handler may modify the exit's data views
 * (e.g. complete an MMIO read) before resuming.
 */
using ExitHandler = std::function<ExitAction(Vcpu &, Exit &)>;

/* Keeps an exit handler registered; unregisters on destruction. Move-only. */
class ExitHandlerRegistration {
public:
	ExitHandlerRegistration() noexcept = default;
	ExitHandlerRegistration(ExitHandlerRegistration &&) noexcept;
	ExitHandlerRegistration &operator=(ExitHandlerRegistration &&) noexcept;
	ExitHandlerRegistration(const ExitHandlerRegistration &) = delete;
	ExitHandlerRegistration &operator=(const ExitHandlerRegistration &) = delete;
	~ExitHandlerRegistration();
	/* Unregister now (idempotent). */
	void reset() noexcept;

private:
	friend class Vm;
	ExitHandlerRegistration(std::weak_ptr<detail::VmState> vm, std::uint64_t id)
		: vm_(std::move(vm)), id_(id) {}
	std::weak_ptr<detail::VmState> vm_;
	std::uint64_t id_ = 0;
};

class Vm {
public:
	Vm(Vm &&) noexcept;
	Vm &operator=(Vm &&) noexcept;
	Vm(const Vm &) = delete;
	Vm &operator=(const Vm &) = delete;
	~Vm();

	/* KVM_CHECK_EXTENSION on the VM fd. */
	int check_extension(long cap) const;
	/*
	 * KVM_ENABLE_CAP on the VM fd. (KVM_CAP_SPLIT_IRQCHIP is recorded as
	 * create_split_irqchip() would.)
	 */
	void enable_cap(std::uint32_t cap, std::array<std::uint64_t, 4> args = {},
			std::uint32_t flags = 0);

	/*
	 * Interrupts (Documentation/vmm-primitives.rst). The irqchip must be
	 * created before the first vCPU (EINVAL naming the vCPU count, else
	 * KVM would refuse it or the vCPUs would lack their LAPIC) and only
	 * once (EEXIST).
	 *
	 * KVM_CREATE_IRQCHIP: PIC, IOAPIC and a LAPIC per vCPU, with
	 * default_gsi_routing().
	 */
	void create_irqchip();
	/*
	 * KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP): LAPICs in KVM, PIC and IOAPIC
	 * in the VMM; ioapic_routes (1 up to KVM_CAP_IRQ_ROUTING's value)
	 * GSIs are reserved for the VMM's IOAPIC. The routing starts empty.
	 */
	void create_split_irqchip(std::uint32_t ioapic_routes = 24);
	/* KVM_CREATE_PIT2; needs the full irqchip (ENOENT), once (EEXIST). */
	void create_pit(const PitOptions &options = {});
	/*
	 * KVM_GET_IRQCHIP / KVM_SET_IRQCHIP: one chip's state, for save and
	 * restore (full irqchip only: ENXIO).
	 */
	kvm_irqchip irqchip(Irqchip chip) const;
	void set_irqchip(const kvm_irqchip &state);

	/*
	 * Set the level of a GSI's line (KVM_IRQ_LINE_STATUS; KVM_IRQ_LINE
	 * where KVM lacks KVM_CAP_IRQ_INJECT_STATUS, then the status is
	 * unknown). An edge is a level of 1 then 0. ENXIO without an
	 * irqchip; EINVAL for a GSI the routing table lacks (KVM would
	 * silently ignore it).
	 */
	IrqStatus set_irq_line(std::uint32_t gsi, bool level);
	/*
	 * KVM_SET_GSI_ROUTING: replace the whole table (all or nothing).
	 * Checked first (EINVAL): gsi below KVM_CAP_IRQ_ROUTING's value, pins
	 * in range, at most one pin per chip and GSI, an MSI alone on its GSI,
	 * no PIC/IOAPIC pins with a split irqchip. ENXIO without an irqchip.
	 */
	void set_gsi_routing(std::span<const GsiRoute> routes);
	/* The routing table as last set (empty before the irqchip exists). */
	std::vector<GsiRoute> gsi_routing() const;
	/* KVM_SIGNAL_MSI: inject an MSI without a route. */
	IrqStatus signal_msi(const MsiMessage &msi);

	/*
	 * KVM_IRQFD: every notify() of trigger raises the GSI's route (an
	 * edge). With resample (KVM_CAP_IRQFD_RESAMPLE, full irqchip only) the
	 * GSI is level-triggered: it stays asserted until the guest's EOI,
	 * then KVM de-asserts it and notifies resample. The registration
	 * deassigns on destruction.
	 */
	[[nodiscard]] EventFdRegistration
	add_irqfd(std::uint32_t gsi, const EventFd &trigger, const EventFd *resample = nullptr);
	/*
	 * KVM_IOEVENTFD: a guest write of len bytes (1, 2, 4 or 8; 0 = any
	 * length, MMIO without datamatch only) to addr in space notifies fd
	 * inside KVM: the vCPU does not exit to the VMM. With datamatch only
	 * writes of that value do (it must fit in len bytes); other writes
	 * exit as before. EEXIST if the same binding exists.
	 */
	[[nodiscard]] EventFdRegistration
	add_ioeventfd(std::uint64_t addr, std::uint32_t len, const EventFd &fd,
		      IoSpace space = IoSpace::mmio,
		      std::optional<std::uint64_t> datamatch = std::nullopt);

	/* KVM_GET_CLOCK: the VM's kvmclock, with the flags KVM reported. */
	VmClock clock() const;
	/*
	 * KVM_SET_CLOCK. flags other than those KVM defines (KVM_CLOCK_TSC_STABLE,
	 * KVM_CLOCK_REALTIME, KVM_CLOCK_HOST_TSC) are EINVAL.
	 */
	void set_clock(const VmClock &clock);

	/* KVM_CREATE_VCPU; ids are unique per VM. */
	Vcpu create_vcpu(std::uint32_t id);

	GuestMemory &memory() noexcept;
	const GuestMemory &memory() const noexcept;

	/* Register an exit handler (see ExitHandler). */
	[[nodiscard]] ExitHandlerRegistration
	add_exit_handler(ExitHandler handler, int priority = 0);

	/* Per-vCPU dirty ring size in bytes, 0 if the ring is not enabled. */
	std::uint32_t dirty_ring_bytes() const noexcept;
	/* KVM_RESET_DIRTY_RINGS after harvesting every vCPU's ring. */
	void reset_dirty_rings();

	/* Whether KVM has marked this VM dead (every VM ioctl then fails with EIO). */
	bool is_dead() const;

	int fd() const noexcept;

private:
	friend class System;
	friend class detail::RunControl;
	explicit Vm(std::shared_ptr<detail::VmState> state);
	std::shared_ptr<detail::VmState> state_;
};

} // namespace virtkit

#pragma GCC visibility pop
