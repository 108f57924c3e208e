// SPDX-License-Identifier: MIT
/*
 * Internal: a guest's WRMSR performed by the VMM with the guest's semantics.
 * KVM completes a WRMSR that its MSR filter denied without writing, and
 * gives userspace no guest write of its own. With virtkit.ko
 * (VIRTKIT_CAP_GUEST_WRMSR) the module performs it through KVM's guest
 * write: exact. Otherwise the VMM writes with KVM_SET_MSRS, which KVM
 * treats as a host-initiated write and checks less (or differently) than
 * the guest's, after applying KVM's guest-only rules (guest_wrmsr.cpp
 * lists them, each with the kernel function it mirrors).
 */
#pragma once

#include <cstdint>

namespace virtkit {
class Vcpu;
class Vm;
} // namespace virtkit

namespace virtkit::detail {

class KmodVm;

/*
 * How a VM's guest WRMSRs are performed, decided once per VM (a feature
 * slot) with the library's backend choice (choose_spp_backend()): through
 * virtkit.ko where the kmod backend is chosen and the module has
 * VIRTKIT_CAP_GUEST_WRMSR (its attachment, shared with SPP), else with
 * KVM_SET_MSRS after the rules.
 */
struct GuestWrmsrPath {
	const KmodVm *kmod = nullptr; /* nullptr: KVM_SET_MSRS after the rules */
};

/*
 * The VM's path, decided now if it was not. An SPP already enabled decides
 * the backend; a kmod backend forced (SppBackendKind::kmod through
 * VIRTKIT_SPP_BACKEND) that cannot attach throws, an automatic one falls
 * back to the rules.
 */
const GuestWrmsrPath &guest_wrmsr_path(Vm &vm);
/* The VM's path if decided, else nullptr (from exit handlers). */
const GuestWrmsrPath *find_guest_wrmsr_path(Vm &vm) noexcept;

/*
 * Write msr = value as the guest's WRMSR on a vCPU that is not running:
 * false when the guest gets #GP instead (nothing written). path nullptr:
 * the rules. Throws Error when an ioctl fails.
 */
bool perform_guest_wrmsr(const GuestWrmsrPath *path, Vcpu &vcpu, std::uint32_t msr,
			 std::uint64_t value);

} // namespace virtkit::detail
