// SPDX-License-Identifier: MIT
/*
 * EventLoop: one io_uring for every listener, handshake and session.
 *
 * The ring only says when something is ready: IORING_OP_ACCEPT takes a new
 * connection, IORING_OP_POLL_ADD (one shot, re-armed each round) says a
 * socket is readable. Reading stays with the session's own framing code
 * (nonblocking recv into its buffer), so a command issued from a callback
 * may read the same socket: whatever it reads is framed and its events are
 * queued, and the loop dispatches queued events each round whether or not
 * the ring reported anything - a poll can never strand an event that a
 * command already read.
 *
 * Every request carries an id, not a pointer: an entry that went away
 * (a session that ended, a handshake that timed out) turns its late
 * completion into a no-op. Its pending poll is cancelled so the kernel
 * drops its reference to the socket.
 */
#include <virtkit/introspect.hpp>

#include <liburing.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <map>
#include <vector>

#include "kvmi/tool/handshake.hpp"
#include "kvmi/tool/session_state.hpp"

namespace virtkit::introspect {

namespace detail {

namespace {

enum class Kind : std::uint64_t { wake = 1, accept, handshake, session, cancel };

constexpr std::uint64_t tag(Kind k, std::uint64_t id)
{
	return std::uint64_t(k) << 56 | id;
}

Kind kind_of(std::uint64_t user_data)
{
	return Kind(user_data >> 56);
}

std::uint64_t id_of(std::uint64_t user_data)
{
	return user_data & ((std::uint64_t(1) << 56) - 1);
}

/* A failed accept that is not about one connection (EMFILE, ENOMEM...) is
 * retried after a pause rather than in a tight loop. */
constexpr auto accept_retry = std::chrono::milliseconds(100);

static_assert(std::atomic<bool>::is_always_lock_free, "stop() must be async-signal-safe");

} // namespace

struct LoopState {
	struct ListenerEntry {
		Listener listener;
		std::string secret;
		SessionOptions options;
		bool armed = false;
		Clock::time_point retry_at{};
	};
	struct HandshakeEntry {
		Channel channel;
		HandshakeReader reader;
		std::string secret;
		SessionOptions options;
		Clock::time_point deadline;
		bool armed = false;
	};
	struct SessionEntry {
		Session session;
		bool armed = false;
	};

	LoopState(EventLoop::Handlers h, unsigned entries);
	~LoopState() { io_uring_queue_exit(&ring); }
	LoopState(const LoopState &) = delete;
	LoopState &operator=(const LoopState &) = delete;

	bool run_until(Clock::time_point deadline);
	Session &add(Session session);

	EventLoop::Handlers handlers;
	io_uring ring{};
	FileDesc wake;
	std::atomic<bool> stop_requested{false};
	std::uint64_t next_id = 1;
	bool wake_armed = false;
	std::map<std::uint64_t, ListenerEntry> listeners;
	std::map<std::uint64_t, HandshakeEntry> handshakes;
	std::map<std::uint64_t, SessionEntry> sessions;

private:
	io_uring_sqe *sqe();
	void arm(Clock::time_point now);
	void cancel(std::uint64_t user_data);
	void dispatch();
	void reap();
	void complete(const io_uring_cqe &cqe);
	void accepted(std::uint64_t id, int res);
	void handshake_ready(std::uint64_t id);
	void expire(Clock::time_point now);
	Clock::time_point next_wakeup(Clock::time_point deadline) const;
	void report(const Error &e);
	template <class F> void invoke(Session &session, F &&callback);
	bool idle() const { return listeners.empty() && handshakes.empty() && sessions.empty(); }
};

LoopState::LoopState(EventLoop::Handlers h, unsigned entries) : handlers(std::move(h))
{
	wake = FileDesc::eventfd(0, EFD_NONBLOCK);
	int ret = io_uring_queue_init(entries, &ring, 0);
	if (ret < 0)
		throw Error("io_uring_queue_init", -ret, std::to_string(entries) + " entries");
}

io_uring_sqe *LoopState::sqe()
{
	io_uring_sqe *s = io_uring_get_sqe(&ring);
	if (!s) {
		io_uring_submit(&ring);
		s = io_uring_get_sqe(&ring);
	}
	if (!s)
		throw Error("io_uring_get_sqe", EBUSY, "the submission queue is full");
	return s;
}

void LoopState::cancel(std::uint64_t user_data)
{
	io_uring_sqe *s = sqe();
	io_uring_prep_poll_remove(s, user_data);
	io_uring_sqe_set_data64(s, tag(Kind::cancel, 0));
}

void LoopState::arm(Clock::time_point now)
{
	if (!wake_armed) {
		io_uring_sqe *s = sqe();
		io_uring_prep_poll_add(s, wake.get(), POLLIN);
		io_uring_sqe_set_data64(s, tag(Kind::wake, 0));
		wake_armed = true;
	}
	for (auto &[id, l] : listeners) {
		if (l.armed || now < l.retry_at)
			continue;
		io_uring_sqe *s = sqe();
		io_uring_prep_accept(s, l.listener.fd(), nullptr, nullptr,
				     SOCK_NONBLOCK | SOCK_CLOEXEC);
		io_uring_sqe_set_data64(s, tag(Kind::accept, id));
		l.armed = true;
	}
	for (auto &[id, h] : handshakes) {
		if (h.armed)
			continue;
		io_uring_sqe *s = sqe();
		io_uring_prep_poll_add(s, h.channel.fd(), POLLIN);
		io_uring_sqe_set_data64(s, tag(Kind::handshake, id));
		h.armed = true;
	}
	for (auto &[id, e] : sessions) {
		if (e.armed || !e.session.connected())
			continue;
		io_uring_sqe *s = sqe();
		io_uring_prep_poll_add(s, e.session.fd(), POLLIN);
		io_uring_sqe_set_data64(s, tag(Kind::session, id));
		e.armed = true;
	}
}

void LoopState::report(const Error &e)
{
	if (handlers.on_error)
		handlers.on_error(e);
}

/* A callback's Error that ended its own session is that session's end, told
 * through on_disconnect; anything else is the caller's to handle. */
template <class F> void LoopState::invoke(Session &session, F &&callback)
{
	try {
		callback();
	} catch (const Error &) {
		if (session.connected())
			throw;
	}
}

void LoopState::dispatch()
{
	for (;;) {
		bool any = false;
		std::vector<std::uint64_t> ids;
		for (auto &[id, e] : sessions)
			ids.push_back(id);
		for (auto id : ids) {
			auto it = sessions.find(id);
			if (it == sessions.end() || !it->second.session.connected())
				continue;
			Session &session = it->second.session;
			/* Events a command read while the ring was not looking. */
			SessionState &st = session.state();
			try {
				st.drain_buffered("KVMI receive");
			} catch (const Error &) {
				continue;
			}
			while (session.connected() && !st.events.empty() &&
			       !stop_requested.load()) {
				Event ev = std::move(st.events.front());
				st.events.pop_front();
				any = true;
				if (handlers.on_event)
					invoke(session, [&] { handlers.on_event(session, ev); });
				else
					invoke(session, [&] { session.reply(ev, Action::continue_); });
				/* The callback may have ended this or other sessions;
				 * a std::map keeps this one's address until reap(). */
			}
		}
		reap();
		if (!any || stop_requested.load())
			return;
	}
}

void LoopState::reap()
{
	std::vector<std::uint64_t> ended;
	for (auto &[id, e] : sessions)
		if (!e.session.connected())
			ended.push_back(id);
	for (auto id : ended) {
		auto it = sessions.find(id);
		if (it == sessions.end())
			continue;
		if (it->second.armed)
			cancel(tag(Kind::session, id));
		/*
		 * The same Session object on_session and on_event got (tools
		 * tell sessions apart by address); on_disconnect may add
		 * sessions, which leaves this entry where it is. Erased by id
		 * afterwards, also when the callback throws.
		 */
		Session &session = it->second.session;
		try {
			if (session.state_ && handlers.on_disconnect)
				handlers.on_disconnect(session);
		} catch (...) {
			sessions.erase(id);
			throw;
		}
		sessions.erase(id);
	}
}

void LoopState::accepted(std::uint64_t id, int res)
{
	auto it = listeners.find(id);
	if (it == listeners.end())
		return;
	auto &l = it->second;
	l.armed = false;
	if (res < 0) {
		if (res != -EINTR && res != -ECONNABORTED && res != -EAGAIN)
			l.retry_at = Clock::now() + accept_retry;
		report(Error("accept", -res, l.listener.address()));
		return;
	}
	auto fd = FileDesc::adopt(res, "accept");
	try {
		Channel channel(std::move(fd));
		handshakes.emplace(next_id++,
				   HandshakeEntry{std::move(channel), HandshakeReader{}, l.secret,
						  l.options, deadline_after(l.options.handshake_timeout),
						  false});
	} catch (const Error &e) {
		report(e);
	}
}

void LoopState::handshake_ready(std::uint64_t id)
{
	const char *op = "KVMI handshake";
	auto it = handshakes.find(id);
	if (it == handshakes.end())
		return;
	auto &h = it->second;
	h.armed = false;
	std::unique_ptr<SessionState> state;
	try {
		for (;;) {
			h.channel.consume(h.reader.feed(h.channel.buffered()));
			if (h.reader.done())
				break;
			auto f = h.channel.fill(op);
			if (f == Channel::Fill::none)
				return; /* more later */
			if (f == Channel::Fill::eof)
				throw Error(op, ECONNRESET, "the VMM closed the connection");
		}
		state = finish_handshake(std::move(h.channel), h.reader.info(), h.secret, h.options,
					 h.deadline);
	} catch (const Error &e) {
		handshakes.erase(it);
		report(e);
		return;
	}
	handshakes.erase(it);
	Session &session = add(Session(std::move(state)));
	if (handlers.on_session)
		invoke(session, [&] { handlers.on_session(session); });
}

void LoopState::expire(Clock::time_point now)
{
	std::vector<std::uint64_t> late;
	for (auto &[id, h] : handshakes)
		if (h.deadline <= now)
			late.push_back(id);
	for (auto id : late) {
		auto it = handshakes.find(id);
		auto timeout = it->second.options.handshake_timeout;
		if (it->second.armed)
			cancel(tag(Kind::handshake, id));
		handshakes.erase(it);
		report(Error("KVMI handshake", ETIMEDOUT,
			     "no handshake within " + std::to_string(timeout.count()) + " ms"));
	}
}

void LoopState::complete(const io_uring_cqe &cqe)
{
	auto id = id_of(cqe.user_data);
	switch (kind_of(cqe.user_data)) {
	case Kind::wake: {
		wake_armed = false;
		std::uint64_t v;
		if (::read(wake.get(), &v, sizeof(v)) < 0 && errno != EAGAIN)
			throw Error("read", errno, "the event loop's eventfd");
		break;
	}
	case Kind::accept:
		accepted(id, cqe.res);
		break;
	case Kind::handshake:
		handshake_ready(id);
		break;
	case Kind::session: {
		auto it = sessions.find(id);
		if (it == sessions.end())
			break;
		it->second.armed = false;
		if (cqe.res > 0 && it->second.session.state_)
			it->second.session.state_->pump();
		break;
	}
	case Kind::cancel:
		break;
	}
}

Clock::time_point LoopState::next_wakeup(Clock::time_point deadline) const
{
	auto t = deadline;
	for (auto &[id, h] : handshakes)
		t = std::min(t, h.deadline);
	for (auto &[id, l] : listeners)
		if (!l.armed)
			t = std::min(t, l.retry_at);
	return t;
}

bool LoopState::run_until(Clock::time_point deadline)
{
	struct ClearStop {
		std::atomic<bool> &flag;
		~ClearStop() { flag.store(false); }
	} clear{stop_requested};

	for (;;) {
		dispatch();
		if (stop_requested.load() || idle())
			return true;
		auto now = Clock::now();
		expire(now);
		if (now >= deadline)
			return false;
		arm(now);

		auto wake_at = next_wakeup(deadline);
		__kernel_timespec ts{};
		__kernel_timespec *tsp = nullptr;
		if (wake_at != Clock::time_point::max()) {
			auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wake_at - now);
			if (ns.count() < 0)
				ns = std::chrono::nanoseconds(0);
			ts.tv_sec = ns.count() / 1000000000;
			ts.tv_nsec = ns.count() % 1000000000;
			tsp = &ts;
		}
		io_uring_cqe *first = nullptr;
		int ret = io_uring_submit_and_wait_timeout(&ring, &first, 1, tsp, nullptr);
		if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN)
			throw Error("io_uring_submit_and_wait_timeout", -ret);

		/* Copy the completions out first: handling them submits more. */
		std::vector<io_uring_cqe> done;
		unsigned head;
		io_uring_cqe *c;
		io_uring_for_each_cqe(&ring, head, c) done.push_back(*c);
		io_uring_cq_advance(&ring, unsigned(done.size()));
		for (auto &cqe : done)
			complete(cqe);
	}
}

Session &LoopState::add(Session session)
{
	if (!session.state_)
		throw Error("EventLoop::add", EINVAL, "an empty (moved-from) Session");
	auto id = next_id++;
	auto [it, inserted] = sessions.emplace(id, SessionEntry{std::move(session), false});
	return it->second.session;
}

} // namespace detail

EventLoop::EventLoop(Handlers handlers, unsigned ring_entries)
	: state_(std::make_unique<detail::LoopState>(std::move(handlers), ring_entries))
{
}

EventLoop::~EventLoop() = default;

void EventLoop::listen(Listener listener, std::string secret, SessionOptions options)
{
	auto id = state_->next_id++;
	state_->listeners.emplace(id, detail::LoopState::ListenerEntry{std::move(listener),
								     std::move(secret), options,
								     false, {}});
}

Session &EventLoop::add(Session session)
{
	return state_->add(std::move(session));
}

std::size_t EventLoop::session_count() const noexcept
{
	return state_->sessions.size();
}

void EventLoop::run()
{
	state_->run_until(detail::Clock::time_point::max());
}

bool EventLoop::run_for(std::chrono::milliseconds timeout)
{
	return state_->run_until(detail::deadline_after(timeout));
}

void EventLoop::stop() noexcept
{
	state_->stop_requested.store(true);
	std::uint64_t one = 1;
	if (::write(state_->wake.get(), &one, sizeof(one)) < 0) {
		/* EAGAIN: the counter is saturated, a wakeup is pending anyway. */
	}
}

} // namespace virtkit::introspect
