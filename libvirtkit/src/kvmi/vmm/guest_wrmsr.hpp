// SPDX-License-Identifier: MIT
/*
 * Internal: a guest's WRMSR performed by the VMM with the guest's semantics.
 * KVM completes a WRMSR that its MSR filter denied without writing; the VMM
 * writes with KVM_SET_MSRS, which KVM treats as a host-initiated write and
 * checks less (or differently) than the guest's. perform_guest_wrmsr()
 * applies KVM's guest-only rules first (guest_wrmsr.cpp lists them, each
 * with the kernel function it mirrors).
 */
#pragma once

#include <cstdint>

namespace virtkit {
class Vcpu;
}

namespace virtkit::detail {

/*
 * Write msr = value as the guest's WRMSR on a vCPU that is not running:
 * false when the guest gets #GP instead (nothing written).
 * Throws Error when an ioctl fails.
 */
bool perform_guest_wrmsr(Vcpu &vcpu, std::uint32_t msr, std::uint64_t value);

} // namespace virtkit::detail
