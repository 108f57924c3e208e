// SPDX-License-Identifier: MIT
#include <virtkit/fd.hpp>

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>

#include <virtkit/error.hpp>

namespace virtkit {

FileDesc FileDesc::adopt(int fd, const char *operation, const char *detail)
{
	if (fd < 0)
		throw Error(operation, errno, detail);
	return FileDesc(fd);
}

FileDesc FileDesc::open(const char *path, int flags, mode_t mode)
{
	return adopt(::open(path, flags | O_CLOEXEC, mode), "open", path);
}

FileDesc FileDesc::memfd(const char *name, unsigned int flags)
{
	return adopt(::memfd_create(name, flags | MFD_CLOEXEC), "memfd_create", name);
}

FileDesc FileDesc::eventfd(unsigned int initval, int flags)
{
	return adopt(::eventfd(initval, flags | EFD_CLOEXEC), "eventfd");
}

EventFd EventFd::create(unsigned int initval, int flags)
{
	if (flags & ~EFD_SEMAPHORE)
		throw Error("eventfd", EINVAL,
			    "flags=" + std::to_string(flags) + " (only EFD_SEMAPHORE)");
	return EventFd(FileDesc::eventfd(initval, flags | EFD_NONBLOCK));
}

void EventFd::notify(std::uint64_t n)
{
	/* Always 8 bytes or an error: an eventfd write is not partial. */
	if (::write(fd_.get(), &n, sizeof(n)) < 0)
		throw Error("eventfd write", errno, "fd " + std::to_string(fd_.get()));
}

std::optional<std::uint64_t> EventFd::consume()
{
	std::uint64_t v;
	if (::read(fd_.get(), &v, sizeof(v)) == sizeof(v))
		return v;
	if (errno == EAGAIN)
		return std::nullopt;
	throw Error("eventfd read", errno, "fd " + std::to_string(fd_.get()));
}

std::optional<std::uint64_t> EventFd::wait(std::chrono::milliseconds timeout)
{
	pollfd p{.fd = fd_.get(), .events = POLLIN, .revents = 0};
	auto end = std::chrono::steady_clock::now() + timeout;
	for (;;) {
		auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
			end - std::chrono::steady_clock::now());
		int r = ::poll(&p, 1, left.count() > 0 ? int(left.count()) : 0);
		if (r < 0 && errno != EINTR)
			throw Error("poll", errno, "eventfd " + std::to_string(fd_.get()));
		/* Another reader may take it between poll and read: poll again. */
		if (r > 0)
			if (auto v = consume())
				return v;
		if (left.count() <= 0)
			return std::nullopt;
	}
}

FileDesc::FileDesc(FileDesc &&other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

FileDesc &FileDesc::operator=(FileDesc &&other) noexcept
{
	if (this != &other) {
		reset();
		fd_ = std::exchange(other.fd_, -1);
	}
	return *this;
}

FileDesc::~FileDesc() { reset(); }

void FileDesc::reset() noexcept
{
	if (fd_ < 0)
		return;
	if (::close(std::exchange(fd_, -1)) < 0 && errno == EBADF) {
		std::fputs("virtkit: closing a descriptor that is not open\n", stderr);
		std::abort();
	}
}

void FileDesc::close()
{
	if (fd_ < 0)
		return;
	int fd = std::exchange(fd_, -1);
	if (::close(fd) < 0 && errno != EINTR)
		throw Error("close", errno, "fd " + std::to_string(fd));
}

Mapping Mapping::map(std::size_t length, int prot, int flags, int fd,
		     off_t offset, const char *what)
{
	void *p = ::mmap(nullptr, length, prot, flags, fd, offset);
	if (p == MAP_FAILED)
		throw Error("mmap", errno, what);
	return Mapping(static_cast<std::byte *>(p), length);
}

Mapping Mapping::anonymous(std::size_t length, const char *what)
{
	return map(length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		   -1, 0, what);
}

Mapping::Mapping(Mapping &&other) noexcept
	: addr_(std::exchange(other.addr_, nullptr)),
	  length_(std::exchange(other.length_, 0)) {}

Mapping &Mapping::operator=(Mapping &&other) noexcept
{
	if (this != &other) {
		reset();
		addr_ = std::exchange(other.addr_, nullptr);
		length_ = std::exchange(other.length_, 0);
	}
	return *this;
}

Mapping::~Mapping() { reset(); }

void Mapping::reset() noexcept
{
	if (addr_)
		::munmap(std::exchange(addr_, nullptr), std::exchange(length_, 0));
}

} // namespace virtkit
