// SPDX-License-Identifier: MIT
/* Listener: the tool's listening socket (unix or vsock). */
#include <virtkit/introspect.hpp>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <utility>

#include "kvmi/tool/channel.hpp"

namespace virtkit::introspect {

namespace {

sockaddr_un unix_address(const std::string &path, const char *op)
{
	sockaddr_un a{};
	a.sun_family = AF_UNIX;
	if (path.empty() || path.size() >= sizeof(a.sun_path))
		throw Error(op, ENAMETOOLONG,
			    "'" + path + "': a unix socket path has 1 to " +
				    std::to_string(sizeof(a.sun_path) - 1) + " bytes");
	std::memcpy(a.sun_path, path.data(), path.size());
	return a;
}

/* Someone accepts connections on the socket at a. */
bool socket_alive(const sockaddr_un &a)
{
	auto fd = FileDesc::adopt(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket");
	return ::connect(fd.get(), reinterpret_cast<const sockaddr *>(&a), sizeof(a)) == 0;
}

} // namespace

Listener Listener::unix_socket(const std::string &path, int backlog)
{
	const char *op = "Listener::unix_socket";
	auto a = unix_address(path, op);

	struct stat st;
	if (::lstat(path.c_str(), &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			throw Error(op, EEXIST, "'" + path + "' exists and is not a socket");
		if (socket_alive(a))
			throw Error(op, EADDRINUSE, "'" + path + "': another process listens there");
		/* A stale socket of a tool that is gone. */
		if (::unlink(path.c_str()) < 0 && errno != ENOENT)
			throw Error(op, errno, "unlink '" + path + "'");
	} else if (errno != ENOENT) {
		throw Error(op, errno, "lstat '" + path + "'");
	}

	Listener l;
	l.fd_ = FileDesc::adopt(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0),
				"socket");
	if (::bind(l.fd_.get(), reinterpret_cast<const sockaddr *>(&a), sizeof(a)) < 0)
		throw Error(op, errno, "bind '" + path + "'");
	/* From here the destructor removes the file. */
	l.path_ = path;
	if (::stat(path.c_str(), &st) < 0)
		throw Error(op, errno, "stat '" + path + "'");
	l.dev_ = st.st_dev;
	l.ino_ = st.st_ino;
	/* Only the owner may connect. Nobody can connect before listen(), so
	 * there is no window with the umask's mode. */
	if (::chmod(path.c_str(), 0600) < 0)
		throw Error(op, errno, "chmod 0600 '" + path + "'");
	if (::listen(l.fd_.get(), backlog) < 0)
		throw Error(op, errno, "listen '" + path + "'");
	l.address_ = "unix:" + path;
	return l;
}

Listener Listener::vsock(std::uint32_t port, int backlog)
{
	const char *op = "Listener::vsock";
	Listener l;
	l.fd_ = FileDesc::adopt(::socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0),
				"socket",
				"AF_VSOCK");
	sockaddr_vm a{};
	a.svm_family = AF_VSOCK;
	a.svm_port = port;
	a.svm_cid = VMADDR_CID_ANY;
	if (::bind(l.fd_.get(), reinterpret_cast<const sockaddr *>(&a), sizeof(a)) < 0)
		throw Error(op, errno, "bind port " + std::to_string(port));
	if (::listen(l.fd_.get(), backlog) < 0)
		throw Error(op, errno, "listen port " + std::to_string(port));
	l.address_ = "vsock:" + std::to_string(port);
	return l;
}

Listener Listener::parse(std::string_view address, int backlog)
{
	if (address.starts_with("unix:") && address.size() > 5)
		return unix_socket(std::string(address.substr(5)), backlog);
	if (address.starts_with("vsock:")) {
		auto s = address.substr(6);
		std::uint32_t port = 0;
		auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), port);
		if (!s.empty() && ec == std::errc() && end == s.data() + s.size())
			return vsock(port, backlog);
	}
	throw Error("Listener::parse", EINVAL,
		    "'" + std::string(address) + "': expected unix:/path or vsock:PORT");
}

Listener::Listener(Listener &&other) noexcept
	: fd_(std::move(other.fd_)), address_(std::move(other.address_)),
	  path_(std::exchange(other.path_, {})), dev_(other.dev_), ino_(other.ino_)
{
}

Listener &Listener::operator=(Listener &&other) noexcept
{
	if (this != &other) {
		unlink_socket();
		fd_ = std::move(other.fd_);
		address_ = std::move(other.address_);
		path_ = std::exchange(other.path_, {});
		dev_ = other.dev_;
		ino_ = other.ino_;
	}
	return *this;
}

Listener::~Listener()
{
	unlink_socket();
}

void Listener::unlink_socket() noexcept
{
	if (path_.empty())
		return;
	/* Only our own socket: another tool may have replaced it since. */
	struct stat st;
	if (::lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == dev_ &&
	    st.st_ino == ino_)
		::unlink(path_.c_str());
	path_.clear();
}

FileDesc Listener::accept(std::chrono::milliseconds timeout)
{
	const char *op = "Listener::accept";
	if (!fd_)
		throw Error(op, EBADF, "an empty Listener");
	auto deadline = detail::deadline_after(timeout);
	for (;;) {
		int fd = ::accept4(fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd >= 0)
			return FileDesc::adopt(fd, "accept4");
		if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
			throw Error(op, errno, address_);
		int ms = -1;
		if (deadline != detail::Clock::time_point::max()) {
			auto left = std::chrono::ceil<std::chrono::milliseconds>(
				deadline - detail::Clock::now());
			if (left.count() <= 0)
				throw Error(op, ETIMEDOUT,
					    "no VMM connected to " + address_ + " within " +
						    std::to_string(timeout.count()) + " ms");
			ms = left.count() > 1000000000 ? 1000000000 : int(left.count());
		}
		pollfd p{fd_.get(), POLLIN, 0};
		if (::poll(&p, 1, ms) < 0 && errno != EINTR)
			throw Error(op, errno, "poll");
	}
}

} // namespace virtkit::introspect
