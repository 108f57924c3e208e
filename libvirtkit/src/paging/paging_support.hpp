// SPDX-License-Identifier: MIT
/*
 * Internal: what page walks (Vcpu::translate, Vcpu::paging_state) take from
 * KVM and from a vCPU's CPUID, asked once and kept with the VM and the vCPU.
 */
#pragma once

#include <virtkit/kvm.h>

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace virtkit {
class Vcpu;
}

namespace virtkit::detail {

/* What KVM can give a guest's page walks; asked when the VM is created. */
struct KvmPagingSupport {
	/*
	 * Whether KVM lists IA32_PKRS (0x6e1) in KVM_GET_MSR_INDEX_LIST, so
	 * that page walks read it.
	 */
	bool pkrs_listed = false;
	/*
	 * The paging features (paging_feature::*) KVM can give a guest
	 * (KVM_GET_SUPPORTED_CPUID): page walks use those of the vCPU's
	 * CPUID that KVM has, as KVM's own walk does (guest_cpu_cap_has()).
	 */
	std::uint32_t features = 0;
	/*
	 * With two-dimensional paging (platform::tdp_enabled()) the processor
	 * walks the guest's tables, and 1 GiB pages follow the host processor
	 * (KVM's guest_can_use_gbpages()): whether it has Page1GB. Unset where
	 * KVM shadows the tables (the vCPU's CPUID decides).
	 */
	std::optional<bool> tdp_page1gb;
};

/* What a walk takes from one vCPU's CPUID; known once `known`. */
struct VcpuPagingCpuid {
	bool known = false;
	std::uint32_t maxphyaddr = 36;
	std::uint32_t features = 0;	/* paging_feature::* */
	std::uint32_t pkru_offset = 0;	/* in the XSAVE area; 0: not known */
};

/* The paging features (paging_feature::*) a CPUID lists (vcpu_paging.cpp). */
std::uint32_t paging_features(const std::vector<kvm_cpuid_entry2> &cpuid);

struct VcpuState;
/*
 * The guest-physical address gva maps to in the vCPU's current paging
 * mode, walked in software (no KVM_TRANSLATE; with synced registers no
 * ioctl at all); access rights are not checked. nullopt: not mapped.
 */
std::optional<std::uint64_t> guest_physical(const Vcpu &vcpu, VcpuState &st, std::uint64_t gva);

/*
 * Guest-virtual bytes [gva, gva + out.size()) as the vCPU maps them
 * (guest_physical()), as far as they are guest RAM: returns how many were
 * read. sregs are the vCPU's current special registers. For the code bytes
 * sub-page protection decodes on every trapped write: each page's
 * translation is kept in a small per-thread cache, and used again only
 * while the map of guest memory has not changed (its generation), the
 * paging state is the same and every paging-structure entry the walk read
 * still holds the value it read - the conditions under which a new walk
 * gives the same answer; anything else walks again (vcpu_paging.cpp).
 */
std::size_t read_guest_virtual_cached(const Vcpu &vcpu, VcpuState &st, const kvm_sregs &sregs,
				      std::uint64_t gva, std::span<std::uint8_t> out);

} // namespace virtkit::detail
