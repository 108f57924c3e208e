// SPDX-License-Identifier: MIT
#include "core/stall_watch.hpp"

#include "core/library_thread.hpp"
#include "core/run_control.hpp"
#include "core/run_gate.hpp"
#include "core/vcpu_state.hpp"

namespace virtkit::detail {

bool StallWatch::watch(std::shared_ptr<VcpuWork> check)
{
	std::unique_lock lock(mu_);
	if (check_)
		return false;
	check_ = std::move(check);
	if (!thread_.joinable())
		thread_ = start_library_thread<std::jthread>(
			[this](std::stop_token st) { loop(st); });
	return true;
}

void StallWatch::unwatch(const VcpuWork *check) noexcept
{
	{
		std::lock_guard lock(mu_);
		if (check_.get() != check)
			return;
		check_.reset();
	}
	stop();
}

std::shared_ptr<VcpuWork> StallWatch::check()
{
	std::lock_guard lock(mu_);
	return check_;
}

void StallWatch::stop() noexcept
{
	if (!thread_.joinable())
		return;
	thread_.request_stop();
	cv_.notify_all();
	thread_.join();
	thread_ = std::jthread();
}

void StallWatch::loop(std::stop_token stop)
{
	for (;;) {
		{
			std::unique_lock lock(mu_);
			cv_.wait_for(lock, stop, period, [] { return false; });
		}
		if (stop.stop_requested())
			return;
		/*
		 * Under the gate's lock the vCPUs it lists stay alive
		 * (~VcpuState removes itself first); their kick locks come
		 * after it in the lock order.
		 */
		gate_.for_each([](VcpuState &v) {
			std::lock_guard lock(v.kick_mu);
			if (v.in_run && v.entries == v.stall_seen) {
				v.stall_check_pending.store(true);
				internal_kick_locked(v);
			}
			v.stall_seen = v.entries;
		});
	}
}

} // namespace virtkit::detail
