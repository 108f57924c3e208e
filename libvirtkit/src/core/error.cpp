// SPDX-License-Identifier: MIT
#include <virtkit/error.hpp>

#include <cstring>
#include <string.h>

#include <virtkit/kvm.h>

#include "core/ioctl.hpp"

namespace virtkit {

std::string errno_name(int err)
{
	const char *name = strerrorname_np(err);
	return name ? name : "errno " + std::to_string(err);
}

std::string format_error(const std::string &operation, int err,
			 const std::string &detail, Error::VmState vm)
{
	std::string s = operation;
	if (!detail.empty())
		s += " (" + detail + ")";
	s += ": " + errno_name(err) + " (" + std::strerror(err) + ")";
	if (vm == Error::VmState::dead)
		s += "; KVM marked the VM dead";
	else if (vm == Error::VmState::alive && err == EIO)
		s += "; the VM is not marked dead";
	return s;
}

Error::Error(std::string operation, int err, std::string detail, VmState vm)
	: std::system_error(err, std::generic_category()),
	  operation_(std::move(operation)), detail_(std::move(detail)), vm_(vm),
	  message_(format_error(operation_, err, detail_, vm))
{
}

namespace detail {

std::string hex(unsigned long long v)
{
	char buf[24];
	snprintf(buf, sizeof(buf), "0x%llx", v);
	return buf;
}

bool vm_fd_is_dead(int vm_fd)
{
	/* kvm_vm_ioctl() refuses everything with -EIO once kvm->vm_dead is set. */
	return value_ioctl<KVM_CHECK_EXTENSION>(vm_fd, KVM_CAP_USER_MEMORY) < 0 &&
	       errno == EIO;
}

void throw_ioctl_error(const char *name, std::string detail, int vm_fd)
{
	int err = errno;
	auto vm = Error::VmState::unknown;
	if (err == EIO && vm_fd >= 0)
		vm = vm_fd_is_dead(vm_fd) ? Error::VmState::dead : Error::VmState::alive;
	throw Error(name, err, std::move(detail), vm);
}

} // namespace detail
} // namespace virtkit
