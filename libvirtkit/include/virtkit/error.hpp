// SPDX-License-Identifier: MIT
/*
 * virtkit::Error - every failure of libvirtkit.
 *
 * It is a std::system_error (so code() carries the errno) that also names the
 * operation that failed (an ioctl such as "KVM_SET_USER_MEMORY_REGION", or a
 * library call such as "GuestMemory::read") and the arguments that mattered.
 * When an ioctl fails with EIO the library asks KVM whether it has marked the
 * VM dead and records the answer.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <string>
#include <system_error>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

class Error : public std::system_error {
public:
	/* Whether the VM behind a failing ioctl is still usable. */
	enum class VmState { unknown, alive, dead };

	Error(std::string operation, int err, std::string detail = {},
	      VmState vm = VmState::unknown);

	/* The failing operation, e.g. "KVM_SET_USER_MEMORY_REGION". */
	const std::string &operation() const noexcept { return operation_; }
	/* The arguments that mattered, e.g. "slot=2 gpa=0x100000 size=0x1000". */
	const std::string &detail() const noexcept { return detail_; }
	/* The errno value. */
	int err() const noexcept { return code().value(); }
	VmState vm_state() const noexcept { return vm_; }
	bool vm_dead() const noexcept { return vm_ == VmState::dead; }
	/* format_error(operation(), err(), detail(), vm_state()). */
	const char *what() const noexcept override { return message_.c_str(); }

private:
	std::string operation_;
	std::string detail_;
	VmState vm_;
	std::string message_;
};

/*
 * The message Error::what() returns, e.g.
 *   "KVM_RUN (vcpu 0): EIO (Input/output error); KVM marked the VM dead".
 */
std::string format_error(const std::string &operation, int err,
			 const std::string &detail, Error::VmState vm);

/* "EINVAL" for EINVAL; "errno 4242" for a value without a name. */
std::string errno_name(int err);

} // namespace virtkit

#pragma GCC visibility pop
