// SPDX-License-Identifier: MIT
/*
 * Move-only owners of file descriptors and memory mappings.
 *
 * Objects come from named factories; the raw-int constructor is private so a
 * descriptor is always owned by exactly one FileDesc. Closing a descriptor
 * that is not open (EBADF) means the ownership bookkeeping is broken, and
 * aborts.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <sys/types.h>
#include <utility>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

class FileDesc {
public:
	/* open(2); throws Error("open", errno, path). */
	static FileDesc open(const char *path, int flags, mode_t mode = 0);
	/* memfd_create(2) with MFD_CLOEXEC added. */
	static FileDesc memfd(const char *name, unsigned int flags = 0);
	/* eventfd(2) with EFD_CLOEXEC added. */
	static FileDesc eventfd(unsigned int initval, int flags = 0);
	/*
	 * Take ownership of a descriptor a system call just returned. A negative
	 * value throws Error(operation, errno, detail) - so the call site reads
	 * `auto f = FileDesc::adopt(::ioctl(...), "KVM_CREATE_VM")` and no error
	 * path can leak the new descriptor.
	 */
	static FileDesc adopt(int fd, const char *operation, const char *detail = "");

	FileDesc() noexcept = default;
	FileDesc(FileDesc &&other) noexcept;
	FileDesc &operator=(FileDesc &&other) noexcept;
	FileDesc(const FileDesc &) = delete;
	FileDesc &operator=(const FileDesc &) = delete;
	~FileDesc();

	int get() const noexcept { return fd_; }
	explicit operator bool() const noexcept { return fd_ >= 0; }
	/* Close now; errors other than EINTR are reported by throwing. */
	void close();

private:
	explicit FileDesc(int fd) noexcept : fd_(fd) {}
	void reset() noexcept;

	int fd_ = -1;
};

/*
 * An eventfd(2) counter, the signal KVM's irqfd and ioeventfd use (see
 * Vm::add_irqfd(), Vm::add_ioeventfd()). Always EFD_CLOEXEC | EFD_NONBLOCK,
 * so consume() never blocks; wait for it with wait() or poll(2) on fd().
 */
class EventFd {
public:
	/* eventfd(2); flags may only be EFD_SEMAPHORE (else EINVAL). */
	static EventFd create(unsigned int initval = 0, int flags = 0);

	EventFd() noexcept = default;
	EventFd(EventFd &&) noexcept = default;
	EventFd &operator=(EventFd &&) noexcept = default;

	int fd() const noexcept { return fd_.get(); }
	explicit operator bool() const noexcept { return bool(fd_); }
	/* Add n to the counter (write(2)); throws Error("eventfd write", errno). */
	void notify(std::uint64_t n = 1);
	/*
	 * Read and reset the counter (read(2); with EFD_SEMAPHORE: take 1).
	 * Empty when it is 0.
	 */
	std::optional<std::uint64_t> consume();
	/* consume(), waiting up to timeout for the counter to become non-zero. */
	std::optional<std::uint64_t> wait(std::chrono::milliseconds timeout);

private:
	explicit EventFd(FileDesc fd) noexcept : fd_(std::move(fd)) {}
	FileDesc fd_;
};

class Mapping {
public:
	/* mmap(2) of a file; throws Error("mmap", errno, what). */
	static Mapping map(std::size_t length, int prot, int flags, int fd,
			   off_t offset, const char *what);
	/* Private anonymous read-write memory. */
	static Mapping anonymous(std::size_t length, const char *what);

	Mapping() noexcept = default;
	Mapping(Mapping &&other) noexcept;
	Mapping &operator=(Mapping &&other) noexcept;
	Mapping(const Mapping &) = delete;
	Mapping &operator=(const Mapping &) = delete;
	~Mapping();

	std::byte *data() const noexcept { return addr_; }
	std::size_t size() const noexcept { return length_; }
	std::span<std::byte> bytes() const noexcept { return {addr_, length_}; }
	explicit operator bool() const noexcept { return addr_ != nullptr; }

	template <class T> T *as() const noexcept
	{
		return reinterpret_cast<T *>(addr_);
	}

private:
	Mapping(std::byte *addr, std::size_t length) noexcept
		: addr_(addr), length_(length) {}
	void reset() noexcept;

	std::byte *addr_ = nullptr;
	std::size_t length_ = 0;
};

} // namespace virtkit

#pragma GCC visibility pop
