// SPDX-License-Identifier: MIT
/*
 * Which readiness backend an EventLoop gets: the program's choice, else
 * VIRTKIT_EVENT_LOOP (epoll, io_uring, auto), else io_uring where it can be
 * set up and epoll where not - with the reason in the description, which
 * EventLoop::backend() gives to the tool to print.
 */
#include <cerrno>
#include <cstdlib>
#include <string_view>

#include "kvmi/tool/poller.hpp"

namespace virtkit::introspect::detail {

std::unique_ptr<Poller> make_poller(LoopBackend requested, unsigned ring_entries)
{
	std::string chosen_by = "chosen by the program";
	if (requested == LoopBackend::automatic) {
		const char *env = std::getenv("VIRTKIT_EVENT_LOOP");
		std::string_view v = env ? env : "";
		if (v == "epoll")
			requested = LoopBackend::epoll;
		else if (v == "io_uring")
			requested = LoopBackend::io_uring;
		else if (!v.empty() && v != "auto")
			throw Error("VIRTKIT_EVENT_LOOP", EINVAL,
				    "'" + std::string(v) + "': expected epoll, io_uring or auto");
		chosen_by = "chosen by VIRTKIT_EVENT_LOOP";
	}
	switch (requested) {
	case LoopBackend::epoll:
		return make_epoll_poller(chosen_by);
	case LoopBackend::io_uring:
		return make_ring_poller(ring_entries);
	case LoopBackend::automatic:
		break;
	}
	try {
		return make_ring_poller(ring_entries);
	} catch (const RingUnavailable &e) {
		return make_epoll_poller(std::string("io_uring: ") + e.what());
	}
}

} // namespace virtkit::introspect::detail
