// SPDX-License-Identifier: MIT
/*
 * virtkit::System - an open /dev/kvm: what the host KVM offers, and the
 * factory for VMs.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <virtkit/kvm.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <virtkit/fd.hpp>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

class Vm;

struct VmOptions {
	/* KVM_CREATE_VM type; 0 is the default x86 VM. */
	unsigned long type = 0;
	/* Bytes of dirty ring per vCPU (0: use dirty bitmaps only). */
	std::uint32_t dirty_ring_bytes = 0;
};

/*
 * Whether host KVM virtualizes PKS (protection keys for supervisor pages)
 * for its guests. It takes both: the CPUID bit that lets a guest see PKS and
 * IA32_PKRS among the MSRs KVM saves and restores. Mainline KVM has neither
 * (Documentation/pks.rst); virtkit.ko cannot add them.
 */
struct PksSupport {
	/* IA32_PKRS, the supervisor-mode protection-key rights. */
	static constexpr std::uint32_t pkrs_msr = 0x6e1;

	bool cpuid = false;	/* KVM_GET_SUPPORTED_CPUID (7,0):ECX[31] */
	bool msr = false;	/* pkrs_msr in KVM_GET_MSR_INDEX_LIST */

	bool available() const noexcept { return cpuid && msr; }
	/*
	 * What is missing, "" when available: "KVM_GET_SUPPORTED_CPUID
	 * (7,0):ECX[31] clear; IA32_PKRS (0x6e1) not in KVM_GET_MSR_INDEX_LIST".
	 */
	std::string missing() const;
};

class System {
public:
	/* Open the KVM device and check that it speaks API version 12. */
	static System open(const char *path = "/dev/kvm");

	int api_version() const;
	/* KVM_CHECK_EXTENSION: 0 when absent, otherwise its value. */
	int check_extension(long cap) const;
	bool has(long cap) const { return check_extension(cap) > 0; }

	std::size_t vcpu_mmap_size() const { return vcpu_mmap_size_; }
	/* KVM_GET_SUPPORTED_CPUID. */
	std::vector<kvm_cpuid_entry2> supported_cpuid() const;
	/* KVM_GET_MSR_INDEX_LIST: MSRs KVM saves and restores. */
	std::vector<std::uint32_t> msr_index_list() const;
	/* KVM_GET_MSR_FEATURE_INDEX_LIST (empty when unsupported). */
	std::vector<std::uint32_t> feature_msr_index_list() const;
	/* Whether KVM offers PKS to guests (see PksSupport). */
	PksSupport pks_support() const;

	Vm create_vm(const VmOptions &options = {}) const;

	const FileDesc &fd() const noexcept { return fd_; }

private:
	explicit System(FileDesc fd, std::size_t mmap_size)
		: fd_(std::move(fd)), vcpu_mmap_size_(mmap_size) {}
	std::vector<std::uint32_t> msr_list(unsigned long ioctl, const char *name) const;

	FileDesc fd_;
	std::size_t vcpu_mmap_size_;
};

} // namespace virtkit

#pragma GCC visibility pop
