// SPDX-License-Identifier: MIT
/*
 * virtkit::SppViolation - what sub-page protection (virtkit/spp.hpp) reports
 * about a guest write it blocked. Its own header because exits carry it too
 * (SppViolationExit, virtkit/exit.hpp), without the rest of SPP.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

/* A guest write that touched a write-protected sub-page. */
struct SppViolation {
	std::uint32_t vcpu;		/* id of the vCPU that wrote */
	std::uint64_t gpa;		/* first protected byte the write touched */
	std::uint64_t write_gpa;	/* first byte of the write */
	std::uint32_t size;		/* bytes of the write data() holds (1..max_write) */
	/*
	 * The RIP the guest continues at: KVM retires an emulated store before
	 * it reports it, so this is the next instruction (the target for a
	 * call) - except for a rep string instruction, where it is the
	 * instruction itself, also after its last element (the guest retires
	 * it on re-entry with RCX = 0).
	 */
	std::uint64_t rip;
	/*
	 * A store split across two guest-virtual pages whose guest-physical
	 * pages are not adjacent, the first not trapping: KVM stores the part
	 * in the first page before the rest reaches sub-page protection (see
	 * spp.rst). Then gva is the store's guest-virtual address, write_gpa
	 * its first byte in the first page, and `performed` the bytes already
	 * stored there (data() holds the whole store); otherwise both are 0.
	 */
	std::uint64_t gva;
	std::uint32_t performed;
	std::array<std::byte, 64> bytes; /* the first `size` are the data */
	/*
	 * Bytes the whole write covers from write_gpa: size, or more for the
	 * one write longer than max_write the library decides whole (fxsave,
	 * up to 416 bytes), whose first max_write bytes data() holds. A
	 * handler that allows writes by address checks this extent.
	 */
	std::uint32_t write_size;

	static constexpr std::uint32_t max_write = 64;
	std::span<const std::byte> data() const noexcept { return {bytes.data(), size}; }
};

} // namespace virtkit

#pragma GCC visibility pop
