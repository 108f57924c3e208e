// SPDX-License-Identifier: MIT
#include "kvmi/tool/channel.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include <virtkit/error.hpp>

namespace virtkit::introspect::detail {

std::string hex(std::uint64_t v)
{
	char buf[24];
	std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
	return buf;
}

namespace {

/* A Ready from poll: true for yes, false at the deadline; a poll failure throws. */
bool ready(kvmi::Ready r, const char *op)
{
	if (r == kvmi::Ready::error)
		throw Error(op, errno, "poll");
	return r == kvmi::Ready::yes;
}

/*
 * Room for a whole message after the buffered bytes, and for a window of
 * replies the VMM sent together (Session::read_physical(): 16 pages, two
 * windows in flight), so one recv() takes them.
 */
constexpr std::size_t buffer_size = 32 * max_message;

} // namespace

Channel::Channel(FileDesc socket) : fd_(std::move(socket)), buf_(buffer_size)
{
	int flags = ::fcntl(fd_.get(), F_GETFL);
	if (flags < 0 || ::fcntl(fd_.get(), F_SETFL, flags | O_NONBLOCK) < 0)
		throw Error("fcntl", errno, "O_NONBLOCK on the KVMI socket");
}

void Channel::shutdown() noexcept
{
	if (fd_)
		::shutdown(fd_.get(), SHUT_RDWR);
}

void Channel::close() noexcept
{
	/* A close error on a socket leaves nothing to undo. */
	try {
		fd_.close();
	} catch (const Error &) {
	}
	begin_ = end_ = 0;
}

bool Channel::wait_writable(Clock::time_point deadline, const char *op)
{
	return ready(kvmi::wait_ready(fd_.get(), POLLOUT, deadline), op);
}

void Channel::sent(int err, const char *op)
{
	if (err == EAGAIN)
		throw Error(op, ETIMEDOUT, "the VMM does not read its socket");
	if (err)
		throw Error(op, err, "sendmsg");
}

void Channel::send(std::span<const iovec> iov_in, Clock::time_point deadline, const char *op)
{
	if (!fd_)
		throw Error(op, ENOTCONN, "the session is closed");
	/* A local copy, advanced past what a partial send took. */
	std::vector<iovec> iov(iov_in.begin(), iov_in.end());
	sent(kvmi::send_all(fd_.get(), iov, [&] { return wait_writable(deadline, op); }), op);
}

void Channel::send(const kvmi_msg_hdr &hdr, kvmi::Parts parts, Clock::time_point deadline,
		   const char *op)
{
	if (!fd_)
		throw Error(op, ENOTCONN, "the session is closed");
	int err = kvmi::send_message(fd_.get(), hdr, parts,
				     [&] { return wait_writable(deadline, op); });
	if (err == EINVAL)
		throw Error(op, EINVAL, "too many message parts");
	sent(err, op);
}

Channel::Fill Channel::fill(const char *op)
{
	if (!fd_)
		throw Error(op, ENOTCONN, "the session is closed");
	if (buf_.size() - end_ < max_message) {
		/* Buffered bytes are less than one message here (callers consume
		 * complete ones before they fill), so this move is small. */
		std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
		end_ -= begin_;
		begin_ = 0;
	}
	if (end_ == buf_.size())
		throw Error(op, ENOBUFS, "receive buffer full");
	ssize_t n = receive(std::span(buf_).subspan(end_));
	if (n > 0) {
		end_ += std::size_t(n);
		return Fill::data;
	}
	if (n == 0)
		return Fill::eof;
	if (n == -EAGAIN)
		return Fill::none;
	throw Error(op, int(-n), "recv");
}

void Channel::accept_fds(bool on) noexcept
{
	accept_fds_ = on;
	fds_truncated_ = false;
	fds_.clear();
}

ssize_t Channel::receive(std::span<std::byte> buf) noexcept
{
	alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * VIRTKIT_KVMI_MAX_SHARED_REGIONS)];
	for (;;) {
		iovec iov{buf.data(), buf.size()};
		msghdr m{};
		m.msg_iov = &iov;
		m.msg_iovlen = 1;
		m.msg_control = control;
		m.msg_controllen = sizeof(control);
		ssize_t n = ::recvmsg(fd_.get(), &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == ECONNRESET ? 0 : -errno;
		}
		if (m.msg_flags & MSG_CTRUNC)
			fds_truncated_ = accept_fds_;
		for (cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
				continue;
			std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (std::size_t i = 0; i < count; i++) {
				int fd;
				std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(fd));
				try {
					auto f = FileDesc::adopt(fd, "recvmsg", "SCM_RIGHTS");
					/* Not asked for: closed here (f's destructor). */
					if (accept_fds_)
						fds_.push_back(std::move(f));
				} catch (...) {
					/* No room to keep it: f closed it. */
					fds_truncated_ = accept_fds_;
				}
			}
		}
		return n;
	}
}

bool Channel::wait_readable(Clock::time_point deadline, const char *op)
{
	if (!fd_)
		throw Error(op, ENOTCONN, "the session is closed");
	return ready(kvmi::wait_ready(fd_.get(), POLLIN, deadline), op);
}

void Channel::consume(std::size_t n) noexcept
{
	begin_ += n;
	if (begin_ == end_)
		begin_ = end_ = 0;
}

std::optional<Channel::Message> Channel::peek_message(const char *op) const
{
	auto b = buffered();
	if (b.size() < msg_hdr_size)
		return std::nullopt;
	auto hdr = load<kvmi_msg_hdr>(b);
	if (hdr.size > max_payload)
		throw Error(op, EMSGSIZE,
			    "message id " + std::to_string(hdr.id) + " of " +
				    std::to_string(hdr.size) + " bytes, more than KVMI_MSG_SIZE (" +
				    std::to_string(max_payload) + ")");
	if (b.size() < msg_hdr_size + hdr.size)
		return std::nullopt;
	return Message{hdr, b.subspan(msg_hdr_size, hdr.size)};
}

} // namespace virtkit::introspect::detail
