// SPDX-License-Identifier: MIT
/*
 * EventLoop: one readiness backend (poller.hpp: io_uring, or epoll where
 * io_uring is not available) for every listener, handshake and session.
 *
 * The backend only says when something is ready: an accept watch brings a
 * new connection, a readable watch says a socket has data. Reading stays
 * with the session's own framing code (nonblocking recv into its buffer),
 * so a command issued from a callback may read the same socket: whatever it
 * reads is framed and its events are queued, and the loop dispatches queued
 * events each round whether or not the backend reported anything - a poll
 * can never strand an event that a command already read. This is also why
 * nothing is received through the ring (ring_poller.cpp says why).
 *
 * Every watch carries a tag with an id, not a pointer: an entry that went
 * away (a session that ended, a handshake that timed out) turns its late
 * completion into a no-op. Its watch is removed before its socket is
 * closed, so the kernel drops its reference and epoll its registration.
 */
#include <virtkit/introspect.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <map>
#include <vector>

#include "kvmi/tool/handshake.hpp"
#include "kvmi/tool/poller.hpp"
#include "kvmi/tool/session_state.hpp"

namespace virtkit::introspect {

namespace detail {

namespace {

enum class Kind : std::uint64_t { wake = 1, accept, handshake, session };

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

/* The loop's poller, shared with the before_close hooks of its sessions,
 * which may outlive the loop (a Session moved out of a callback). */
struct PollerSlot {
	std::unique_ptr<Poller> poller;
};

struct LoopState {
	struct ListenerEntry {
		Listener listener;
		std::string secret;
		SessionOptions options;
		Clock::time_point retry_at{};
	};
	struct HandshakeEntry {
		Channel channel;
		HandshakeReader reader;
		std::string secret;
		SessionOptions options;
		Clock::time_point deadline;
	};
	struct SessionEntry {
		Session session;
	};

	LoopState(EventLoop::Handlers h, LoopBackend backend, unsigned entries);
	~LoopState();
	LoopState(const LoopState &) = delete;
	LoopState &operator=(const LoopState &) = delete;

	bool run_until(Clock::time_point deadline);
	Session &add(Session session);
	Poller &poller() const noexcept { return *slot->poller; }

	EventLoop::Handlers handlers;
	unsigned ring_entries;
	FileDesc wake;
	std::shared_ptr<PollerSlot> slot;
	std::atomic<bool> stop_requested{false};
	std::uint64_t next_id = 1;
	std::map<std::uint64_t, ListenerEntry> listeners;
	std::map<std::uint64_t, HandshakeEntry> handshakes;
	std::map<std::uint64_t, SessionEntry> sessions;

private:
	void arm(Clock::time_point now);
	void rebind();
	void park() noexcept;
	void dispatch();
	void reap();
	void complete(const Completion &c);
	void accepted(std::uint64_t id, int res, bool more);
	void handshake_ready(std::uint64_t id);
	void expire(Clock::time_point now);
	Clock::time_point next_wakeup(Clock::time_point deadline) const;
	void report(const Error &e);
	template <class F> void invoke(Session &session, F &&callback);
	bool idle() const { return listeners.empty() && handshakes.empty() && sessions.empty(); }
};

LoopState::LoopState(EventLoop::Handlers h, LoopBackend backend, unsigned entries)
	: handlers(std::move(h)), ring_entries(entries),
	  slot(std::make_shared<PollerSlot>(PollerSlot{make_poller(backend, entries)}))
{
	wake = FileDesc::eventfd(0, EFD_NONBLOCK);
}

LoopState::~LoopState()
{
	/* The sessions go before the poller, which forgets them at once. */
	for (auto &[id, e] : sessions)
		if (e.session.state_)
			e.session.state_->before_close = nullptr;
}

/* Watches are made here, on the thread that runs the loop; a watch that
 * ended (a completion without more) is made again. */
void LoopState::arm(Clock::time_point now)
{
	Poller &p = poller();
	if (!p.watching(tag(Kind::wake, 0)))
		p.watch(wake.get(), tag(Kind::wake, 0), Watch::readable);
	for (auto &[id, l] : listeners)
		if (now >= l.retry_at && !p.watching(tag(Kind::accept, id)))
			p.watch(l.listener.fd(), tag(Kind::accept, id), Watch::accept);
	for (auto &[id, h] : handshakes)
		if (!p.watching(tag(Kind::handshake, id)))
			p.watch(h.channel.fd(), tag(Kind::handshake, id), Watch::readable);
	for (auto &[id, e] : sessions)
		if (e.session.connected() && !p.watching(tag(Kind::session, id)))
			p.watch(e.session.fd(), tag(Kind::session, id), Watch::readable);
}

/*
 * Before run() returns: the poller's accepts end (Poller::park), the
 * connections they took become handshakes. Completions that come
 * meanwhile are noted without callbacks: a session reads what its socket
 * has (dispatched next run), a handshake is watched again next run (a new
 * watch reports data already there).
 */
void LoopState::park() noexcept
{
	std::vector<Completion> done;
	try {
		poller().park(done);
	} catch (const Error &e) {
		try {
			report(e);
		} catch (...) {
		}
	} catch (...) {
	}
	for (auto &c : done) {
		try {
			switch (kind_of(c.tag)) {
			case Kind::accept:
				accepted(id_of(c.tag), c.res, c.more);
				break;
			case Kind::handshake:
				poller().unwatch(c.tag);
				break;
			case Kind::wake:
			case Kind::session:
				complete(c);
				break;
			}
		} catch (...) {
			/* The loop is returning; what failed is retried next run. */
		}
	}
}

/*
 * An io_uring with IORING_SETUP_SINGLE_ISSUER takes submissions from the
 * thread that first ran the loop only. When run() comes from another
 * thread, a new ring (same kind of backend) takes over: what the old one
 * had posted is handled, its requests end with it, and arm() makes every
 * watch again. It has no accept left to lose a connection with: park()
 * ended them when the last run() returned.
 */
void LoopState::rebind()
{
	if (!poller().bound_elsewhere())
		return;
	std::vector<Completion> done;
	poller().drain(done);
	auto fresh = make_poller(poller().kind(), ring_entries);
	std::swap(slot->poller, fresh);
	fresh.reset();
	for (auto &c : done)
		complete(c);
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
		poller().unwatch(tag(Kind::session, id));
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

void LoopState::accepted(std::uint64_t id, int res, bool more)
{
	auto it = listeners.find(id);
	if (res >= 0 && it == listeners.end()) {
		::close(res);
		return;
	}
	if (it == listeners.end())
		return;
	auto &l = it->second;
	if (res < 0) {
		/* A watch that ended on EMFILE, ENOMEM... waits a little. */
		if (!more && res != -EINTR && res != -ECONNABORTED && res != -EAGAIN)
			l.retry_at = Clock::now() + accept_retry;
		report(Error("accept", -res, l.listener.address()));
		return;
	}
	auto fd = FileDesc::adopt(res, "accept");
	try {
		Channel channel(std::move(fd));
		handshakes.emplace(next_id++,
				   HandshakeEntry{std::move(channel), HandshakeReader{}, l.secret,
						  l.options, deadline_after(l.options.handshake_timeout)});
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
		/* Its session gets a watch of its own. */
		poller().unwatch(tag(Kind::handshake, id));
		state = finish_handshake(std::move(h.channel), h.reader.info(), h.secret, h.options,
					 h.deadline);
	} catch (const Error &e) {
		poller().unwatch(tag(Kind::handshake, id));
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
		poller().unwatch(tag(Kind::handshake, id));
		handshakes.erase(it);
		report(Error("KVMI handshake", ETIMEDOUT,
			     "no handshake within " + std::to_string(timeout.count()) + " ms"));
	}
}

void LoopState::complete(const Completion &c)
{
	auto id = id_of(c.tag);
	switch (kind_of(c.tag)) {
	case Kind::wake: {
		std::uint64_t v;
		if (::read(wake.get(), &v, sizeof(v)) < 0 && errno != EAGAIN)
			throw Error("read", errno, "the event loop's eventfd");
		break;
	}
	case Kind::accept:
		accepted(id, c.res, c.more);
		break;
	case Kind::handshake:
		handshake_ready(id);
		break;
	case Kind::session: {
		auto it = sessions.find(id);
		if (it == sessions.end())
			break;
		if (c.res > 0 && it->second.session.state_)
			it->second.session.state_->pump();
		break;
	}
	}
}

Clock::time_point LoopState::next_wakeup(Clock::time_point deadline) const
{
	auto t = deadline;
	for (auto &[id, h] : handshakes)
		t = std::min(t, h.deadline);
	for (auto &[id, l] : listeners)
		if (!poller().watching(tag(Kind::accept, id)))
			t = std::min(t, l.retry_at);
	return t;
}

bool LoopState::run_until(Clock::time_point deadline)
{
	struct ClearStop {
		std::atomic<bool> &flag;
		~ClearStop() { flag.store(false); }
	} clear{stop_requested};
	struct Park {
		LoopState &loop;
		~Park() { loop.park(); }
	} park_on_return{*this};

	/* Before anything may submit: the callbacks' commands and closes too. */
	rebind();
	for (;;) {
		dispatch();
		if (stop_requested.load() || idle())
			return true;
		auto now = Clock::now();
		expire(now);
		if (now >= deadline)
			return false;
		arm(now);

		std::vector<Completion> done;
		poller().wait(next_wakeup(deadline), done);
		for (auto &c : done)
			complete(c);
	}
}

Session &LoopState::add(Session session)
{
	if (!session.state_)
		throw Error("EventLoop::add", EINVAL, "an empty (moved-from) Session");
	auto id = next_id++;
	auto [it, inserted] = sessions.emplace(id, SessionEntry{std::move(session)});
	/* Session::close() from a callback closes the socket at once. */
	it->second.session.state_->before_close = [weak = std::weak_ptr<PollerSlot>(slot),
						   t = tag(Kind::session, id)]() noexcept {
		if (auto s = weak.lock()) {
			try {
				s->poller->unwatch(t);
			} catch (...) {
				/* Only a full ring fails; the reap cancels it. */
			}
		}
	};
	return it->second.session;
}

} // namespace detail

EventLoop::EventLoop(Handlers handlers, unsigned ring_entries)
	: EventLoop(std::move(handlers), LoopBackend::automatic, ring_entries)
{
}

EventLoop::EventLoop(Handlers handlers, LoopBackend backend, unsigned ring_entries)
	: state_(std::make_unique<detail::LoopState>(std::move(handlers), backend, ring_entries))
{
}

EventLoop::~EventLoop() = default;

void EventLoop::listen(Listener listener, std::string secret, SessionOptions options)
{
	auto id = state_->next_id++;
	state_->listeners.emplace(id, detail::LoopState::ListenerEntry{std::move(listener),
								     std::move(secret), options, {}});
}

Session &EventLoop::add(Session session)
{
	return state_->add(std::move(session));
}

std::size_t EventLoop::session_count() const noexcept
{
	return state_->sessions.size();
}

const std::string &EventLoop::backend() const noexcept
{
	return state_->poller().description();
}

LoopBackend EventLoop::backend_kind() const noexcept
{
	return state_->poller().kind();
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
