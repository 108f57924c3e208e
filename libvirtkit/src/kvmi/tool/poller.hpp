// SPDX-License-Identifier: MIT
/*
 * Internal: the readiness backend behind EventLoop - io_uring
 * (ring_poller.cpp) or epoll (epoll_poller.cpp), chosen at run time
 * (poller.cpp).
 *
 * A Poller watches descriptors, each under a tag the loop chose (never 0:
 * 0 is the poller's own), and reports completions:
 *
 *   readable  res = the poll mask (> 0), or -errno;
 *   accept    res = a new connection's descriptor (nonblocking,
 *             close-on-exec; the loop owns it), or -errno.
 *
 * A watch lasts until unwatch() or until a completion with more = false
 * (the poller has dropped it then, so watching() is false and the loop
 * arms it again when it wants to). Readiness is level-triggered in effect:
 * a watched socket that has unread data is reported again, as long as the
 * loop reads until EAGAIN when told (the session's pump() does).
 *
 * unwatch() must come before the descriptor is closed (epoll cannot remove
 * a descriptor that is closed, and its number may be reused); it is
 * idempotent per tag.
 *
 * Threads: the loop's thread only. The io_uring backend may be bound to
 * the first thread that waits (IORING_SETUP_SINGLE_ISSUER):
 * bound_elsewhere() says the calling thread is another one, and the loop
 * makes a new poller then.
 */
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <virtkit/introspect.hpp>

#include "kvmi/tool/channel.hpp"

#pragma GCC visibility push(hidden)

namespace virtkit::introspect::detail {

enum class Watch : std::uint8_t { readable, accept };

struct Completion {
	std::uint64_t tag;
	int res;
	bool more; /* the watch goes on */
};

class Poller {
public:
	virtual ~Poller() = default;

	/* Start watching fd under tag (a tag already watched: EEXIST). */
	virtual void watch(int fd, std::uint64_t tag, Watch kind) = 0;
	/* Stop; nothing if tag is not watched. Late completions of the tag
	 * may still come (the loop ignores tags it no longer knows). */
	virtual void unwatch(std::uint64_t tag) = 0;
	virtual bool watching(std::uint64_t tag) const noexcept = 0;
	/* Submit what is pending and wait for at least one completion until
	 * deadline (Clock::time_point::max(): none); appends to out. A signal
	 * ends the wait early with nothing. */
	virtual void wait(Clock::time_point deadline, std::vector<Completion> &out) = 0;
	/* Completions already posted, without entering the kernel: before a
	 * poller bound to another thread is replaced. */
	virtual void drain(std::vector<Completion> &) {}
	/* When the loop returns: end every accept watch, with the connections
	 * it took until then appended to out (and whatever else completes
	 * meanwhile), so that nothing is accepted while nobody runs the loop -
	 * a ring that another thread replaces would take such a connection
	 * with it. Readable watches stay. */
	virtual void park(std::vector<Completion> &) {}
	virtual bool bound_elsewhere() const noexcept { return false; }

	LoopBackend kind() const noexcept { return kind_; }
	/* "io_uring (multishot poll, multishot accept, defer_taskrun)",
	 * "epoll (io_uring: io_uring_setup: EPERM (Operation not permitted))". */
	const std::string &description() const noexcept { return description_; }

protected:
	Poller(LoopBackend kind, std::string description)
		: kind_(kind), description_(std::move(description)) {}

	LoopBackend kind_;
	std::string description_;
};

/* Why io_uring cannot be used here: setup failed in a way no flag change
 * helps (ENOSYS, EPERM, ENOMEM...). */
class RingUnavailable : public Error {
public:
	using Error::Error;
};

/* The backend for this request: automatic reads VIRTKIT_EVENT_LOOP
 * (epoll, io_uring, auto) and tries io_uring first, then epoll. A backend
 * asked for by name that cannot be set up throws. */
std::unique_ptr<Poller> make_poller(LoopBackend requested, unsigned ring_entries);

/* Throws RingUnavailable when io_uring cannot be set up at all.
 * multishot = false: one-shot requests as on kernels without multishot
 * (for tests; the kernel decides otherwise). */
std::unique_ptr<Poller> make_ring_poller(unsigned entries, bool multishot = true);
/* why: the description's parenthesis, "io_uring: ..." or "chosen by ...". */
std::unique_ptr<Poller> make_epoll_poller(const std::string &why);

} // namespace virtkit::introspect::detail

#pragma GCC visibility pop
