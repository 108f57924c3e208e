// SPDX-License-Identifier: MIT
/*
 * Typed vCPU exits.
 *
 * Vcpu::run() returns an Exit: a variant with one alternative per exit kind.
 * Payloads that KVM exchanges through kvm_run (I/O and MMIO data, MSR values)
 * are views into the vCPU's kvm_run mapping (std::span, never raw pointers):
 * they stay valid until the next run() of the same vCPU, and writing them
 * (IoExit::set, MmioExit::set, MsrExit::set, MsrExit::fail) completes an IN,
 * an MMIO read or an RDMSR when the vCPU is run again. The exits that have a
 * direction all say it the same way: a `direction` enum and is_...()
 * predicates. Exit reasons the library does not know are a value
 * (UnknownExit), not an error.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <cstdint>
#include <span>
#include <string>
#include <variant>

#include <virtkit/spp_violation.hpp>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

/* Port I/O: IN (guest reads, host fills data) or OUT (guest wrote data). */
struct IoExit {
	enum class Direction : std::uint8_t { in, out };
	Direction direction;
	std::uint16_t port;
	std::uint8_t size;	/* bytes per element: 1, 2 or 4 */
	std::uint32_t count;	/* elements (> 1 for rep ins/outs) */
	std::span<std::byte> data; /* size * count bytes inside kvm_run */

	bool is_in() const noexcept { return direction == Direction::in; }
	bool is_out() const noexcept { return direction == Direction::out; }
	/* Element i of the data, zero-extended. */
	std::uint64_t value(std::uint32_t i = 0) const noexcept;
	/* Set element i (the low `size` bytes of v) - completes an IN. */
	void set(std::uint64_t v, std::uint32_t i = 0) const noexcept;
};

/* Access to guest-physical memory no memslot backs writably. */
struct MmioExit {
	enum class Direction : std::uint8_t { read, write };
	Direction direction;
	std::uint64_t gpa;
	std::span<std::byte> data; /* 1..8 bytes inside kvm_run */

	bool is_read() const noexcept { return direction == Direction::read; }
	bool is_write() const noexcept { return direction == Direction::write; }
	std::uint64_t value() const noexcept;
	/* Set the value an MMIO read returns. */
	void set(std::uint64_t v) const noexcept;
};

struct HltExit {};

/* KVM_EXIT_DEBUG: single step, software or hardware breakpoint. */
struct DebugExit {
	std::uint32_t exception; /* 1 (#DB) or 3 (#BP) */
	std::uint64_t pc;
	std::uint64_t dr6;
	std::uint64_t dr7;
};

/* KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR (user-space MSR handling). */
struct MsrExit {
	enum class Direction : std::uint8_t { read, write };	/* RDMSR, WRMSR */
	Direction direction;
	std::uint32_t index;
	std::uint32_t reason;	/* KVM_MSR_EXIT_REASON_* */
	std::span<std::byte> data;  /* the 8-byte value inside kvm_run */
	std::span<std::byte> error; /* 1 byte inside kvm_run; non-zero injects #GP */

	bool is_read() const noexcept { return direction == Direction::read; }
	bool is_write() const noexcept { return direction == Direction::write; }
	/* The value a WRMSR writes (or an RDMSR's answer set so far). */
	std::uint64_t value() const noexcept;
	/* Complete an RDMSR with v. */
	void set(std::uint64_t v) const noexcept;
	/* Make the guest's RDMSR/WRMSR raise #GP. */
	void fail() const noexcept;
	/* Whether fail() was called (kvm_run's error byte is non-zero). */
	bool failed() const noexcept;
};

struct ShutdownExit {};

struct FailEntryExit {
	std::uint64_t hardware_entry_failure_reason;
	std::uint32_t cpu;
};

struct InternalErrorExit {
	std::uint32_t suberror;
	std::span<const std::uint64_t> data; /* inside kvm_run */
};

struct SystemEventExit {
	std::uint32_t type;	/* KVM_SYSTEM_EVENT_* */
	std::span<const std::uint64_t> data; /* inside kvm_run */
};

/* KVM_EXIT_MEMORY_FAULT: KVM could not resolve a guest access. */
struct MemoryFaultExit {
	std::uint64_t flags;
	std::uint64_t gpa;
	std::uint64_t size;
};

/*
 * KVM_RUN returned before or instead of running the guest because of
 * Vcpu::kick(), immediate_exit or a signal (EINTR).
 */
struct InterruptedExit {};

struct UnknownExit {
	std::uint32_t reason;
};

/*
 * A guest write to a write-protected sub-page whose violation handler
 * answered SppDecision::stop (see virtkit/spp.hpp). The write was not
 * performed; running the vCPU again continues after it.
 */
struct SppViolationExit {
	SppViolation violation;
};

using Exit = std::variant<IoExit, MmioExit, HltExit, DebugExit, MsrExit,
			  ShutdownExit, FailEntryExit, InternalErrorExit,
			  SystemEventExit, MemoryFaultExit, InterruptedExit,
			  UnknownExit, SppViolationExit>;

/* "KVM_EXIT_MMIO" for 6; "KVM_EXIT_<n>" for unknown values. */
std::string exit_reason_name(std::uint32_t reason);

/* One line for logs and test failures, e.g. "MMIO write gpa=0x1000 len=4 data=0x2a". */
std::string describe(const Exit &exit);

} // namespace virtkit

#pragma GCC visibility pop
