// SPDX-License-Identifier: MIT
/* RunControl: what features may do to a VM and its vCPUs (run_control.hpp). */
#include "core/run_control.hpp"

#include <signal.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"
#include "core/vcpu_state.hpp"
#include "core/vm_state.hpp"

namespace virtkit::detail {

FeatureSlots &RunControl::features(Vm &vm) noexcept { return vm.state_->features; }
MemoryMap &RunControl::memory_map(Vm &vm) noexcept { return vm.state_->memory; }
Vm RunControl::handle(Vm &vm) { return Vm(vm.state_); }

std::optional<Vcpu> RunControl::vcpu(Vm &vm, std::uint32_t id)
{
	if (auto s = vm.state_->find_vcpu(id))
		return Vcpu(std::move(s));
	return std::nullopt;
}

std::vector<Vcpu> RunControl::vcpus(Vm &vm)
{
	std::vector<Vcpu> out;
	for (auto &s : vm.state_->live_vcpus())
		out.push_back(Vcpu(std::move(s)));
	return out;
}

bool RunControl::claim_work(Vm &vm, std::shared_ptr<VcpuWork> work)
{
	auto &st = *vm.state_;
	std::lock_guard lock(st.work_mu);
	if (st.work)
		return false;
	st.work = std::move(work);
	return true;
}

void RunControl::release_work(Vm &vm, const VcpuWork *work) noexcept
{
	auto &st = *vm.state_;
	std::lock_guard lock(st.work_mu);
	if (st.work.get() == work)
		st.work.reset();
}

void RunControl::set_entry(Vm &vm, const RunEntry *entry) noexcept
{
	vm.state_->entry.store(entry);
}

VcpuState &RunControl::state(Vcpu &vcpu) noexcept { return *vcpu.state_; }

std::optional<std::uint64_t> RunControl::guest_physical(Vcpu &vcpu, std::uint64_t gva)
{
	return detail::guest_physical(vcpu, *vcpu.state_, gva);
}

std::size_t RunControl::read_code(Vcpu &vcpu, const kvm_sregs &sregs, std::uint64_t gva,
				 std::span<std::uint8_t> out)
{
	return detail::read_guest_virtual_cached(vcpu, *vcpu.state_, sregs, gva, out);
}

bool RunControl::guest_debug_single_steps(Vcpu &vcpu) noexcept
{
	const std::uint32_t c = vcpu.state_->guest_debug_control.load();
	return (c & KVM_GUESTDBG_ENABLE) && (c & KVM_GUESTDBG_SINGLESTEP);
}

void RunControl::sync_regs(Vm &vm)
{
	constexpr int want = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
	const int have = ::ioctl(vm.state_->fd.get(), KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS);
	if (have > 0 && (have & want) == want)
		vm.state_->sync_regs.store(true);
}

std::optional<RunControl::StallRegistration>
RunControl::watch_stalls(Vm &vm, std::shared_ptr<VcpuWork> check)
{
	const VcpuWork *c = check.get();
	if (!vm.state_->stalls.watch(std::move(check)))
		return std::nullopt;
	return StallRegistration(vm.state_->stalls, c);
}

void RunControl::StallRegistration::reset() noexcept
{
	if (watch_)
		std::exchange(watch_, nullptr)->unwatch(check_);
}

void RunControl::request_work(Vcpu &vcpu)
{
	auto &s = *vcpu.state_;
	s.work_pending.store(true);
	internal_kick(s);
}

void RunControl::registers_changed(Vcpu &vcpu) noexcept
{
	vcpu.state_->regs_synced.store(false);
}

std::uint64_t RunControl::entries(Vcpu &vcpu) noexcept
{
	auto &s = *vcpu.state_;
	std::lock_guard lock(s.kick_mu);
	return s.entries;
}

bool RunControl::complete_pending_exit(Vcpu &vcpu, const char *completing)
{
	auto &s = *vcpu.state_;
	auto *run = s.run.as<kvm_run>();
	std::atomic_ref(run->immediate_exit).store(1);
	s.regs_synced.store(false);
	int r = value_ioctl<KVM_RUN>(s.fd.get(), 0);
	int err = errno;
	note_synced_regs(s, r, err);
	{
		/* Keep a kick (user or internal) that arrived meanwhile pending. */
		std::lock_guard lock(s.kick_mu);
		if (!s.kick_pending && !s.internal_kick)
			std::atomic_ref(run->immediate_exit).store(0);
	}
	if (r >= 0)
		return true;
	if (err == EINTR || err == EAGAIN)
		return false;
	std::string what = "vcpu " + std::to_string(s.id) + " (completing " + completing + ")";
	errno = err;
	throw_ioctl_error("KVM_RUN", std::move(what), s.vm->fd.get());
}

std::optional<MmioFragment> RunControl::next_mmio_fragment(Vcpu &vcpu)
{
	auto &s = *vcpu.state_;
	auto *run = s.run.as<kvm_run>();
	if (!complete_pending_exit(vcpu, "MMIO"))
		return std::nullopt;
	if (run->exit_reason != KVM_EXIT_MMIO)
		throw Error("KVM_RUN", EPROTO,
			    "vcpu " + std::to_string(s.id) + ": completing MMIO gave " +
				    exit_reason_name(run->exit_reason));
	MmioFragment f{};
	f.gpa = run->mmio.phys_addr;
	f.len = std::min<std::uint32_t>(run->mmio.len, 8);
	f.is_write = run->mmio.is_write;
	std::memcpy(f.data.data(), run->mmio.data, f.len);
	return f;
}

MmioExit RunControl::replay_mmio(Vcpu &vcpu, const MmioFragment &f)
{
	auto *run = vcpu.state_->run.as<kvm_run>();
	run->exit_reason = KVM_EXIT_MMIO;
	run->mmio.phys_addr = f.gpa;
	run->mmio.len = f.len;
	run->mmio.is_write = f.is_write;
	std::memcpy(run->mmio.data, f.data.data(), f.len);
	return MmioExit{f.is_write ? MmioExit::Direction::write : MmioExit::Direction::read, f.gpa,
			std::span(reinterpret_cast<std::byte *>(run->mmio.data), f.len)};
}

VcpuHold::VcpuHold(Vcpu &vcpu) : vcpu_(vcpu)
{
	auto &v = RunControl::state(vcpu_);
	std::unique_lock lock(v.kick_mu);
	v.holds++;
	if (!v.in_run)
		return;
	v.internal_kick = true;
	std::atomic_ref(v.run.as<kvm_run>()->immediate_exit).store(1);
	pthread_kill(v.running_thread, kick_signal());
	v.kick_cv.wait(lock, [&] { return !v.in_run; });
}

VcpuHold::~VcpuHold()
{
	auto &v = RunControl::state(vcpu_);
	std::lock_guard lock(v.kick_mu);
	if (--v.holds == 0)
		v.kick_cv.notify_all();
}

} // namespace virtkit::detail
