// SPDX-License-Identifier: MIT
/*
 * The CPUID a vCPU of `virtkit run` gets: what KVM supports
 * (KVM_GET_SUPPORTED_CPUID), with the vCPU's APIC ID where the guest reads
 * it (leaf 1 EBX[31:24] and the x2APIC ID of leaves 0xb and 0x1f) and
 * without nested virtualization (VMX, SVM), which this VMM does not offer.
 */
#pragma once

#include <cstdint>
#include <vector>

#include <virtkit/virtkit.hpp>

namespace virtkit::tool::run {

std::vector<kvm_cpuid_entry2> vcpu_cpuid(std::vector<kvm_cpuid_entry2> supported,
					 std::uint32_t apic_id);

} // namespace virtkit::tool::run
