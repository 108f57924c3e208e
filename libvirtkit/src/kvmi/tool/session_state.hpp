// SPDX-License-Identifier: MIT
/*
 * Internal: the state behind a Session - its channel, the command sequence
 * counter, the queue of events received while nobody asked for them, and
 * whether the connection is still usable.
 *
 * Any protocol failure (framing, an unexpected message, a timeout, the peer
 * closing) ends the session: fail() shuts the socket down, so the VMM
 * resumes its waiting vCPUs at once, records why, and throws. The descriptor
 * itself stays open until the Session is destroyed, because an event loop
 * may still have a poll on it.
 */
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <virtkit/introspect.hpp>

#include "kvmi/tool/channel.hpp"
#include "kvmi/tool/requests.hpp"

namespace virtkit::introspect::detail {

struct ReplyView {
	std::int32_t err;
	std::span<const std::byte> data; /* valid until the next receive */
};

struct SessionState {
	SessionState(Channel ch, HandshakeInfo hi, const SessionOptions &opts)
		: channel(std::move(ch)), info(std::move(hi)), options(opts) {}
	~SessionState() { closing(); }
	SessionState(const SessionState &) = delete;
	SessionState &operator=(const SessionState &) = delete;

	Channel channel;
	HandshakeInfo info;
	SessionOptions options;
	std::uint32_t seq = 0;
	std::deque<Event> events;
	bool connected = true;
	std::string reason;
	/* A reply handed out as a view, consumed before the next receive. */
	std::size_t release_pending = 0;
	/* Called once, before the socket is closed (Session::close(), or the
	 * state destroyed): the event loop stops watching it then - epoll
	 * cannot remove a closed descriptor whose number may be reused. */
	std::function<void()> before_close;

	void closing() noexcept
	{
		if (auto f = std::exchange(before_close, nullptr))
			f();
	}

	std::uint32_t next_seq() noexcept { return ++seq; }
	Clock::time_point command_deadline() const
	{
		return deadline_after(options.command_timeout);
	}
	void ensure_connected(const char *op) const;
	/* End the session and throw e. */
	[[noreturn]] void fail(const Error &e);
	/* End the session without throwing. */
	void disconnect(std::string why) noexcept;

	/* One message: header and parts, in one sendmsg. */
	void send_message(std::uint16_t id, std::uint32_t seq, kvmi::Parts parts, const char *op);
	/* Raw bytes, in one sendmsg. */
	void send_raw_bytes(std::span<const iovec> iov, const char *op);
	/* Receive until the reply to (id, seq) arrives; events are queued. */
	ReplyView wait_reply(std::uint16_t id, std::uint32_t seq, const char *op);
	/* send_message + wait_reply with a fresh seq. */
	ReplyView transact(const Request &request, const char *op);

	/* Queue the complete events already buffered; anything else fails. */
	void drain_buffered(const char *op);
	/* Read what the socket has (nonblocking) and queue its events; never
	 * throws: a failure disconnects. For the event loop. */
	void pump() noexcept;
	/* Wait for one event up to deadline. */
	std::optional<Event> next_event(Clock::time_point deadline, const char *op);

private:
	void release() noexcept;
	void queue_event(const Channel::Message &m, const char *op);
	/* One fill(); EOF fails the session, "none" waits for readability until
	 * deadline (false: the deadline passed). */
	bool receive_more(Clock::time_point deadline, const char *op, const char *timeout_what);
};

/* Send the handshake's answer and make the session. */
std::unique_ptr<SessionState> finish_handshake(Channel channel, const HandshakeInfo &info,
					       std::string_view secret,
					       const SessionOptions &options,
					       Clock::time_point deadline);

/* The event in a KVMI_EVENT message's payload; Error(op, EPROTO) if malformed. */
Event parse_event(std::span<const std::byte> payload, std::uint32_t seq, const char *op);

} // namespace virtkit::introspect::detail
