// SPDX-License-Identifier: MIT
#include "kvmi/vmm/connection.hpp"

#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include <virtkit/error.hpp>

namespace virtkit::detail::kvmi {

namespace {

constexpr const char op[] = "KVMI handshake";

std::string describe(const Address &a)
{
	if (a.kind == Address::Kind::vsock)
		return "vsock:" + std::to_string(a.cid) + ":" + std::to_string(a.port);
	return "unix:" + a.path;
}

/* cancel_fd: readable once the caller's stop was requested. */
FileDesc connect_socket(const Address &a, Clock::time_point deadline, int cancel_fd)
{
	const std::string who = describe(a);
	sockaddr_storage ss{};
	socklen_t len;
	int family;
	if (a.kind == Address::Kind::unix_path) {
		auto *un = reinterpret_cast<sockaddr_un *>(&ss);
		un->sun_family = AF_UNIX;
		std::memcpy(un->sun_path, a.path.data(), a.path.size());
		len = offsetof(sockaddr_un, sun_path) + a.path.size();
		if (a.path[0] == '@')
			un->sun_path[0] = '\0'; /* abstract: no terminating NUL */
		else
			len++;
		family = AF_UNIX;
	} else {
		auto *vm = reinterpret_cast<sockaddr_vm *>(&ss);
		vm->svm_family = AF_VSOCK;
		vm->svm_cid = a.cid;
		vm->svm_port = a.port;
		len = sizeof(sockaddr_vm);
		family = AF_VSOCK;
	}
	for (;;) {
		auto s = FileDesc::adopt(::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0),
					 op, who.c_str());
		if (::connect(s.get(), reinterpret_cast<sockaddr *>(&ss), len) == 0)
			return s;
		int err = errno;
		if (err == EAGAIN && Clock::now() < deadline) {
			/* A unix listener's backlog is full: try again shortly. */
			pollfd p{cancel_fd, POLLIN, 0};
			if (::poll(&p, 1, 5) > 0)
				throw Error(op, ECANCELED, "connect to " + who + ": cancelled");
			continue;
		}
		if (err != EINPROGRESS)
			throw Error(op, err, "connect to " + who);
		switch (wait_ready(s.get(), POLLOUT, deadline, cancel_fd)) {
		case Ready::yes:
			break;
		case Ready::cancelled:
			throw Error(op, ECANCELED, "connect to " + who + ": cancelled");
		case Ready::timeout:
			throw Error(op, ETIMEDOUT, "connect to " + who);
		case Ready::error:
			throw Error(op, errno, "connect to " + who + ": poll");
		}
		int soerr = 0;
		socklen_t sl = sizeof(soerr);
		::getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &soerr, &sl);
		if (soerr)
			throw Error(op, soerr, "connect to " + who);
		return s;
	}
}

} // namespace

std::unique_ptr<Connection> Connection::open(const Address &address,
					     const kvmi_qemu2introspector &hello,
					     const CookieHash *cookie_hash, Clock::time_point deadline,
					     std::stop_token stop)
{
	const std::string who = describe(address);
	/*
	 * The connection's cancel eventfd doubles as the handshake's: a stop
	 * request signals it, and every wait below polls it.
	 */
	FileDesc efd = FileDesc::eventfd(0, EFD_NONBLOCK);
	/*
	 * The callback's own descriptor, closed under its lock once the
	 * callback can no longer run (the stop_callback is gone first).
	 */
	struct StopSignal {
		std::mutex mu;
		FileDesc fd;
		~StopSignal()
		{
			std::lock_guard lock(mu);
			fd = FileDesc();
		}
	} signal;
	signal.fd = FileDesc::adopt(::fcntl(efd.get(), F_DUPFD_CLOEXEC, 0), op,
				    "dup of the cancel eventfd");
	std::stop_callback on_stop(stop, [&signal] {
		std::lock_guard lock(signal.mu);
		std::uint64_t one = 1;
		(void)!::write(signal.fd.get(), &one, sizeof(one));
	});
	auto cancelled = [&] {
		if (stop.stop_requested())
			throw Error(op, ECANCELED, who + ": cancelled");
	};
	cancelled(); /* before anything reaches the tool */
	FileDesc sock = connect_socket(address, deadline, efd.get());
	std::unique_ptr<Connection> c(new Connection(std::move(sock), std::move(efd)));

	/* The handshake has no header: raw structs both ways. */
	bool timed_out = false;
	iovec iov{const_cast<kvmi_qemu2introspector *>(&hello), sizeof(hello)};
	int err = send_all(c->sock_.get(), std::span(&iov, 1),
			   [&] { return c->wait(POLLOUT, deadline, &timed_out); });
	if (err == EAGAIN) {
		cancelled();
		throw Error(op, timed_out ? ETIMEDOUT : ECONNRESET, who + ": sending the VMM's data");
	}
	if (err)
		throw Error(op, err, who + ": sending the VMM's data");

	auto fail_read = [&](const char *what) {
		cancelled();
		throw Error(op, Clock::now() >= deadline ? ETIMEDOUT : ECONNRESET,
			    who + ": " + what + " (the tool closed the connection or did not answer)");
	};
	kvmi_introspector2qemu answer{};
	if (!c->read_exact(&answer.struct_size, sizeof(answer.struct_size), deadline))
		fail_read("reading the tool's answer");
	if (answer.struct_size < min_answer_size || answer.struct_size > max_handshake_size)
		throw Error(op, EPROTO,
			    who + ": the tool's answer has struct_size " +
				    std::to_string(answer.struct_size) + " (expected " +
				    std::to_string(min_answer_size) + ".." +
				    std::to_string(max_handshake_size) + ")");
	if (!c->read_exact(answer.cookie_hash, sizeof(answer.cookie_hash), deadline))
		fail_read("reading the tool's cookie hash");
	/* A newer tool's answer may be longer: skip what we do not know. */
	for (std::size_t left = answer.struct_size - sizeof(answer); left;) {
		std::byte skip[256];
		std::size_t n = std::min(left, sizeof(skip));
		if (!c->read_exact(skip, n, deadline))
			fail_read("reading the tool's answer");
		left -= n;
	}
	if (cookie_hash && !equal_ct(std::span<const std::uint8_t>(answer.cookie_hash), *cookie_hash))
		throw Error(op, EACCES, who + ": the tool's cookie hash is not SHA-1 of the secret");
	/* A stop that came after the last wait: still connect()'s to answer. */
	cancelled();
	return c;
}

bool Connection::wait(short events, Clock::time_point deadline, bool *timed_out)
{
	/* POLLHUP/POLLERR count as ready: the read or send reports them. */
	Ready r = wait_ready(sock_.get(), events, deadline, efd_.get());
	if (r == Ready::timeout && timed_out)
		*timed_out = true;
	return r == Ready::yes;
}

int Connection::fill() noexcept
{
	if (head_ == tail_)
		head_ = tail_ = 0;
	else if (head_ && tail_ == buf_.size()) {
		/* Make room behind a partial message (one always fits: 16 KiB). */
		std::memmove(buf_.data(), buf_.data() + head_, tail_ - head_);
		tail_ -= head_;
		head_ = 0;
	}
	if (tail_ == buf_.size())
		return 0;
	ssize_t r = recv_some(sock_.get(), std::span(buf_).subspan(tail_));
	if (r > 0) {
		tail_ += static_cast<std::size_t>(r);
		return 1;
	}
	return r == -EAGAIN ? 0 : -1;
}

bool Connection::wait_socket_readable()
{
	return wait(POLLIN, Clock::time_point::max());
}

bool Connection::read_exact(void *out, std::size_t n, Clock::time_point deadline)
{
	auto *dst = static_cast<std::byte *>(out);
	while (n) {
		if (head_ < tail_) {
			std::size_t k = std::min(n, tail_ - head_);
			std::memcpy(dst, buf_.data() + head_, k);
			head_ += k, dst += k, n -= k;
			continue;
		}
		head_ = tail_ = 0;
		ssize_t r = recv_some(sock_.get(), buf_);
		if (r > 0) {
			tail_ = static_cast<std::size_t>(r);
			continue;
		}
		/* The tool closed the connection, or the socket failed. */
		if (r != -EAGAIN || !wait(POLLIN, deadline))
			return false;
	}
	return true;
}

bool Connection::send(const kvmi_msg_hdr &hdr, Parts parts)
{
	std::lock_guard lock(send_mu_);
	return send_message(sock_.get(), hdr, parts,
			    [&] { return wait(POLLOUT, Clock::time_point::max()); }) == 0;
}

bool Connection::message_buffered() const noexcept
{
	const std::size_t have = tail_ - head_;
	kvmi_msg_hdr hdr;
	if (have < sizeof(hdr))
		return false;
	std::memcpy(&hdr, buf_.data() + head_, sizeof(hdr));
	return hdr.size > KVMI_MSG_SIZE || have - sizeof(hdr) >= hdr.size;
}

void Connection::queue(const kvmi_msg_hdr &hdr, Parts parts)
{
	auto h = std::as_bytes(std::span(&hdr, 1));
	out_.insert(out_.end(), h.begin(), h.end());
	for (auto &p : parts)
		out_.insert(out_.end(), p.begin(), p.end());
}

bool Connection::flush()
{
	if (out_.empty())
		return true;
	iovec iov{out_.data(), out_.size()};
	int err;
	{
		std::lock_guard lock(send_mu_);
		err = send_all(sock_.get(), std::span(&iov, 1),
			       [&] { return wait(POLLOUT, Clock::time_point::max()); });
	}
	out_.clear();
	return err == 0;
}

bool Connection::can_pass_fds() const noexcept
{
	sockaddr_storage ss{};
	socklen_t len = sizeof(ss);
	return ::getsockname(sock_.get(), reinterpret_cast<sockaddr *>(&ss), &len) == 0 &&
	       ss.ss_family == AF_UNIX;
}

bool Connection::send_with_fds(const kvmi_msg_hdr &hdr, Parts parts, std::span<const int> fds)
{
	constexpr std::size_t max_fds = VIRTKIT_KVMI_MAX_SHARED_REGIONS;
	iovec iov_buf[max_message_iov];
	std::size_t n = message_iov(hdr, parts, iov_buf);
	if (!n || fds.size() > max_fds)
		return false;
	std::span<iovec> iov(iov_buf, n);
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds)];
	msghdr m{};
	m.msg_iov = iov.data();
	m.msg_iovlen = iov.size();
	if (!fds.empty()) {
		std::memset(control, 0, sizeof(control));
		m.msg_control = control;
		m.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
		cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
		std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
	}
	auto wait_writable = [&] { return wait(POLLOUT, Clock::time_point::max()); };
	std::lock_guard lock(send_mu_);
	/* The first sendmsg() takes the descriptors with the bytes it sends. */
	for (;;) {
		ssize_t sent = ::sendmsg(sock_.get(), &m, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (sent < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN && wait_writable())
				continue;
			return false;
		}
		advance_iov(iov, std::size_t(sent));
		break;
	}
	return iov.empty() || send_all(sock_.get(), iov, wait_writable) == 0;
}

void Connection::cancel() noexcept
{
	std::uint64_t one = 1;
	(void)!::write(efd_.get(), &one, sizeof(one));
	::shutdown(sock_.get(), SHUT_RDWR);
}

} // namespace virtkit::detail::kvmi
