// SPDX-License-Identifier: MIT
/*
 * Interrupt plumbing of a VM (used through virtkit::Vm): the in-kernel
 * irqchip's pins, GSI routes, the status KVM reports for an injected
 * interrupt, and the registrations that bind an EventFd to a GSI (irqfd) or
 * to a guest I/O address (ioeventfd). Documentation/vmm-primitives.rst.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <virtkit/kvm.h>

#include <cstdint>
#include <memory>
#include <variant>
#include <vector>

#include <virtkit/fd.hpp>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

#pragma GCC visibility push(hidden)
namespace detail {
struct VmState;
}
#pragma GCC visibility pop

/* The chips of KVM_CREATE_IRQCHIP (KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC). */
enum class Irqchip : std::uint32_t {
	pic_master = KVM_IRQCHIP_PIC_MASTER,	/* pins 0-7 */
	pic_slave = KVM_IRQCHIP_PIC_SLAVE,	/* pins 0-7 */
	ioapic = KVM_IRQCHIP_IOAPIC,		/* pins 0-23 */
};

/* A pin of the in-kernel PIC or IOAPIC. */
struct IrqchipPin {
	Irqchip chip;
	std::uint32_t pin;
};

/*
 * An MSI as the guest would write it: address 0xfeeXXXXX (destination APIC
 * ID in bits 19:12; the high half is used with x2APIC IDs > 255), data with
 * the vector in bits 7:0.
 */
struct MsiMessage {
	std::uint64_t address;
	std::uint32_t data;
};

/* One GSI route; a GSI may have one pin per chip, or one MSI. */
struct GsiRoute {
	std::uint32_t gsi;
	std::variant<IrqchipPin, MsiMessage> target;
};

/*
 * The routing KVM_CREATE_IRQCHIP installs: GSI n to IOAPIC pin n (0-23) and,
 * for n < 16, also to PIC pin n % 8 (master for n < 8, else slave).
 */
std::vector<GsiRoute> default_gsi_routing();

/* What KVM did with an interrupt (KVM_IRQ_LINE_STATUS, KVM_SIGNAL_MSI). */
struct IrqStatus {
	enum class Kind {
		unknown,	/* KVM has no KVM_CAP_IRQ_INJECT_STATUS: it does not say */
		ignored,	/* masked, or no chip took it */
		coalesced,	/* merged with one still pending (or blocked by KVM) */
		delivered,	/* to `targets` destinations */
	};
	Kind kind = Kind::unknown;
	int targets = 0;

	bool delivered() const noexcept { return kind == Kind::delivered; }
	bool coalesced() const noexcept { return kind == Kind::coalesced; }
};

/* KVM_CREATE_PIT2 options. */
struct PitOptions {
	/* KVM_PIT_SPEAKER_DUMMY: KVM answers port 0x61 itself. */
	bool speaker_dummy = false;
};

/* The address space of an ioeventfd. */
enum class IoSpace { pio, mmio };

/*
 * Keeps an irqfd or an ioeventfd assigned; deassigns it on destruction
 * (KVM_IRQFD / KVM_IOEVENTFD with the DEASSIGN flag). Move-only. It holds
 * its own duplicate of the eventfd, so the EventFd may be closed first; if
 * the VM is gone first (Vm, its Vcpus and all else released), KVM has
 * dropped the binding with it and destruction does nothing.
 */
class EventFdRegistration {
public:
	EventFdRegistration() noexcept = default;
	EventFdRegistration(EventFdRegistration &&) noexcept;
	EventFdRegistration &operator=(EventFdRegistration &&) noexcept;
	EventFdRegistration(const EventFdRegistration &) = delete;
	EventFdRegistration &operator=(const EventFdRegistration &) = delete;
	~EventFdRegistration();

	explicit operator bool() const noexcept { return bool(fd_); }
	/* Deassign now (idempotent). Throws Error if KVM refuses. */
	void reset();

private:
	friend class Vm;
	using Binding = std::variant<kvm_irqfd, kvm_ioeventfd>;
	EventFdRegistration(std::weak_ptr<detail::VmState> vm, FileDesc fd, Binding b)
		: vm_(std::move(vm)), fd_(std::move(fd)), binding_(b) {}
	std::weak_ptr<detail::VmState> vm_;
	FileDesc fd_;
	Binding binding_{};
};

/* The VM's kvmclock (KVM_GET_CLOCK / KVM_SET_CLOCK). */
struct VmClock {
	std::uint64_t ns = 0;
	/*
	 * As KVM reports them: KVM_CLOCK_TSC_STABLE, KVM_CLOCK_REALTIME (then
	 * realtime is valid), KVM_CLOCK_HOST_TSC (then host_tsc is valid). On
	 * set_clock() KVM uses KVM_CLOCK_REALTIME: it advances ns by the
	 * CLOCK_REALTIME time elapsed since `realtime`.
	 */
	std::uint32_t flags = 0;
	std::uint64_t realtime = 0;
	std::uint64_t host_tsc = 0;
};

} // namespace virtkit

#pragma GCC visibility pop
