// SPDX-License-Identifier: MIT
#include "kvmi/protocol/framing.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <climits>

namespace virtkit::detail::kvmi {

Clock::time_point deadline_after(std::chrono::milliseconds timeout) noexcept
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

/* poll(2)'s timeout until deadline: -1 for none, 0 once it passed. */
int poll_ms(Clock::time_point deadline)
{
	if (deadline == Clock::time_point::max())
		return -1;
	auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
	if (left.count() <= 0)
		return 0;
	return left.count() > INT_MAX ? INT_MAX : int(left.count());
}

} // namespace

Ready wait_ready(int fd, short events, Clock::time_point deadline, int cancel_fd) noexcept
{
	for (;;) {
		int ms = poll_ms(deadline);
		pollfd p[2] = {{fd, events, 0}, {cancel_fd, POLLIN, 0}};
		int n = ::poll(p, cancel_fd >= 0 ? 2 : 1, ms);
		if (n > 0)
			return p[1].revents ? Ready::cancelled : Ready::yes;
		if (n == 0) {
			/* Early (a timeout clamped to INT_MAX ms): wait on. */
			if (ms == 0 || Clock::now() >= deadline)
				return Ready::timeout;
			continue;
		}
		if (errno != EINTR)
			return Ready::error;
	}
}

ssize_t recv_some(int fd, std::span<std::byte> buf) noexcept
{
	for (;;) {
		ssize_t n = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno == ECONNRESET)
			return 0;
		return -errno;
	}
}

void advance_iov(std::span<iovec> &iov, std::size_t n) noexcept
{
	while (!iov.empty() && n >= iov.front().iov_len) {
		n -= iov.front().iov_len;
		iov = iov.subspan(1);
	}
	if (n) {
		iov.front().iov_base = static_cast<char *>(iov.front().iov_base) + n;
		iov.front().iov_len -= n;
	}
}

int send_some(int fd, std::span<iovec> &iov) noexcept
{
	auto skip_empty = [&] {
		while (!iov.empty() && iov.front().iov_len == 0)
			iov = iov.subspan(1);
	};
	skip_empty();
	while (!iov.empty()) {
		msghdr m{};
		m.msg_iov = iov.data();
		m.msg_iovlen = iov.size();
		ssize_t n = ::sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		/* A partial send (a full socket buffer): on from where it stopped. */
		advance_iov(iov, std::size_t(n));
		skip_empty();
	}
	return 0;
}

std::size_t parts_size(Parts parts) noexcept
{
	std::size_t size = 0;
	for (auto &p : parts)
		size += p.size();
	return size;
}

std::size_t message_iov(const kvmi_msg_hdr &hdr, Parts parts,
			std::span<iovec, max_message_iov> iov) noexcept
{
	if (parts_size(parts) != hdr.size)
		return 0;
	std::size_t n = 0;
	iov[n++] = {const_cast<kvmi_msg_hdr *>(&hdr), sizeof(hdr)};
	for (auto &p : parts) {
		if (p.empty())
			continue;
		if (n == iov.size())
			return 0;
		iov[n++] = {const_cast<std::byte *>(p.data()), p.size()};
	}
	return n;
}

} // namespace virtkit::detail::kvmi
