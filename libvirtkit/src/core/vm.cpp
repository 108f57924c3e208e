// SPDX-License-Identifier: MIT
#include <virtkit/vm.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <utility>

#include <virtkit/error.hpp>
#include <virtkit/system.hpp>
#include <virtkit/vcpu.hpp>

#include "core/ioctl.hpp"
#include "core/vcpu_state.hpp"
#include "core/vm_state.hpp"

namespace virtkit {

using detail::hex;

Vm::Vm(std::shared_ptr<detail::VmState> state)
	: state_(std::move(state)) {}

Vm::Vm(Vm &&) noexcept = default;
Vm &Vm::operator=(Vm &&) noexcept = default;
Vm::~Vm() = default;

int Vm::fd() const noexcept { return state_->fd.get(); }
GuestMemory &Vm::memory() noexcept { return state_->guest_memory; }
const GuestMemory &Vm::memory() const noexcept { return state_->guest_memory; }
std::uint32_t Vm::dirty_ring_bytes() const noexcept { return state_->dirty_ring_bytes; }

int Vm::check_extension(long cap) const
{
	int r = detail::value_ioctl<KVM_CHECK_EXTENSION>(fd(), cap);
	if (r < 0 && errno == EIO)
		detail::throw_ioctl_error("KVM_CHECK_EXTENSION", "cap=" + std::to_string(cap), fd());
	return r < 0 ? 0 : r;
}

void Vm::enable_cap(std::uint32_t cap, std::array<std::uint64_t, 4> args, std::uint32_t flags)
{
	kvm_enable_cap c{};
	c.cap = cap;
	c.flags = flags;
	std::copy(args.begin(), args.end(), c.args);
	/* Through create_split_irqchip(), so the VM knows which irqchip it has. */
	if (cap == KVM_CAP_SPLIT_IRQCHIP) {
		if (flags || args[0] > UINT32_MAX || args[1] || args[2] || args[3])
			throw Error("KVM_ENABLE_CAP", EINVAL,
				    "KVM_CAP_SPLIT_IRQCHIP takes args[0] (routes) only, flags 0");
		create_split_irqchip(static_cast<std::uint32_t>(args[0]));
		return;
	}
	VK_IOCTL(fd(), KVM_ENABLE_CAP, &c,
		 "cap=" + std::to_string(cap) + " args[0]=" + hex(args[0]), fd());
}

bool Vm::is_dead() const { return detail::vm_fd_is_dead(fd()); }

void Vm::reset_dirty_rings()
{
	if (!state_->dirty_ring_bytes)
		throw Error("KVM_RESET_DIRTY_RINGS", EINVAL, "the VM has no dirty ring");
	VK_IOCTL_VAL(fd(), KVM_RESET_DIRTY_RINGS, 0, "", fd());
}

Vcpu Vm::create_vcpu(std::uint32_t id)
{
	auto s = std::make_shared<detail::VcpuState>();
	s->vm = state_;
	s->id = id;
	std::string what = "vcpu " + std::to_string(id);
	s->fd = FileDesc::adopt(detail::value_ioctl<KVM_CREATE_VCPU>(fd(), id),
				"KVM_CREATE_VCPU", what.c_str());
	s->run = Mapping::map(state_->vcpu_mmap_size, PROT_READ | PROT_WRITE,
			      MAP_SHARED, s->fd.get(), 0, "kvm_run");
	if (state_->dirty_ring_bytes) {
		s->ring = Mapping::map(state_->dirty_ring_bytes, PROT_READ | PROT_WRITE,
				       MAP_SHARED, s->fd.get(),
				       KVM_DIRTY_LOG_PAGE_OFFSET * ::getpagesize(),
				       "dirty ring");
		s->ring_entries = state_->dirty_ring_bytes / sizeof(kvm_dirty_gfn);
	}
	state_->vcpus_created++;
	state_->gate.add(s.get());
	s->gated = true;
	{
		std::lock_guard lock(state_->vcpus_mu);
		state_->vcpus[id] = s;
	}
	/* A feature's VcpuWork sees the vCPU before its first entry. */
	if (state_->current_work())
		s->work_pending.store(true);
	return Vcpu(std::move(s));
}

namespace detail {

std::shared_ptr<VcpuState> VmState::find_vcpu(std::uint32_t id)
{
	std::lock_guard lock(vcpus_mu);
	auto it = vcpus.find(id);
	return it == vcpus.end() ? nullptr : it->second.lock();
}

std::vector<std::shared_ptr<VcpuState>> VmState::live_vcpus()
{
	std::lock_guard lock(vcpus_mu);
	std::vector<std::shared_ptr<VcpuState>> out;
	for (auto it = vcpus.begin(); it != vcpus.end();) {
		if (auto v = it->second.lock()) {
			out.push_back(std::move(v));
			++it;
		} else {
			it = vcpus.erase(it);
		}
	}
	return out;
}

} // namespace detail

ExitHandlerRegistration Vm::add_exit_handler(ExitHandler handler, int priority)
{
	if (!handler)
		throw Error("Vm::add_exit_handler", EINVAL, "empty handler");
	std::lock_guard lock(state_->handlers_mu);
	auto list = std::make_shared<std::vector<detail::HandlerEntry>>(*state_->handlers);
	std::uint64_t id = state_->next_handler_id++;
	auto pos = std::upper_bound(list->begin(), list->end(), priority,
				    [](int p, const detail::HandlerEntry &e) { return p < e.priority; });
	list->insert(pos, {id, priority, std::move(handler)});
	state_->handlers = std::move(list);
	return ExitHandlerRegistration(state_, id);
}

ExitHandlerRegistration::ExitHandlerRegistration(ExitHandlerRegistration &&o) noexcept
	: vm_(std::move(o.vm_)), id_(std::exchange(o.id_, 0)) {}

ExitHandlerRegistration &ExitHandlerRegistration::operator=(ExitHandlerRegistration &&o) noexcept
{
	if (this != &o) {
		reset();
		vm_ = std::move(o.vm_);
		id_ = std::exchange(o.id_, 0);
	}
	return *this;
}

ExitHandlerRegistration::~ExitHandlerRegistration() { reset(); }

void ExitHandlerRegistration::reset() noexcept
{
	auto vm = vm_.lock();
	vm_.reset();
	if (!vm || !id_)
		return;
	std::lock_guard lock(vm->handlers_mu);
	auto list = std::make_shared<std::vector<detail::HandlerEntry>>();
	for (auto &e : *vm->handlers)
		if (e.id != id_)
			list->push_back(e);
	vm->handlers = std::move(list);
	id_ = 0;
}

} // namespace virtkit
