// SPDX-License-Identifier: MIT
#include "kvmi/tool/channel.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <climits>
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

Clock::time_point deadline_after(std::chrono::milliseconds timeout)
{
	auto now = Clock::now();
	if (timeout.count() < 0)
		timeout = std::chrono::milliseconds(0);
	if (timeout >= std::chrono::duration_cast<std::chrono::milliseconds>(
			       Clock::time_point::max() - now))
		return Clock::time_point::max();
	return now + timeout;
}

namespace {

/* poll(2) on one fd until deadline; false when it passed. */
bool wait_for(int fd, short events, Clock::time_point deadline, const char *op)
{
	for (;;) {
		int ms = -1;
		if (deadline != Clock::time_point::max()) {
			auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
			if (left.count() <= 0)
				ms = 0;
			else
				ms = left.count() > INT_MAX ? INT_MAX : int(left.count());
		}
		pollfd p{fd, events, 0};
		int n = ::poll(&p, 1, ms);
		if (n > 0)
			return true;
		if (n == 0) {
			if (ms == 0 || Clock::now() >= deadline)
				return false;
			continue;
		}
		if (errno != EINTR)
			throw Error(op, errno, "poll");
	}
}

/* Room for a whole message after the buffered bytes. */
constexpr std::size_t buffer_size = 8 * max_message;

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

void Channel::send(std::span<const iovec> iov_in, Clock::time_point deadline, const char *op)
{
	if (!fd_)
		throw Error(op, ENOTCONN, "the session is closed");
	/* A local copy, advanced past what a partial send took. */
	std::vector<iovec> iov(iov_in.begin(), iov_in.end());
	std::size_t i = 0;
	while (i < iov.size() && iov[i].iov_len == 0)
		i++;
	while (i < iov.size()) {
		msghdr m{};
		m.msg_iov = iov.data() + i;
		m.msg_iovlen = iov.size() - i;
		ssize_t n = ::sendmsg(fd_.get(), &m, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				throw Error(op, errno, "sendmsg");
			if (!wait_for(fd_.get(), POLLOUT, deadline, op))
				throw Error(op, ETIMEDOUT, "the VMM does not read its socket");
			continue;
		}
		auto left = std::size_t(n);
		while (i < iov.size() && left >= iov[i].iov_len)
			left -= iov[i++].iov_len;
		if (left) {
			iov[i].iov_base = static_cast<char *>(iov[i].iov_base) + left;
			iov[i].iov_len -= left;
		}
		while (i < iov.size() && iov[i].iov_len == 0)
			i++;
	}
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
	for (;;) {
		ssize_t n = ::recv(fd_.get(), buf_.data() + end_, buf_.size() - end_, MSG_DONTWAIT);
		if (n > 0) {
			end_ += std::size_t(n);
			return Fill::data;
		}
		if (n == 0)
			return Fill::eof;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN)
			return Fill::none;
		if (errno == ECONNRESET)
			return Fill::eof;
		throw Error(op, errno, "recv");
	}
}

bool Channel::wait_readable(Clock::time_point deadline, const char *op)
{
	if (!fd_)
		throw Error(op, ENOTCONN, "the session is closed");
	return wait_for(fd_.get(), POLLIN, deadline, op);
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
