// SPDX-License-Identifier: MIT
/*
 * virtkit::Vm - one KVM virtual machine.
 *
 * A Vm owns the VM fd and the guest memory. Vcpus and exit-handler
 * registrations share the VM's state, so they may outlive the Vm handle
 * (as the kernel keeps a VM alive while its vCPU fds are open).
 */
#pragma once

#include <virtkit/kvm.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>

#include <virtkit/exit.hpp>
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
	/* KVM_ENABLE_CAP on the VM fd. */
	void enable_cap(std::uint32_t cap, std::array<std::uint64_t, 4> args = {},
			std::uint32_t flags = 0);

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
