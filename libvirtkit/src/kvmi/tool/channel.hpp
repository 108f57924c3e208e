// SPDX-License-Identifier: MIT
/*
 * Internal: one KVMI connection's socket - sending whole messages and
 * framing what arrives.
 *
 * Reading is nonblocking (MSG_DONTWAIT) into the channel's own buffer, so
 * the same socket can be read by a command waiting for its reply and by an
 * event loop that was told the socket is readable: whoever reads takes what
 * is there, and complete messages stay in the buffer until someone consumes
 * them. A message's size comes from the peer and is checked against
 * KVMI_MSG_SIZE before anything waits for that many bytes.
 */
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <sys/uio.h>
#include <vector>

#include <virtkit/fd.hpp>

#include "kvmi/protocol/framing.hpp"
#include "kvmi/tool/wire.hpp"

namespace virtkit::introspect::detail {

using kvmi::Clock;
using kvmi::deadline_after;

class Channel {
public:
	struct Message {
		kvmi_msg_hdr hdr;
		std::span<const std::byte> payload; /* valid until fill() or consume() */
		std::size_t total() const noexcept { return msg_hdr_size + hdr.size; }
	};
	enum class Fill { data, none, eof };

	Channel() = default;
	/* Takes a connected stream socket and makes it nonblocking. */
	explicit Channel(FileDesc socket);

	int fd() const noexcept { return fd_.get(); }
	explicit operator bool() const noexcept { return bool(fd_); }
	/* Both directions, now: the peer sees the connection end; the fd stays
	 * open (an io_uring poll may still refer to it) until close(). */
	void shutdown() noexcept;
	void close() noexcept;

	/* All of iov: one sendmsg(MSG_NOSIGNAL) unless the socket is full,
	 * then the rest as it drains, until deadline (ETIMEDOUT). */
	void send(std::span<const iovec> iov, Clock::time_point deadline, const char *op);
	/* One message, hdr then parts (hdr.size is their total), likewise. */
	void send(const kvmi_msg_hdr &hdr, kvmi::Parts parts, Clock::time_point deadline,
		  const char *op);
	/*
	 * What recvmsg(MSG_DONTWAIT) brings: data, nothing yet, or end of
	 * stream. Descriptors that come with the data (SCM_RIGHTS) are kept
	 * for take_fds() while accept_fds(true), else closed at once.
	 */
	Fill fill(const char *op);
	void accept_fds(bool on) noexcept;
	/* The descriptors received since accept_fds(true), in order. */
	std::vector<FileDesc> take_fds() noexcept { return std::move(fds_); }
	/* Whether descriptors were lost (MSG_CTRUNC) since accept_fds(true). */
	bool fds_truncated() const noexcept { return fds_truncated_; }
	/* Until the socket is readable; false at deadline. */
	bool wait_readable(Clock::time_point deadline, const char *op);

	std::span<const std::byte> buffered() const noexcept
	{
		return {buf_.data() + begin_, end_ - begin_};
	}
	void consume(std::size_t n) noexcept;
	/* The first buffered message, if complete; EMSGSIZE for a size above
	 * KVMI_MSG_SIZE. */
	std::optional<Message> peek_message(const char *op) const;

private:
	/* For send_all(): wait until the socket takes more, false at deadline. */
	bool wait_writable(Clock::time_point deadline, const char *op);
	/* recv_some() with SCM_RIGHTS handling (fill()). */
	ssize_t receive(std::span<std::byte> buf) noexcept;
	/* Throw what send_all() returned, if anything. */
	static void sent(int err, const char *op);

	FileDesc fd_;
	std::vector<std::byte> buf_;
	std::size_t begin_ = 0, end_ = 0;
	bool accept_fds_ = false, fds_truncated_ = false;
	std::vector<FileDesc> fds_;
};

} // namespace virtkit::introspect::detail
