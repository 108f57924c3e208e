// SPDX-License-Identifier: MIT
/*
 * Session: the handshake, the command/reply transport, events and event
 * replies, and raw access. The typed commands are in commands.cpp.
 */
#include <virtkit/introspect.hpp>

#include <cerrno>
#include <cstring>
#include <utility>

#include "kvmi/tool/handshake.hpp"
#include "kvmi/tool/names.hpp"
#include "kvmi/tool/session_state.hpp"

namespace virtkit::introspect {

using namespace detail;

namespace detail {

namespace {

std::string ms_text(std::chrono::milliseconds t)
{
	return std::to_string(t.count()) + " ms";
}

std::string unexpected(const kvmi_msg_hdr &h)
{
	return "unexpected message id " + std::to_string(h.id) + " (" + command_name(h.id) +
	       ") seq " + std::to_string(h.seq) + " size " + std::to_string(h.size);
}

/* The event-specific struct T at the start of data. */
template <class T> T specific(std::span<const std::byte> data, const char *what, const char *op)
{
	if (data.size() < sizeof(T))
		throw Error(op, EPROTO,
			    std::string(what) + " event data of " + std::to_string(data.size()) +
				    " bytes, expected " + std::to_string(sizeof(T)));
	return load<T>(data);
}

[[noreturn]] void bad_padding(const char *what, const char *op)
{
	throw Error(op, EPROTO, std::string("non-zero padding in ") + what);
}

} // namespace

Event parse_event(std::span<const std::byte> payload, std::uint32_t seq, const char *op)
{
	if (payload.size() < sizeof(kvmi_event))
		throw Error(op, EPROTO,
			    "event of " + std::to_string(payload.size()) +
				    " bytes, shorter than struct kvmi_event (" +
				    std::to_string(sizeof(kvmi_event)) + ")");
	auto c = load<kvmi_event>(payload);
	/* A newer VMM may send a longer common part; the specific data follows
	 * it wherever it ends. */
	if (c.size < sizeof(kvmi_event) || c.size > payload.size())
		throw Error(op, EPROTO,
			    "kvmi_event.size " + std::to_string(c.size) + " in a message of " +
				    std::to_string(payload.size()) + " bytes");
	if (!zero(c.padding) || !zero(c.arch.padding1) || !zero(c.arch.padding2))
		bad_padding("struct kvmi_event", op);

	Event ev;
	ev.seq = seq;
	ev.vcpu = c.vcpu;
	ev.id = EventId(c.event);
	ev.arch.mode = c.arch.mode;
	ev.arch.view = c.arch.view;
	ev.arch.regs = c.arch.regs;
	ev.arch.sregs = c.arch.sregs;
	const auto &m = c.arch.msrs;
	ev.arch.msrs = EventMsrs{m.sysenter_cs, m.sysenter_esp, m.sysenter_eip, m.efer, m.star,
				 m.lstar, m.cstar, m.pat, m.shadow_gs};

	auto data = payload.subspan(c.size);
	switch (c.event) {
	case KVMI_EVENT_MSR: {
		auto s = specific<kvmi_event_msr>(data, "MSR", op);
		if (!zero(s.padding))
			bad_padding("struct kvmi_event_msr", op);
		ev.data = MsrEvent{s.msr, s.old_value, s.new_value};
		break;
	}
	case KVMI_EVENT_PF: {
		auto s = specific<kvmi_event_pf>(data, "PF", op);
		if (!zero(s.padding1) || !zero(s.padding2))
			bad_padding("struct kvmi_event_pf", op);
		ev.data = PfEvent{s.gva, s.gpa, s.access, s.view};
		break;
	}
	case KVMI_EVENT_BREAKPOINT: {
		auto s = specific<kvmi_event_breakpoint>(data, "BREAKPOINT", op);
		if (!zero(s.padding))
			bad_padding("struct kvmi_event_breakpoint", op);
		ev.data = BreakpointEvent{s.gpa, s.insn_len};
		break;
	}
	case KVMI_EVENT_TRAP: {
		auto s = specific<kvmi_event_trap>(data, "TRAP", op);
		if (!zero(s.padding1) || !zero(s.padding2))
			bad_padding("struct kvmi_event_trap", op);
		ev.data = TrapEvent{s.vector, s.error_code, s.cr2};
		break;
	}
	case KVMI_EVENT_SINGLESTEP: {
		auto s = specific<kvmi_event_singlestep>(data, "SINGLESTEP", op);
		if (!zero(s.padding))
			bad_padding("struct kvmi_event_singlestep", op);
		ev.data = SinglestepEvent{s.failed != 0};
		break;
	}
	default:
		/* No data (PAUSE_VCPU, CREATE_VCPU, UNHOOK) or an event this
		 * library does not decode: the tool still has to reply. */
		break;
	}
	return ev;
}

void SessionState::ensure_connected(const char *op) const
{
	if (!connected)
		throw Error(op, ENOTCONN,
			    reason.empty() ? std::string("the session has ended")
					   : "the session has ended: " + reason);
}

void SessionState::disconnect(std::string why) noexcept
{
	if (!connected)
		return;
	connected = false;
	reason = std::move(why);
	channel.shutdown();
}

void SessionState::fail(const Error &e)
{
	disconnect(e.what());
	throw e;
}

void SessionState::release() noexcept
{
	channel.consume(std::exchange(release_pending, 0));
}

void SessionState::send_message(std::uint16_t id, std::uint32_t msg_seq, kvmi::Parts parts,
				const char *op)
{
	ensure_connected(op);
	std::size_t size = kvmi::parts_size(parts);
	if (size > 0xffff)
		throw Error(op, EMSGSIZE,
			    std::to_string(size) + " bytes do not fit kvmi_msg_hdr.size");
	kvmi_msg_hdr hdr{};
	hdr.id = id;
	hdr.size = std::uint16_t(size);
	hdr.seq = msg_seq;
	try {
		channel.send(hdr, parts, command_deadline(), op);
	} catch (const Error &e) {
		/* Part of a message may have gone: the stream is out of step. */
		fail(e);
	}
}

void SessionState::send_raw_bytes(std::span<const iovec> iov, const char *op)
{
	ensure_connected(op);
	try {
		channel.send(iov, command_deadline(), op);
	} catch (const Error &e) {
		/* Part of a message may have gone: the stream is out of step. */
		fail(e);
	}
}

bool SessionState::receive_more(Clock::time_point deadline, const char *op,
				const char *timeout_what)
{
	for (;;) {
		switch (channel.fill(op)) {
		case Channel::Fill::data:
			return true;
		case Channel::Fill::eof:
			throw Error(op, ECONNRESET, "the VMM closed the connection");
		case Channel::Fill::none:
			if (channel.wait_readable(deadline, op))
				continue;
			if (!timeout_what)
				return false;
			throw Error(op, ETIMEDOUT,
				    std::string(timeout_what) + " within " +
					    ms_text(options.command_timeout));
		}
	}
}

void SessionState::queue_event(const Channel::Message &m, const char *op)
{
	if (events.size() >= options.max_queued_events)
		throw Error(op, ENOBUFS,
			    "more than " + std::to_string(options.max_queued_events) +
				    " events queued");
	events.push_back(parse_event(m.payload, m.hdr.seq, op));
}

ReplyView SessionState::wait_reply(std::uint16_t id, std::uint32_t msg_seq, const char *op)
{
	ensure_connected(op);
	release();
	auto deadline = command_deadline();
	try {
		for (;;) {
			while (auto m = channel.peek_message(op)) {
				if (m->hdr.id == KVMI_EVENT) {
					queue_event(*m, op);
					channel.consume(m->total());
					continue;
				}
				if (m->hdr.id != id || m->hdr.seq != msg_seq)
					throw Error(op, EPROTO,
						    unexpected(m->hdr) + " while waiting for seq " +
							    std::to_string(msg_seq));
				if (m->payload.size() < sizeof(kvmi_error_code))
					throw Error(op, EPROTO,
						    "reply of " + std::to_string(m->payload.size()) +
							    " bytes, shorter than struct kvmi_error_code");
				auto ec = load<kvmi_error_code>(m->payload);
				if (!zero(ec.padding))
					throw Error(op, EPROTO, "non-zero padding in struct kvmi_error_code");
				/* 0 or minus a KVMI_E* value; anything else (and
				 * INT32_MIN, which has no positive) is not a reply. */
				if (ec.err > 0 || ec.err < -0xffff)
					throw Error(op, EPROTO,
						    "error code " + std::to_string(ec.err) +
							    " out of range");
				release_pending = m->total();
				return {ec.err, m->payload.subspan(sizeof(kvmi_error_code))};
			}
			receive_more(deadline, op, "no reply");
		}
	} catch (const Error &e) {
		fail(e);
	}
}

ReplyView SessionState::transact(const Request &request, const char *op)
{
	auto s = next_seq();
	send_message(request.id(), s, {request.head(), request.tail()}, op);
	return wait_reply(request.id(), s, op);
}

void SessionState::drain_buffered(const char *op)
{
	release();
	try {
		while (auto m = channel.peek_message(op)) {
			if (m->hdr.id != KVMI_EVENT)
				throw Error(op, EPROTO, unexpected(m->hdr) + " (no command waits for a reply)");
			queue_event(*m, op);
			channel.consume(m->total());
		}
	} catch (const Error &e) {
		fail(e);
	}
}

void SessionState::pump() noexcept
{
	const char *op = "KVMI receive";
	if (!connected)
		return;
	try {
		for (;;) {
			drain_buffered(op);
			switch (channel.fill(op)) {
			case Channel::Fill::data:
				continue;
			case Channel::Fill::none:
				return;
			case Channel::Fill::eof:
				drain_buffered(op);
				disconnect("the VMM closed the connection");
				return;
			}
		}
	} catch (const Error &e) {
		disconnect(e.what());
	} catch (const std::bad_alloc &) {
		disconnect("out of memory");
	}
}

std::optional<Event> SessionState::next_event(Clock::time_point deadline, const char *op)
{
	ensure_connected(op);
	drain_buffered(op);
	try {
		for (;;) {
			if (!events.empty()) {
				Event ev = std::move(events.front());
				events.pop_front();
				return ev;
			}
			if (!receive_more(deadline, op, nullptr))
				return std::nullopt;
			drain_buffered(op);
		}
	} catch (const Error &e) {
		fail(e);
	}
}

std::unique_ptr<SessionState> finish_handshake(Channel channel, const HandshakeInfo &info,
					       std::string_view secret,
					       const SessionOptions &options,
					       Clock::time_point deadline)
{
	auto answer = kvmi::handshake_answer(secret);
	iovec iov{&answer, sizeof(answer)};
	channel.send({&iov, 1}, deadline, "KVMI handshake");
	return std::make_unique<SessionState>(std::move(channel), info, options);
}

} // namespace detail

/* --- Session --- */

Session::Session() noexcept = default;
Session::Session(std::unique_ptr<SessionState> state) noexcept : state_(std::move(state)) {}
Session::Session(Session &&other) noexcept = default;
Session &Session::operator=(Session &&other) noexcept = default;
Session::~Session() = default;

SessionState &Session::state() const
{
	if (!state_)
		throw Error("Session", ENOTCONN, "an empty (moved-from) Session");
	return *state_;
}

Session Session::handshake(FileDesc socket, std::string_view secret,
			   std::chrono::milliseconds timeout, const SessionOptions &options)
{
	const char *op = "KVMI handshake";
	auto deadline = deadline_after(timeout);
	Channel ch(std::move(socket));
	HandshakeReader reader;
	for (;;) {
		ch.consume(reader.feed(ch.buffered()));
		if (reader.done())
			break;
		switch (ch.fill(op)) {
		case Channel::Fill::data:
			break;
		case Channel::Fill::eof:
			throw Error(op, ECONNRESET, "the VMM closed the connection");
		case Channel::Fill::none:
			if (!ch.wait_readable(deadline, op))
				throw Error(op, ETIMEDOUT, "no handshake within " + ms_text(timeout));
			break;
		}
	}
	return Session(finish_handshake(std::move(ch), reader.info(), secret, options, deadline));
}

Session Session::accept(Listener &listener, std::string_view secret,
			std::chrono::milliseconds timeout, const SessionOptions &options)
{
	auto deadline = deadline_after(timeout);
	auto fd = listener.accept(timeout);
	auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
	if (deadline == Clock::time_point::max())
		left = timeout;
	return handshake(std::move(fd), secret, std::max(left, std::chrono::milliseconds(0)),
			 options);
}

const HandshakeInfo &Session::info() const
{
	return state().info;
}

bool Session::connected() const noexcept
{
	return state_ && state_->connected;
}

const std::string &Session::disconnect_reason() const
{
	static const std::string empty_session = "an empty (moved-from) Session";
	return state_ ? state_->reason : empty_session;
}

int Session::fd() const noexcept
{
	return state_ ? state_->channel.fd() : -1;
}

void Session::close() noexcept
{
	if (!state_)
		return;
	state_->disconnect("closed by the tool");
	state_->closing();
	state_->channel.close();
}

std::optional<Event> Session::next_event(std::chrono::milliseconds timeout)
{
	return state().next_event(deadline_after(timeout), "KVMI event");
}

std::size_t Session::pending_events() const noexcept
{
	return state_ ? state_->events.size() : 0;
}

namespace {

void send_event_reply(SessionState &s, const Event &ev, Action action,
		      std::span<const std::byte> specific)
{
	auto vcpu = vcpu_hdr(ev.vcpu);
	kvmi_event_reply common{};
	common.action = std::uint8_t(action);
	common.event = std::uint8_t(ev.id);
	s.send_message(KVMI_EVENT_REPLY, ev.seq, {bytes_of(vcpu), bytes_of(common), specific},
		       "KVMI_EVENT_REPLY");
}

} // namespace

void Session::reply(const Event &event, Action action)
{
	switch (event.id) {
	case EventId::msr: {
		auto *m = event.get<MsrEvent>();
		reply_msr(event, action, m ? m->new_value : 0);
		return;
	}
	case EventId::pf:
		reply_pf(event, action);
		return;
	default:
		send_event_reply(state(), event, action, {});
	}
}

void Session::reply_msr(const Event &event, Action action, std::uint64_t new_value)
{
	if (event.id != EventId::msr)
		throw Error("KVMI_EVENT_REPLY", EINVAL,
			    "reply_msr to a " + event_name(event.id) + " event");
	kvmi_event_msr_reply r{};
	r.new_val = new_value;
	send_event_reply(state(), event, action, bytes_of(r));
}

void Session::reply_pf(const Event &event, Action action)
{
	if (event.id != EventId::pf)
		throw Error("KVMI_EVENT_REPLY", EINVAL,
			    "reply_pf to a " + event_name(event.id) + " event");
	kvmi_event_pf_reply r{};
	send_event_reply(state(), event, action, bytes_of(r));
}

/* --- raw access --- */

RawReply Session::request_raw(std::uint16_t id, std::span<const std::byte> payload)
{
	/* The VMM takes id 0 as an event reply: it never answers. */
	if (id == KVMI_EVENT_REPLY)
		throw Error("KVMI raw message", EINVAL,
			    "id 0 (KVMI_EVENT_REPLY) gets no reply; use send_raw()");
	auto seq = send_raw(id, payload);
	return receive_raw(id, seq);
}

std::uint32_t Session::send_raw(std::uint16_t id, std::span<const std::byte> payload)
{
	/*
	 * The VMM answers id 1 as any unknown command, with a reply of id 1:
	 * KVMI_EVENT, which no reader can tell from an event. Refused before
	 * anything is sent (send_bytes() still sends it, for hostile tests).
	 */
	if (id == KVMI_EVENT)
		throw Error("KVMI raw message", EINVAL,
			    "id 1 is KVMI_EVENT, the VMM's: its reply would read as an event");
	auto &s = state();
	auto seq = s.next_seq();
	s.send_message(id, seq, {payload}, "KVMI raw message");
	return seq;
}

RawReply Session::receive_raw(std::uint16_t id, std::uint32_t seq)
{
	auto r = state().wait_reply(id, seq, "KVMI raw reply");
	return RawReply{r.err, {r.data.begin(), r.data.end()}};
}

void Session::send_bytes(std::span<const std::byte> bytes)
{
	iovec iov{const_cast<std::byte *>(bytes.data()), bytes.size()};
	state().send_raw_bytes({&iov, 1}, "KVMI raw bytes");
}

bool Session::wait_closed(std::chrono::milliseconds timeout)
{
	const char *op = "KVMI wait for close";
	auto &s = state();
	if (!s.connected)
		return true;
	auto deadline = deadline_after(timeout);
	try {
		for (;;) {
			/* Replies to raw requests nobody waits for are dropped. */
			s.channel.consume(std::exchange(s.release_pending, 0));
			while (auto m = s.channel.peek_message(op)) {
				if (m->hdr.id == KVMI_EVENT && s.events.size() < s.options.max_queued_events)
					s.events.push_back(parse_event(m->payload, m->hdr.seq, op));
				s.channel.consume(m->total());
			}
			switch (s.channel.fill(op)) {
			case Channel::Fill::data:
				break;
			case Channel::Fill::eof:
				s.disconnect("the VMM closed the connection");
				return true;
			case Channel::Fill::none:
				if (!s.channel.wait_readable(deadline, op))
					return false;
				break;
			}
		}
	} catch (const Error &e) {
		s.fail(e);
	}
}

} // namespace virtkit::introspect
