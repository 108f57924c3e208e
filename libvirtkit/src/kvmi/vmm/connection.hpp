// SPDX-License-Identifier: MIT
/*
 * Internal: the VMM's end of one KVMI connection - connecting to the tool's
 * unix or vsock socket, the QEMU-style handshake, and message framing.
 *
 * Reads happen on one thread at a time (the handshake, then whichever
 * thread holds the server's read role: its reader thread, or a vCPU thread
 * that polls for its event's reply), into a buffer that holds whatever the
 * socket had, so a window of pipelined commands costs one recv(). Sends
 * come from the read role's holder (command replies) and from vCPU threads
 * (events), whole messages per call under a lock, so messages never
 * interleave; replies may also be queued and flush()ed together in one
 * sendmsg(). Every blocking call also waits on an eventfd that
 * cancel() signals, so no thread stays blocked on a tool that stopped
 * reading or writing.
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <span>
#include <stop_token>
#include <vector>

#include <virtkit/fd.hpp>

#include "kvmi/protocol/framing.hpp"
#include "kvmi/vmm/wire.hpp"

namespace virtkit::detail::kvmi {

class Connection {
public:
	/*
	 * Connect to the tool, send hello, read its answer and check the
	 * cookie hash (constant time); with no cookie_hash (no secret) any
	 * answer of a valid size is accepted, as QEMU does. Throws Error("KVMI handshake", errno,
	 * why): ETIMEDOUT after deadline, EACCES for a wrong cookie, EPROTO for
	 * a malformed answer, ECANCELED once stop is requested, the socket's
	 * errno otherwise.
	 */
	static std::unique_ptr<Connection> open(const Address &address,
						const kvmi_qemu2introspector &hello,
						const CookieHash *cookie_hash,
						Clock::time_point deadline,
						std::stop_token stop = {});

	Connection(const Connection &) = delete;
	Connection &operator=(const Connection &) = delete;

	/*
	 * Read exactly n bytes. false on end of stream, a socket error, the
	 * deadline or cancel(): the connection is then unusable.
	 */
	bool read_exact(void *buf, std::size_t n,
			Clock::time_point deadline = Clock::time_point::max());
	/*
	 * Read what the socket has now, without waiting, into the buffer
	 * (whose bytes stay in place): 1 bytes came, 0 nothing yet (or the
	 * buffer is full), -1 the end of the stream or a socket error.
	 */
	int fill() noexcept;
	/*
	 * Wait until the socket has bytes (or its end) without reading them;
	 * false on cancel(). The buffer is not looked at: a caller that does
	 * not hold the read role may call it.
	 */
	bool wait_socket_readable();
	/*
	 * Send one message: hdr followed by parts (hdr.size must be their
	 * total). false if the connection failed or was cancelled.
	 */
	bool send(const kvmi_msg_hdr &hdr, Parts parts);
	/*
	 * Whether reading the next message needs no more bytes from the
	 * socket: a whole message is buffered, or a header whose size is over
	 * KVMI_MSG_SIZE (the reader rejects it without reading on).
	 */
	bool message_buffered() const noexcept;
	/* Whether bytes of a message are buffered but not the whole of it. */
	bool partial_message() const noexcept { return head_ < tail_ && !message_buffered(); }
	/* Reader thread: queue one message for flush(); hdr.size must be the parts' total. */
	void queue(const kvmi_msg_hdr &hdr, Parts parts);
	/* Bytes queued and not sent yet. */
	std::size_t queued() const noexcept { return out_.size(); }
	/*
	 * Send the queued messages in one sendmsg() where the socket takes
	 * them (under the send lock: an event never lands inside them). false
	 * if the connection failed or was cancelled; the queue is empty then.
	 */
	bool flush();
	/*
	 * send() with fds attached (SCM_RIGHTS, with the message's first
	 * byte); reader thread, nothing queued. false as send().
	 */
	bool send_with_fds(const kvmi_msg_hdr &hdr, Parts parts, std::span<const int> fds);
	/* Whether the socket can carry descriptors (a unix socket). */
	bool can_pass_fds() const noexcept;
	/* Make every blocked and later call fail, and the tool see the end. */
	void cancel() noexcept;

private:
	Connection(FileDesc sock, FileDesc efd) noexcept
		: sock_(std::move(sock)), efd_(std::move(efd)) {}
	/* poll for events on the socket; false on cancel, error or timeout. */
	bool wait(short events, Clock::time_point deadline, bool *timed_out = nullptr);

	FileDesc sock_;
	FileDesc efd_;
	std::mutex send_mu_;
	/* Bytes received but not consumed yet (reader side only). */
	std::array<std::byte, 16384> buf_;
	std::size_t head_ = 0, tail_ = 0;
	/* Replies queued by the reader, not sent yet (reader side only). */
	std::vector<std::byte> out_;
};

} // namespace virtkit::detail::kvmi
