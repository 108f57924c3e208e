// SPDX-License-Identifier: MIT
/*
 * Internal ioctl helpers: the argument's size is checked at compile time
 * against the size encoded in the ioctl number, and failures become
 * virtkit::Error naming the ioctl.
 */
#pragma once

#include <sys/ioctl.h>

#include <cerrno>
#include <string>

#include <virtkit/error.hpp>

namespace virtkit::detail {

template <unsigned long Req, class T> inline int typed_ioctl(int fd, T *arg)
{
	static_assert(_IOC_SIZE(Req) == sizeof(T),
		      "ioctl argument type does not match the ioctl's encoded size");
	return ::ioctl(fd, Req, arg);
}

template <unsigned long Req> inline int value_ioctl(int fd, unsigned long arg)
{
	static_assert(_IOC_SIZE(Req) == 0, "ioctl takes a pointer argument");
	return ::ioctl(fd, Req, arg);
}

/*
 * Throw Error for the errno left by a failed ioctl. vm_fd >= 0: on EIO, ask
 * KVM whether the VM is dead.
 */
[[noreturn]] void throw_ioctl_error(const char *name, std::string detail,
				    int vm_fd = -1);

/* Is the VM dead? (every VM ioctl fails with EIO once KVM marked it so) */
bool vm_fd_is_dead(int vm_fd);

std::string hex(unsigned long long v);

} // namespace virtkit::detail

/* ioctl with a typed pointer argument; throws Error naming the ioctl. */
#define VK_IOCTL(fd, req, arg, what, vm_fd)                                  \
	({                                                                     \
		int vk_r_ = ::virtkit::detail::typed_ioctl<req>((fd), (arg));   \
		if (vk_r_ < 0)                                                 \
			::virtkit::detail::throw_ioctl_error(#req, (what),     \
							     (vm_fd));         \
		vk_r_;                                                         \
	})

/* ioctl with an integer argument; throws Error naming the ioctl. */
#define VK_IOCTL_VAL(fd, req, arg, what, vm_fd)                              \
	({                                                                     \
		int vk_r_ = ::virtkit::detail::value_ioctl<req>((fd), (arg));   \
		if (vk_r_ < 0)                                                 \
			::virtkit::detail::throw_ioctl_error(#req, (what),     \
							     (vm_fd));         \
		vk_r_;                                                         \
	})
