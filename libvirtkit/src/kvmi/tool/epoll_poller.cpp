// SPDX-License-Identifier: MIT
/*
 * The epoll backend of EventLoop: for hosts where io_uring is not there or
 * not allowed (a seccomp filter, kernel.io_uring_disabled, a kernel built
 * without it), or when VIRTKIT_EVENT_LOOP=epoll asks for it.
 *
 * Level-triggered epoll, the tag in epoll_data. An accept watch is the
 * listener's readability; the accept4() calls are made here, a few per
 * readiness so that one busy listener does not starve the sessions, and
 * each new connection is a completion as io_uring's accept would give it.
 */
#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <map>

#include "kvmi/tool/poller.hpp"

namespace virtkit::introspect::detail {

namespace {

/* Connections taken per listener readiness; the rest next round. */
constexpr int accepts_per_round = 16;

class EpollPoller final : public Poller {
public:
	explicit EpollPoller(const std::string &why)
		: Poller(LoopBackend::epoll, "epoll (" + why + ")"),
		  ep_(FileDesc::adopt(::epoll_create1(EPOLL_CLOEXEC), "epoll_create1"))
	{
	}

	void watch(int fd, std::uint64_t tag, Watch kind) override
	{
		if (watched_.count(tag))
			throw Error("epoll_ctl", EEXIST, "tag already watched");
		epoll_event ev{};
		ev.events = EPOLLIN;
		ev.data.u64 = tag;
		if (::epoll_ctl(ep_.get(), EPOLL_CTL_ADD, fd, &ev) < 0)
			throw Error("epoll_ctl", errno, "EPOLL_CTL_ADD fd " + std::to_string(fd));
		watched_.emplace(tag, Entry{fd, kind});
	}

	void unwatch(std::uint64_t tag) override
	{
		auto it = watched_.find(tag);
		if (it == watched_.end())
			return;
		int fd = it->second.fd;
		watched_.erase(it);
		remove(fd);
	}

	bool watching(std::uint64_t tag) const noexcept override { return watched_.count(tag) != 0; }

	void wait(Clock::time_point deadline, std::vector<Completion> &out) override
	{
		int ms = -1;
		if (deadline != Clock::time_point::max()) {
			auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
			ms = int(std::clamp<std::int64_t>(left.count(), 0, 1000000000));
		}
		std::array<epoll_event, 64> evs;
		int n = ::epoll_wait(ep_.get(), evs.data(), int(evs.size()), ms);
		if (n < 0) {
			if (errno == EINTR)
				return;
			throw Error("epoll_wait", errno);
		}
		for (int i = 0; i < n; i++) {
			auto it = watched_.find(evs[i].data.u64);
			if (it == watched_.end())
				continue; /* unwatched by an earlier completion's handler */
			if (it->second.kind == Watch::readable)
				out.push_back({it->first, int(evs[i].events), true});
			else
				accept_some(it, out);
		}
	}

private:
	struct Entry {
		int fd;
		Watch kind;
	};

	void remove(int fd) noexcept
	{
		/* ENOENT/EBADF: the descriptor was closed, which removed it. */
		::epoll_ctl(ep_.get(), EPOLL_CTL_DEL, fd, nullptr);
	}

	void accept_some(std::map<std::uint64_t, Entry>::iterator it, std::vector<Completion> &out)
	{
		for (int i = 0; i < accepts_per_round; i++) {
			int fd = ::accept4(it->second.fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
			if (fd >= 0) {
				out.push_back({it->first, fd, true});
				continue;
			}
			int err = errno;
			if (err == EAGAIN || err == EINTR)
				return;
			if (err == ECONNABORTED) {
				/* One connection that went away: tell, go on. */
				out.push_back({it->first, -err, true});
				continue;
			}
			/* EMFILE, ENOMEM...: the watch ends (level-triggered, it
			 * would spin); the loop arms it again after a pause. */
			out.push_back({it->first, -err, false});
			remove(it->second.fd);
			watched_.erase(it);
			return;
		}
	}

	FileDesc ep_;
	std::map<std::uint64_t, Entry> watched_;
};

} // namespace

std::unique_ptr<Poller> make_epoll_poller(const std::string &why)
{
	return std::make_unique<EpollPoller>(why);
}

} // namespace virtkit::introspect::detail
