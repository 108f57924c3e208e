// SPDX-License-Identifier: MIT
/*
 * Internal: a VM's watch for vCPUs that stay inside one KVM_RUN.
 *
 * KVM can spin inside KVM_RUN without ever returning: an instruction its
 * emulator cannot complete against a read-only memslot (sgdt onto a page
 * whose writes trap, the accessed bit of a descriptor in such a page) is
 * restarted forever. A feature that causes such pages installs a check;
 * while one is installed, a thread looks at every vCPU each period and
 * kicks out one that has been in the same entry since the last look. That
 * vCPU runs the check on its own thread before it goes back in (Vcpu::run()
 * calls VcpuWork::before_entry), so the check sees and changes the vCPU's
 * state as an exit handler would. The kick is internal: the VMM never sees
 * it.
 */
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

namespace virtkit::detail {

class RunGate;
class VcpuWork;

class StallWatch {
public:
	explicit StallWatch(RunGate &gate) : gate_(gate) {}
	~StallWatch() { stop(); }
	StallWatch(const StallWatch &) = delete;
	StallWatch &operator=(const StallWatch &) = delete;

	/* How often vCPUs are looked at. */
	static constexpr std::chrono::milliseconds period{20};

	/* Install the check (false: another one is installed) and start watching. */
	bool watch(std::shared_ptr<VcpuWork> check);
	/* Remove it, if it is the one installed, and stop watching. */
	void unwatch(const VcpuWork *check) noexcept;
	/* The check a kicked vCPU runs. */
	std::shared_ptr<VcpuWork> check();

private:
	void stop() noexcept;
	void loop(std::stop_token stop);

	RunGate &gate_;
	std::mutex mu_;
	std::condition_variable_any cv_;
	std::shared_ptr<VcpuWork> check_;
	std::jthread thread_;
};

} // namespace virtkit::detail
