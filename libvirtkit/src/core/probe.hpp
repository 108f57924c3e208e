// SPDX-License-Identifier: MIT
/*
 * Internal: what every platform probe is made of (virtkit/platform.hpp, and
 * the guest environment's <virtkit/x86/guest_probes.hpp>). Header-only, so
 * the guest environment, which links against the public API, can use it.
 */
#pragma once

#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <variant>

#include <virtkit/exit.hpp>
#include <virtkit/platform.hpp>
#include <virtkit/system.hpp>
#include <virtkit/vcpu.hpp>

#include "core/library_thread.hpp"

namespace virtkit::platform::probe {

inline Probe yes(std::string d)
{
	return {Probe::Result::yes, std::move(d)};
}
inline Probe no(std::string d)
{
	return {Probe::Result::no, std::move(d)};
}
inline Probe unknown(std::string d)
{
	return {Probe::Result::unknown, std::move(d)};
}

/*
 * One KVM_RUN, kicked after two seconds (a guest that loops instead of
 * exiting is a finding, not a hang).
 */
inline Exit run_bounded(Vcpu &v)
{
	std::mutex mu;
	std::condition_variable cv;
	bool done = false;
	std::thread watchdog = detail::start_library_thread<std::thread>([&] {
		std::unique_lock lock(mu);
		if (!cv.wait_for(lock, std::chrono::seconds(2), [&] { return done; }))
			v.kick();
	});
	struct Stop {
		std::mutex &mu;
		std::condition_variable &cv;
		bool &done;
		std::thread &t;
		~Stop()
		{
			{
				std::lock_guard lock(mu);
				done = true;
			}
			cv.notify_all();
			t.join();
		}
	} stop{mu, cv, done, watchdog};
	return v.run();
}

inline std::string internal_error(const Exit &e)
{
	auto *ie = std::get_if<InternalErrorExit>(&e);
	return "KVM_EXIT_INTERNAL_ERROR (suberror " + std::to_string(ie->suberror) +
	       (ie->suberror == KVM_INTERNAL_ERROR_EMULATION ? ": emulation failure)" : ")");
}

/* Run probe, turning anything it throws into unknown. */
inline Probe guarded(const char *what, const std::function<Probe()> &probe)
{
	try {
		return probe();
	} catch (const std::exception &e) {
		return unknown(std::string("the ") + what + " probe could not run: " + e.what());
	}
}

/* A probe's answer, found once per process. */
template <Probe (*probe)(const System &)>
const Probe &once(const char *what, const System &sys)
{
	static std::once_flag flag;
	static Probe result;
	std::call_once(flag, [&] { result = guarded(what, [&] { return probe(sys); }); });
	return result;
}

} // namespace virtkit::platform::probe
