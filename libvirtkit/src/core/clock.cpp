// SPDX-License-Identifier: MIT
/* The VM's kvmclock and the vCPUs' TSC frequency (Documentation/vmm-primitives.rst). */
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"
#include "core/vcpu_state.hpp"
#include "core/vm_state.hpp"

namespace virtkit {

using detail::hex;

/* KVM_CLOCK_VALID_FLAGS, which the UAPI does not export. */
static constexpr std::uint32_t clock_flags =
	KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;

VmClock Vm::clock() const
{
	kvm_clock_data d{};
	VK_IOCTL(fd(), KVM_GET_CLOCK, &d, "", fd());
	return {d.clock, d.flags, d.realtime, d.host_tsc};
}

void Vm::set_clock(const VmClock &c)
{
	if (c.flags & ~clock_flags)
		throw Error("KVM_SET_CLOCK", EINVAL,
			    "flags=" + hex(c.flags) + " (KVM_CLOCK_TSC_STABLE, _REALTIME, _HOST_TSC only)");
	kvm_clock_data d{};
	d.clock = c.ns;
	d.flags = c.flags;
	d.realtime = c.realtime;
	d.host_tsc = c.host_tsc;
	VK_IOCTL(fd(), KVM_SET_CLOCK, &d, "ns=" + std::to_string(c.ns) + " flags=" + hex(c.flags),
		 fd());
}

std::uint32_t Vcpu::tsc_khz() const
{
	return static_cast<std::uint32_t>(
		VK_IOCTL_VAL(fd(), KVM_GET_TSC_KHZ, 0, "vcpu " + std::to_string(id()),
			     state_->vm->fd.get()));
}

void Vcpu::set_tsc_khz(std::uint32_t khz)
{
	std::string what = "vcpu " + std::to_string(id()) + " khz=" + std::to_string(khz);
	int vm_fd = state_->vm->fd.get();
	if (!khz)
		throw Error("KVM_SET_TSC_KHZ", EINVAL, what + ": 0 kHz");
	if (detail::value_ioctl<KVM_CHECK_EXTENSION>(vm_fd, KVM_CAP_TSC_CONTROL) <= 0) {
		std::uint32_t now = tsc_khz();
		if (now == khz)
			return;
		throw Error("KVM_SET_TSC_KHZ", ENOTSUP,
			    what + ": KVM has no KVM_CAP_TSC_CONTROL, the TSC runs at " +
				    std::to_string(now) + " kHz");
	}
	VK_IOCTL_VAL(fd(), KVM_SET_TSC_KHZ, khz, what, vm_fd);
}

} // namespace virtkit
