// SPDX-License-Identifier: MIT
#include <virtkit/vcpu.hpp>

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include <virtkit/error.hpp>
#include <virtkit/memory.hpp>

#include "core/exit_decode.hpp"
#include "core/ioctl.hpp"
#include "core/vcpu_state.hpp"

namespace virtkit {

using detail::hex;

/*
 * The signal kick() sends. Its handler does nothing: the point is that a
 * signal pending for the thread makes KVM_RUN leave the guest with EINTR.
 */
int detail::kick_signal()
{
	static int sig = [] {
		int s = SIGRTMIN;
		struct sigaction sa {};
		sa.sa_handler = [](int) {};
		sigemptyset(&sa.sa_mask);
		sigaction(s, &sa, nullptr); /* no SA_RESTART */
		return s;
	}();
	return sig;
}

Vcpu::Vcpu(std::shared_ptr<detail::VcpuState> state) : state_(std::move(state))
{
	detail::kick_signal();
}

Vcpu::Vcpu(Vcpu &&) noexcept = default;
Vcpu &Vcpu::operator=(Vcpu &&) noexcept = default;
Vcpu::~Vcpu() = default;

std::uint32_t Vcpu::id() const noexcept { return state_->id; }
int Vcpu::fd() const noexcept { return state_->fd.get(); }
GuestMemory &Vcpu::memory() noexcept
{
	return state_->vm->guest_memory;
}

static std::string who(const detail::VcpuState &s)
{
	return "vcpu " + std::to_string(s.id);
}

/*
 * KVM applies this mask while the vCPU runs: everything the thread blocks
 * except the kick signal, so a kick always interrupts the guest even if the
 * VMM blocks the signal in its vCPU threads.
 */
static void update_run_sigmask(detail::VcpuState &s)
{
	if (s.mask_set && pthread_equal(s.mask_thread, pthread_self()))
		return;
	sigset_t cur;
	pthread_sigmask(SIG_BLOCK, nullptr, &cur);
	sigdelset(&cur, detail::kick_signal());
	alignas(kvm_signal_mask) std::byte buf[sizeof(kvm_signal_mask) + 8];
	auto *m = reinterpret_cast<kvm_signal_mask *>(buf);
	m->len = 8; /* the kernel's sigset_t */
	std::memcpy(m->sigset, &cur, 8);
	VK_IOCTL(s.fd.get(), KVM_SET_SIGNAL_MASK, m, who(s), s.vm->fd.get());
	s.mask_thread = pthread_self();
	s.mask_set = true;
}

/*
 * A kick signal that the vCPU thread blocks is not delivered when KVM_RUN
 * returns: it stays pending and would make every later KVM_RUN return EINTR
 * at once. Consume it (the kick itself is reported through immediate_exit).
 */
static void consume_blocked_kick()
{
	sigset_t pending;
	if (sigpending(&pending) < 0 || !sigismember(&pending, detail::kick_signal()))
		return;
	sigset_t kick;
	sigemptyset(&kick);
	sigaddset(&kick, detail::kick_signal());
	const timespec zero{};
	sigtimedwait(&kick, nullptr, &zero);
}

Exit Vcpu::run()
{
	auto &s = *state_;
	auto *run = s.run.as<kvm_run>();
	update_run_sigmask(s);

	for (;;) {
		/* A feature's work on this thread (introspection events). */
		if (s.work_pending.load(std::memory_order_relaxed) && s.work_pending.exchange(false)) {
			if (auto work = s.vm->current_work())
				if (auto exit = work->before_entry(*this))
					return std::move(*exit);
		}
		/* A feature's look at a vCPU that stayed in the guest (StallWatch). */
		if (s.stall_check_pending.load(std::memory_order_relaxed) &&
		    s.stall_check_pending.exchange(false)) {
			if (auto check = s.vm->stalls.check())
				if (auto exit = check->before_entry(*this))
					return std::move(*exit);
		}
		s.vm->gate.enter();
		{
			std::unique_lock lock(s.kick_mu);
			if (s.holds) {
				/*
				 * Another thread holds this vCPU (VcpuHold): wait
				 * outside the gate, so that a Pause is not kept
				 * waiting for it, then start over.
				 */
				lock.unlock();
				s.vm->gate.leave();
				lock.lock();
				s.kick_cv.wait(lock, [&] { return s.holds == 0; });
				continue;
			}
			s.running_thread = pthread_self();
			s.in_run = true;
			s.entries++;
		}
		/*
		 * KVM writes exit_reason only when it reports an exit; clear it
		 * so that a KVM_RUN failing with EFAULT is never taken for a
		 * KVM_EXIT_MEMORY_FAULT an earlier run reported.
		 */
		run->exit_reason = KVM_EXIT_UNKNOWN;
		/* KVM_RUN, or the entry a feature put in its place (RunEntry). */
		const detail::RunEntry *entry = s.vm->entry.load();
		run->kvm_valid_regs = !entry && s.vm->sync_regs.load(std::memory_order_relaxed)
					      ? KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS
					      : 0;
		s.regs_synced.store(false);
		const int r = entry ? entry->enter(s.fd.get())
				    : detail::value_ioctl<KVM_RUN>(s.fd.get(), 0);
		int err = errno;
		detail::note_synced_regs(s, r, err);
		{
			std::lock_guard lock(s.kick_mu);
			s.in_run = false;
			if (s.holds)
				s.kick_cv.notify_all();
		}
		s.vm->gate.leave();
		bool interrupted = false;
		if (r < 0 && !detail::failed_run_reports_exit(*run, err)) {
			if (err != EINTR && err != EAGAIN) {
				errno = err;
				detail::throw_ioctl_error(entry ? entry->name() : "KVM_RUN",
							  who(s), s.vm->fd.get());
			}
			interrupted = true;
		}
		if (interrupted || run->exit_reason == KVM_EXIT_INTR) {
			bool only_internal;
			{
				std::lock_guard lock(s.kick_mu);
				only_internal = s.internal_kick && !s.kick_pending;
				s.internal_kick = s.kick_pending = false;
				std::atomic_ref(run->immediate_exit).store(0);
			}
			consume_blocked_kick();
			/* The library paused the VM for a moment: go back in. */
			if (only_internal)
				continue;
		}

		Exit exit = detail::decode_exit(*run, s.run.size(), interrupted);
		bool resume = false;
		auto handlers = s.vm->snapshot_handlers();
		for (auto &h : *handlers) {
			if (h.fn(*this, exit) == ExitAction::resume) {
				resume = true;
				break;
			}
		}
		if (resume)
			continue;
		/* Guest RAM whose slot was in flight (a VMM layout change). */
		if (auto *m = std::get_if<MmioExit>(&exit); m && s.vm->memory.complete_mmio(*m))
			continue;
		return exit;
	}
}

void Vcpu::kick()
{
	auto &s = *state_;
	std::lock_guard lock(s.kick_mu);
	s.kick_pending = true;
	std::atomic_ref(s.run.as<kvm_run>()->immediate_exit).store(1);
	if (s.in_run)
		pthread_kill(s.running_thread, detail::kick_signal());
}

namespace detail {

void internal_kick(VcpuState &s)
{
	std::lock_guard lock(s.kick_mu);
	internal_kick_locked(s);
}

void note_synced_regs(VcpuState &s, int r, int err)
{
	if (!s.run.as<kvm_run>()->kvm_valid_regs || (r < 0 && err != EINTR && err != EAGAIN))
		return;
	s.synced_thread = pthread_self();
	s.regs_synced.store(true);
}

void internal_kick_locked(VcpuState &s)
{
	s.internal_kick = true;
	std::atomic_ref(s.run.as<kvm_run>()->immediate_exit).store(1);
	if (s.in_run)
		pthread_kill(s.running_thread, kick_signal());
}

} // namespace detail

/*
 * Not VK_IOCTL: it would stringify `req` after GETTER/SETTER expanded it
 * (errors would name "(((1U) << ...", not "KVM_SET_SREGS").
 */
#define GETTER(type, name, req)                                              \
	type Vcpu::name() const                                              \
	{                                                                    \
		type v{};                                                    \
		if (detail::typed_ioctl<req>(fd(), &v) < 0)                  \
			detail::throw_ioctl_error(#req, who(*state_),        \
						  state_->vm->fd.get());     \
		return v;                                                    \
	}
/* A setter also ends the validity of registers KVM synced to kvm_run. */
#define SETTER(type, name, req)                                              \
	void Vcpu::name(const type &v)                                       \
	{                                                                    \
		state_->regs_synced.store(false);                            \
		if (detail::typed_ioctl<req>(fd(), const_cast<type *>(&v)) < 0) \
			detail::throw_ioctl_error(#req, who(*state_),        \
						  state_->vm->fd.get());     \
	}
/* The registers KVM left in kvm_run, when they are this thread's and current. */
#define SYNCED(type, name, req, field)                                       \
	type Vcpu::name() const                                              \
	{                                                                    \
		auto &s = *state_;                                           \
		if (s.regs_synced.load() && pthread_equal(s.synced_thread.load(), pthread_self())) \
			return s.run.as<kvm_run>()->s.regs.field;            \
		type v{};                                                    \
		if (detail::typed_ioctl<req>(fd(), &v) < 0)                  \
			detail::throw_ioctl_error(#req, who(s), s.vm->fd.get()); \
		return v;                                                    \
	}

SYNCED(kvm_regs, regs, KVM_GET_REGS, regs)
SETTER(kvm_regs, set_regs, KVM_SET_REGS)
SYNCED(kvm_sregs, sregs, KVM_GET_SREGS, sregs)
SETTER(kvm_sregs, set_sregs, KVM_SET_SREGS)
GETTER(kvm_fpu, fpu, KVM_GET_FPU)
SETTER(kvm_fpu, set_fpu, KVM_SET_FPU)
GETTER(kvm_vcpu_events, events, KVM_GET_VCPU_EVENTS)
SETTER(kvm_vcpu_events, set_events, KVM_SET_VCPU_EVENTS)
GETTER(kvm_debugregs, debugregs, KVM_GET_DEBUGREGS)
SETTER(kvm_debugregs, set_debugregs, KVM_SET_DEBUGREGS)

void Vcpu::set_guest_debug(const kvm_guest_debug &v)
{
	state_->regs_synced.store(false);
	if (detail::typed_ioctl<KVM_SET_GUEST_DEBUG>(fd(), const_cast<kvm_guest_debug *>(&v)) < 0)
		detail::throw_ioctl_error("KVM_SET_GUEST_DEBUG", who(*state_), state_->vm->fd.get());
	state_->guest_debug_control.store(v.control);
}

GETTER(kvm_mp_state, mp_state, KVM_GET_MP_STATE)
SETTER(kvm_mp_state, set_mp_state, KVM_SET_MP_STATE)

#undef SYNCED
#undef GETTER
#undef SETTER

Xsave Vcpu::xsave() const
{
	int size = detail::value_ioctl<KVM_CHECK_EXTENSION>(state_->vm->fd.get(), KVM_CAP_XSAVE2);
	if (size < static_cast<int>(sizeof(kvm_xsave)))
		size = sizeof(kvm_xsave);
	Xsave x;
	x.region.resize(size / 4);
	auto *p = reinterpret_cast<kvm_xsave *>(x.region.data());
	if (size > static_cast<int>(sizeof(kvm_xsave)))
		VK_IOCTL(fd(), KVM_GET_XSAVE2, p, who(*state_), state_->vm->fd.get());
	else
		VK_IOCTL(fd(), KVM_GET_XSAVE, p, who(*state_), state_->vm->fd.get());
	return x;
}

void Vcpu::set_xsave(const Xsave &x)
{
	int size = detail::value_ioctl<KVM_CHECK_EXTENSION>(state_->vm->fd.get(), KVM_CAP_XSAVE2);
	if (size < static_cast<int>(sizeof(kvm_xsave)))
		size = sizeof(kvm_xsave);
	if (x.region.size() * 4 < static_cast<std::size_t>(size))
		throw Error("KVM_SET_XSAVE", EINVAL,
			    who(*state_) + ": area of " + std::to_string(x.region.size() * 4) +
				    " bytes, KVM needs " + std::to_string(size));
	state_->regs_synced.store(false);
	VK_IOCTL(fd(), KVM_SET_XSAVE,
		 reinterpret_cast<kvm_xsave *>(const_cast<std::uint32_t *>(x.region.data())),
		 who(*state_), state_->vm->fd.get());
}

namespace {
struct MsrBuf {
	explicit MsrBuf(std::size_t n)
		: buf(sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry))
	{
		msrs()->nmsrs = static_cast<std::uint32_t>(n);
	}
	kvm_msrs *msrs() { return reinterpret_cast<kvm_msrs *>(buf.data()); }
	std::vector<std::byte> buf;
};
} // namespace

void Vcpu::get_msrs(std::span<kvm_msr_entry> entries) const
{
	MsrBuf b(entries.size());
	for (std::size_t i = 0; i < entries.size(); i++)
		b.msrs()->entries[i] = entries[i];
	int n = VK_IOCTL(fd(), KVM_GET_MSRS, b.msrs(), who(*state_), state_->vm->fd.get());
	if (static_cast<std::size_t>(n) != entries.size())
		throw Error("KVM_GET_MSRS", EINVAL,
			    who(*state_) + ": KVM does not handle MSR " + hex(entries[n].index));
	for (std::size_t i = 0; i < entries.size(); i++)
		entries[i] = b.msrs()->entries[i];
}

/*
 * KVM sets the entries in order and stops at the first one it refuses. To
 * make a refused call change nothing, read the current values first and put
 * back the ones already set.
 */
void Vcpu::set_msrs(std::span<const kvm_msr_entry> entries)
{
	MsrBuf old(entries.size());
	for (std::size_t i = 0; i < entries.size(); i++)
		old.msrs()->entries[i].index = entries[i].index;
	int readable = detail::typed_ioctl<KVM_GET_MSRS>(fd(), old.msrs());

	MsrBuf b(entries.size());
	for (std::size_t i = 0; i < entries.size(); i++)
		b.msrs()->entries[i] = entries[i];
	state_->regs_synced.store(false);
	int n = VK_IOCTL(fd(), KVM_SET_MSRS, b.msrs(), who(*state_), state_->vm->fd.get());
	if (static_cast<std::size_t>(n) == entries.size())
		return;
	bool undone = false;
	if (readable >= n) {
		old.msrs()->nmsrs = static_cast<std::uint32_t>(n);
		undone = detail::typed_ioctl<KVM_SET_MSRS>(fd(), old.msrs()) == n;
	}
	throw Error("KVM_SET_MSRS", EINVAL,
		    who(*state_) + ": KVM refused MSR " + hex(entries[n].index) + " = " +
			    hex(entries[n].data) +
			    (undone ? " (nothing was changed)"
				    : " (the entries before it could not be restored)"));
}

std::uint64_t Vcpu::msr(std::uint32_t index) const
{
	kvm_msr_entry e{};
	e.index = index;
	get_msrs(std::span(&e, 1));
	return e.data;
}

void Vcpu::set_msr(std::uint32_t index, std::uint64_t value)
{
	kvm_msr_entry e{};
	e.index = index;
	e.data = value;
	set_msrs(std::span<const kvm_msr_entry>(&e, 1));
}

std::size_t Vcpu::try_get_msrs(std::span<kvm_msr_entry> entries) const
{
	MsrBuf b(entries.size());
	for (std::size_t i = 0; i < entries.size(); i++)
		b.msrs()->entries[i] = entries[i];
	int n = VK_IOCTL(fd(), KVM_GET_MSRS, b.msrs(), who(*state_), state_->vm->fd.get());
	for (int i = 0; i < n; i++)
		entries[i] = b.msrs()->entries[i];
	return static_cast<std::size_t>(n);
}

std::optional<std::uint64_t> Vcpu::try_msr(std::uint32_t index) const
{
	kvm_msr_entry e{};
	e.index = index;
	if (try_get_msrs(std::span(&e, 1)) != 1)
		return std::nullopt;
	return e.data;
}

bool Vcpu::try_set_msr(std::uint32_t index, std::uint64_t value)
{
	MsrBuf b(1);
	b.msrs()->entries[0].index = index;
	b.msrs()->entries[0].data = value;
	state_->regs_synced.store(false);
	return VK_IOCTL(fd(), KVM_SET_MSRS, b.msrs(), who(*state_), state_->vm->fd.get()) == 1;
}

std::vector<kvm_cpuid_entry2> Vcpu::cpuid() const
{
	for (std::uint32_t n = 64;; n *= 2) {
		std::vector<std::byte> buf(sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2));
		auto *c = reinterpret_cast<kvm_cpuid2 *>(buf.data());
		c->nent = n;
		if (detail::typed_ioctl<KVM_GET_CPUID2>(fd(), c) == 0)
			return {c->entries, c->entries + c->nent};
		if (errno != E2BIG || n >= 4096)
			detail::throw_ioctl_error("KVM_GET_CPUID2", who(*state_),
						  state_->vm->fd.get());
	}
}

void Vcpu::set_cpuid(std::span<const kvm_cpuid_entry2> entries)
{
	std::vector<std::byte> buf(sizeof(kvm_cpuid2) + entries.size() * sizeof(kvm_cpuid_entry2));
	auto *c = reinterpret_cast<kvm_cpuid2 *>(buf.data());
	c->nent = static_cast<std::uint32_t>(entries.size());
	std::copy(entries.begin(), entries.end(), c->entries);
	state_->regs_synced.store(false);
	VK_IOCTL(fd(), KVM_SET_CPUID2, c,
		 who(*state_) + " nent=" + std::to_string(entries.size()), state_->vm->fd.get());
	std::lock_guard lock(state_->paging_mu);
	state_->paging.known = false;
}

kvm_translation Vcpu::translate(std::uint64_t gva) const
{
	kvm_translation t{};
	t.linear_address = gva;
	VK_IOCTL(fd(), KVM_TRANSLATE, &t, who(*state_) + " gva=" + hex(gva), state_->vm->fd.get());
	return t;
}

std::vector<std::uint64_t> Vcpu::harvest_dirty_ring()
{
	auto &s = *state_;
	if (!s.ring_entries)
		throw Error("Vcpu::harvest_dirty_ring", EINVAL,
			    who(s) + ": the VM was created without a dirty ring");
	auto *ring = s.ring.as<kvm_dirty_gfn>();
	std::vector<std::uint64_t> gpas;
	for (;;) {
		kvm_dirty_gfn &e = ring[s.ring_next % s.ring_entries];
		std::uint32_t flags = std::atomic_ref(e.flags).load(std::memory_order_acquire);
		if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
			break;
		if (auto gpa = s.vm->memory.ring_entry_gpa(e.slot & 0xffff, e.offset))
			gpas.push_back(*gpa);
		std::atomic_ref(e.flags).store(KVM_DIRTY_GFN_F_RESET, std::memory_order_release);
		s.ring_next++;
	}
	return gpas;
}

} // namespace virtkit
