// SPDX-License-Identifier: MIT
#include "core/run_gate.hpp"

#include <algorithm>

#include "core/vcpu_state.hpp"

namespace virtkit::detail {

void RunGate::enter()
{
	std::unique_lock lock(mu_);
	cv_.wait(lock, [&] { return pausers_ == 0; });
	in_guest_++;
}

void RunGate::leave()
{
	std::lock_guard lock(mu_);
	if (--in_guest_ == 0 && pausers_)
		cv_.notify_all();
}

void RunGate::add(VcpuState *v)
{
	std::lock_guard lock(mu_);
	vcpus_.push_back(v);
}

void RunGate::remove(VcpuState *v)
{
	std::lock_guard lock(mu_);
	vcpus_.erase(std::remove(vcpus_.begin(), vcpus_.end(), v), vcpus_.end());
}

void RunGate::for_each(const std::function<void(VcpuState &)> &fn)
{
	std::lock_guard lock(mu_);
	for (VcpuState *v : vcpus_)
		fn(*v);
}

RunGate::Pause::Pause(RunGate &gate) : gate_(gate)
{
	std::unique_lock lock(gate_.mu_);
	gate_.pausers_++;
	/*
	 * A vCPU between enter() and KVM_RUN sees immediate_exit; one in the
	 * guest gets the kick signal. Either way it comes back to enter().
	 */
	for (VcpuState *v : gate_.vcpus_)
		internal_kick(*v);
	gate_.cv_.wait(lock, [&] { return gate_.in_guest_ == 0; });
}

RunGate::Pause::~Pause()
{
	std::lock_guard lock(gate_.mu_);
	if (--gate_.pausers_ == 0)
		gate_.cv_.notify_all();
}

} // namespace virtkit::detail
