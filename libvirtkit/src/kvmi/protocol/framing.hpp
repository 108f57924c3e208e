// SPDX-License-Identifier: MIT
/*
 * Internal: moving KVMI messages over a stream socket, for both ends.
 *
 * Both ends keep their sockets nonblocking and wait in poll(2), each with
 * its own reason to stop waiting: the tool at a deadline, the VMM also when
 * cancel() signals its eventfd. What is common is here: the deadline
 * arithmetic, the poll, one nonblocking recv, and sending one whole
 * message - header and payload parts in one sendmsg() where the socket
 * takes it all, as the protocol asks - past partial sends, EINTR and a full
 * socket buffer, with MSG_NOSIGNAL (a peer that went away is EPIPE, not
 * SIGPIPE).
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <initializer_list>
#include <span>

namespace virtkit::detail::kvmi {

using Clock = std::chrono::steady_clock;

/* now + timeout, saturating: a timeout too long to add is no deadline
 * (Clock::time_point::max()); a negative one is now. */
Clock::time_point deadline_after(std::chrono::milliseconds timeout) noexcept;

enum class Ready { yes, timeout, cancelled, error };

/*
 * poll(2) fd for events until deadline (Clock::time_point::max(): none),
 * and cancel_fd for POLLIN if it is >= 0; again after EINTR. yes also for
 * POLLHUP and POLLERR: the recv or send that follows reports them. error:
 * poll failed, errno says why.
 */
Ready wait_ready(int fd, short events, Clock::time_point deadline, int cancel_fd = -1) noexcept;

/*
 * One recv(MSG_DONTWAIT) into buf, again after EINTR: the bytes received
 * (> 0), 0 at the end of the stream (ECONNRESET too), -EAGAIN when nothing
 * is there yet, -errno when it failed.
 */
ssize_t recv_some(int fd, std::span<std::byte> buf) noexcept;

/* Advance iov past the first n bytes (what a sendmsg() took). */
void advance_iov(std::span<iovec> &iov, std::size_t n) noexcept;

/*
 * Send what the socket takes of iov now (sendmsg(MSG_NOSIGNAL |
 * MSG_DONTWAIT), again after EINTR), advancing iov past it: 0 once all of
 * it is sent, EAGAIN when the socket buffer is full with bytes left, or
 * the errno of a failed sendmsg (the stream is then out of step).
 */
int send_some(int fd, std::span<iovec> &iov) noexcept;

/*
 * Send all of iov; while the socket buffer is full, wait_writable() waits
 * and says whether to go on (true) or give up (false). Returns 0, EAGAIN
 * when wait_writable() gave up, or the errno of a failed sendmsg.
 */
template <class Wait> int send_all(int fd, std::span<iovec> iov, Wait &&wait_writable)
{
	for (;;) {
		int err = send_some(fd, iov);
		if (err != EAGAIN)
			return err;
		if (!wait_writable())
			return EAGAIN;
	}
}

using Parts = std::initializer_list<std::span<const std::byte>>;

/* The bytes of parts, together. */
std::size_t parts_size(Parts parts) noexcept;

/* A message's iovecs: its header, then its non-empty payload parts. */
inline constexpr std::size_t max_message_iov = 8;
/* hdr and the non-empty parts in iov; how many, or 0 when they do not fit
 * or hdr.size is not the parts' total. hdr and parts are not copied. */
std::size_t message_iov(const kvmi_msg_hdr &hdr, Parts parts,
			std::span<iovec, max_message_iov> iov) noexcept;

/*
 * Send one whole message, hdr then parts (hdr.size must be their total),
 * as send_all(); EINVAL (nothing sent) for a header that does not match
 * the parts or more parts than fit.
 */
template <class Wait>
int send_message(int fd, const kvmi_msg_hdr &hdr, Parts parts, Wait &&wait_writable)
{
	iovec iov[max_message_iov];
	std::size_t n = message_iov(hdr, parts, iov);
	if (!n)
		return EINVAL;
	return send_all(fd, std::span(iov, n), wait_writable);
}

} // namespace virtkit::detail::kvmi
