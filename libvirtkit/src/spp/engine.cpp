// SPDX-License-Identifier: MIT
#include "spp/engine.hpp"

#include <algorithm>
#include <cpuid.h>
#include <cerrno>
#include <cstring>
#include <limits>
#include <vector>

#include <virtkit/error.hpp>
#include <virtkit/vcpu.hpp>

#include "core/cpu_vendor.hpp"
#include "core/ioctl.hpp"
#include "core/run_control.hpp"
#include "spp/cmpxchg16b.hpp"
#include "spp/locked_rmw.hpp"
#include "spp/system_writes.hpp"
#include "spp/x86_decode.hpp"

namespace virtkit::detail {

static constexpr std::uint64_t page = 4096;
/* As a std::uint64_t, for std::min. */
static constexpr std::uint64_t gfn_limit = VK_SPPT_GFN_LIMIT;

static std::string pages(std::uint64_t gfn, std::uint64_t n)
{
	return "gfn=" + hex(gfn) + " npages=" + std::to_string(n);
}

/* An Error for a store that failed with err: names the store's ioctl, if any. */
[[noreturn]] static void store_error(const SppStore &store, const char *op, int err,
				     std::string detail, bool set)
{
	if (*store.op_name(set))
		detail += std::string(": ") + store.op_name(set) + " failed";
	throw Error(op, err, std::move(detail));
}

static bool is_protected(std::uint32_t map) { return map != VK_SPP_ALL_WRITABLE; }

/*
 * The maps of pages lo .. hi - 1, read from the store in one GET (pages
 * beyond the table read as all-writable). Other pages are read one at a
 * time. Errors are thrown as `op`.
 */
class MapWindow {
public:
	MapWindow(const SppStore &store, const char *op, std::uint64_t lo, std::uint64_t hi)
		: store_(store), op_(op), base_(std::min(lo, gfn_limit)),
		  size_(std::min(hi, gfn_limit) - base_)
	{
		/* A write's one or two pages (every trapped write) need no allocation. */
		if (size_ > inline_.size())
			heap_.resize(size_);
		if (int r = store_.get(base_, maps()))
			store_error(store_, op_, r, pages(base_, size_), false);
	}

	std::uint32_t at(std::uint64_t gfn) const
	{
		if (gfn - base_ < size_)
			return data()[gfn - base_];
		if (gfn >= gfn_limit)
			return VK_SPP_ALL_WRITABLE;
		std::uint32_t m;
		if (int r = store_.get(gfn, std::span(&m, 1)))
			store_error(store_, op_, r, pages(gfn, 1), false);
		return m;
	}

	/* Pages gfn .. gfn + n - 1, all inside the window. */
	std::span<const std::uint32_t> range(std::uint64_t gfn, std::uint64_t n) const
	{
		return std::span(data(), size_).subspan(gfn - base_, n);
	}

private:
	const std::uint32_t *data() const
	{
		return size_ > inline_.size() ? heap_.data() : inline_.data();
	}
	std::span<std::uint32_t> maps()
	{
		return {size_ > inline_.size() ? heap_.data() : inline_.data(), size_};
	}

	const SppStore &store_;
	const char *op_;
	std::uint64_t base_;
	std::uint64_t size_;
	std::array<std::uint32_t, 8> inline_;
	std::vector<std::uint32_t> heap_;
};

SppEngine::SppEngine(MemoryMap &mem, std::unique_ptr<SppStore> store)
	: mem_(mem), store_(std::move(store))
{
	auto lock = mem_.lock();
	mem_.set_observer_locked(this);
}

SppEngine::~SppEngine()
{
	stall_reg_.reset();
	reg_.reset();
	auto lock = mem_.lock();
	mem_.set_observer_locked(nullptr);
}

/*
 * A page traps writes when it is protected, and also when a write that
 * starts in it could run into a protected first sub-page of the next page or
 * start in the previous page's protected last sub-page: KVM writes the RAM
 * part of a page-straddling store itself, so both pages must trap for the
 * store to be decided whole.
 */
template <class MapAt>
bool SppEngine::needs_trap(std::uint64_t gfn, const MapAt &map_at)
{
	if (is_protected(map_at(gfn)))
		return true;
	if (gfn + 1 < VK_SPPT_GFN_LIMIT && !(map_at(gfn + 1) & 1))
		return true;
	return gfn > 0 && !(map_at(gfn - 1) >> 31 & 1);
}

/*
 * A change of the maps of pages gfn .. gfn + n - 1 changes whether those
 * pages and one neighbour either side trap; needs_trap() of those reads one
 * page further either side. The window holds all of them (one GET).
 */
static MapWindow trap_window(const SppStore &store, const char *op, std::uint64_t gfn,
			     std::uint64_t n)
{
	return MapWindow(store, op, gfn > 1 ? gfn - 2 : 0, gfn + n + 2);
}

template <class MapAt>
void SppEngine::set_traps_locked(std::uint64_t gfn, std::uint64_t n, const MapAt &map_at)
{
	std::uint64_t lo = gfn ? gfn - 1 : 0;
	std::uint64_t hi = std::min(gfn + n + 1, gfn_limit);
	mem_.set_traps_locked(lo, hi - lo,
			      [&](std::uint64_t g) { return needs_trap(g, map_at); });
}

/* The traps of pages gfn .. gfn + n - 1 and their neighbours, as the store says. */
void SppEngine::refresh_traps_locked(std::uint64_t gfn, std::uint64_t n)
{
	MapWindow w = trap_window(*store_, "SubpageProtection", gfn, n);
	set_traps_locked(gfn, n, [&](std::uint64_t g) { return w.at(g); });
}

void SppEngine::count_protected(std::span<const std::uint32_t> old_maps,
				std::span<const std::uint32_t> new_maps)
{
	for (std::size_t i = 0; i < old_maps.size(); i++)
		protected_pages_ += is_protected(new_maps[i]) - is_protected(old_maps[i]);
}

void SppEngine::set_access(std::uint64_t gfn, std::span<const std::uint32_t> maps)
{
	const char *op = "SubpageProtection::set_access";
	const std::uint64_t n = maps.size();
	if (gfn >= VK_SPPT_GFN_LIMIT || n > VK_SPPT_GFN_LIMIT - gfn)
		throw Error(op, EFAULT, pages(gfn, n) + ": beyond the 48-bit guest-physical space");

	auto lock = mem_.lock();
	if (!mem_.writable_ram_locked(gfn * page, n * page))
		throw Error(op, EFAULT, pages(gfn, n) + ": not all writable guest RAM");

	/* The old maps, and the neighbours' that needs_trap() reads, in one GET. */
	MapWindow old = trap_window(*store_, op, gfn, n);

	/* Re-cut the slots for the new maps first: it is the step that can fail. */
	set_traps_locked(gfn, n, [&](std::uint64_t g) {
		return g - gfn < n ? maps[g - gfn] : old.at(g);
	});
	if (int r = set_pieces_locked(gfn, maps)) {
		/* Back to the layout of the maps the store kept. */
		set_traps_locked(gfn, n, [&](std::uint64_t g) { return old.at(g); });
		store_error(*store_, op, r, pages(gfn, n), true);
	}
	count_protected(old.range(gfn, n), maps);
}

std::vector<std::uint32_t> SppEngine::get_access(std::uint64_t gfn, std::uint64_t n) const
{
	const char *op = "SubpageProtection::get_access";
	if (gfn >= VK_SPPT_GFN_LIMIT || n > VK_SPPT_GFN_LIMIT - gfn)
		throw Error(op, EFAULT, pages(gfn, n) + ": beyond the 48-bit guest-physical space");
	auto lock = mem_.lock_shared();
	if (!mem_.writable_ram_locked(gfn * page, n * page))
		throw Error(op, EFAULT, pages(gfn, n) + ": not all writable guest RAM");
	std::vector<std::uint32_t> maps(n);
	if (int r = store_->get(gfn, maps))
		store_error(*store_, op, r, pages(gfn, n), false);
	return maps;
}

void SppEngine::on_violation(SppViolationHandler handler)
{
	auto h = handler ? std::make_shared<const SppViolationHandler>(std::move(handler)) : nullptr;
	std::lock_guard lock(handler_mu_);
	handler_ = std::move(h);
	handler_gen_++;
}

SppStats SppEngine::stats() const
{
	SppStats s{};
	s.checked_writes = checked_.load();
	s.allowed_writes = allowed_.load();
	s.violations = violations_.load();
	auto lock = mem_.lock_shared();
	s.protected_pages = protected_pages_;
	store_->add_stats(s);
	return s;
}

int SppEngine::set_pieces_locked(std::uint64_t gfn, std::span<const std::uint32_t> maps)
{
	const std::uint64_t max = store_->max_set_pages();
	if (maps.size() <= max)
		return store_->set(gfn, maps);
	std::vector<std::uint32_t> old(maps.size());
	if (int r = store_->get(gfn, old))
		return r;
	for (std::uint64_t done = 0; done < maps.size(); done += max) {
		std::uint64_t n = std::min<std::uint64_t>(maps.size() - done, max);
		if (int r = store_->set(gfn + done, maps.subspan(done, n))) {
			/* Put back the pieces already set, as far as the store can. */
			for (std::uint64_t u = 0; u < done; u += max)
				store_->set(gfn + u, std::span(old).subspan(u, max));
			return r;
		}
	}
	return 0;
}

void SppEngine::clear_locked(std::uint64_t gfn, std::span<const std::uint32_t> maps) noexcept
{
	auto first = std::find_if(maps.begin(), maps.end(), is_protected);
	if (first == maps.end())
		return;
	auto last = std::find_if(maps.rbegin(), maps.rend(), is_protected).base();
	store_->fill(gfn + (first - maps.begin()), last - first, VK_SPP_ALL_WRITABLE);
}

/* The maps travel with the memory; the old addresses become unprotected. */
void SppEngine::region_moved(std::uint64_t from, std::uint64_t to, std::uint64_t size)
{
	const char *op = "GuestMemory::move";
	std::uint64_t n = size / page, src = from / page, dst = to / page;
	if (src >= gfn_limit)
		return;
	std::vector<std::uint32_t> maps(std::min(n, gfn_limit - src));
	if (int r = store_->get(src, maps))
		store_error(*store_, op, r, "sub-page protection of " + pages(src, maps.size()),
			    false);
	if (std::none_of(maps.begin(), maps.end(), is_protected))
		return;
	if (dst >= gfn_limit || n > gfn_limit - dst)
		throw Error(op, EINVAL,
			    "sub-page protection cannot follow the region beyond "
			    "the 48-bit guest-physical space");
	maps.resize(n, VK_SPP_ALL_WRITABLE);
	if (int r = set_pieces_locked(dst, maps))
		store_error(*store_, op, r, "sub-page protection of " + pages(dst, n), true);
	/* Clear the part of the old range the new one does not cover. */
	std::uint64_t end = std::min(src + n, gfn_limit);
	if (dst > src)
		clear_locked(src, std::span(maps).first(std::min(dst, end) - src));
	else if (std::uint64_t s = std::max(dst + n, src); s < end)
		clear_locked(s, std::span(maps).subspan(s - src, end - s));
}

void SppEngine::region_removed(std::uint64_t gpa, std::uint64_t size) noexcept
{
	std::uint64_t g = gpa / page, n = size / page;
	if (g >= VK_SPPT_GFN_LIMIT)
		return;
	n = std::min(n, gfn_limit - g);
	std::vector<std::uint32_t> old(n, VK_SPP_ALL_WRITABLE);
	if (store_->get(g, old))
		return; /* the store cannot tell: leave it */
	protected_pages_ -= std::count_if(old.begin(), old.end(), is_protected);
	clear_locked(g, old);
}

/*
 * A region appeared next to others: its edge pages, and its neighbours'
 * edge pages, may need to trap for straddling writes. Without the memslots
 * for that, a store straddling into a protected sub-page of the neighbour
 * would be split: the region is refused (the caller undoes the change).
 */
void SppEngine::region_placed(std::uint64_t gpa, std::uint64_t size)
{
	std::uint64_t g = gpa / page, n = size / page;
	try {
		refresh_traps_locked(g, 1);
		if (n > 1)
			refresh_traps_locked(g + n - 1, 1);
	} catch (const Error &e) {
		throw Error("GuestMemory", e.err(),
			    "region " + gpa_range(gpa, size) +
				    " borders sub-page protection, and its edge pages need "
				    "memslots of their own to trap straddling stores: " +
				    e.detail());
	}
}

namespace {

struct PendingWrite {
	std::array<MmioFragment, 16> pieces;
	std::size_t count = 0;
	std::uint32_t bytes = 0;
	bool overflow = false;

	void add(const MmioFragment &f)
	{
		if (count == pieces.size() || bytes + f.len > SppViolation::max_write) {
			overflow = true;
			return;
		}
		pieces[count++] = f;
		bytes += f.len;
	}

	/* Write the pieces that land in RAM (a straddle into MMIO drops the rest). */
	void perform_locked(MemoryMap &mem) const
	{
		for (std::size_t i = 0; i < count; i++)
			if (mem.writable_ram_locked(pieces[i].gpa, pieces[i].len))
				mem.guest_write_locked(pieces[i].gpa, pieces[i].data.data(),
						       pieces[i].len);
	}

	/* The bytes of the whole write, in order. */
	std::span<const std::uint8_t> data(std::array<std::uint8_t, SppViolation::max_write> &buf) const
	{
		std::size_t n = 0;
		for (std::size_t i = 0; i < count; i++) {
			std::memcpy(buf.data() + n, pieces[i].data.data(), pieces[i].len);
			n += pieces[i].len;
		}
		return std::span(buf.data(), n);
	}

	/* Whether the pieces are one run of guest-physical bytes. */
	bool contiguous() const
	{
		for (std::size_t i = 1; i < count; i++)
			if (pieces[i].gpa != pieces[i - 1].gpa + pieces[i - 1].len)
				return false;
		return true;
	}
};

/*
 * An allowed write, performed: a lockable read-modify-write (rmw) again,
 * atomically on the VMM's mapping, with the registers it leaves in *regs;
 * anything else as KVM wrote it. Under the layout lock, shared.
 */
void perform_write_locked(MemoryMap &mem, const PendingWrite &w, const std::optional<RmwPlan> &rmw,
			  const kvm_regs &post, std::optional<kvm_regs> &regs)
{
	if (rmw && !rmw->store)
		return; /* a failed compare-exchange: it only read */
	if (rmw && w.contiguous() &&
	    mem.guest_rmw_locked(w.pieces[0].gpa, w.bytes,
				 [&](std::byte *host) { regs = perform_rmw(*rmw, host, post); }))
		return;
	w.perform_locked(mem);
}

} // namespace

std::optional<std::uint64_t> SppEngine::first_blocked(const MapWindow &maps, std::uint64_t gpa,
						       std::uint64_t len)
{
	for (std::uint64_t a = gpa; a < gpa + len; a = (a | (VK_SPP_SUBPAGE_SIZE - 1)) + 1) {
		std::uint32_t map = maps.at(a / page);
		if (!(map >> (a % page / VK_SPP_SUBPAGE_SIZE) & 1))
			return a;
	}
	return std::nullopt;
}

/*
 * Whether a decision ends Vcpu::run() with the violation: stop does; so does
 * drop for a write the guest cannot go on without (a descriptor's accessed
 * or busy bit, an exception frame), which would otherwise be retried for
 * ever. The VMM then decides (the instruction or event is still pending).
 */
static bool ends_run(SppDecision d, bool guest_needs_write)
{
	return d == SppDecision::stop || (d == SppDecision::drop && guest_needs_write);
}

/*
 * The protection may change while a blocked write waits for its decision:
 * lifted (an introspection tool that disconnected takes its restrictions and
 * its handler away; the handler may answer drop for a page it no longer
 * restricts), or replaced along with the handler (the next tool). A drop
 * stands only for a write the maps still block, decided by the handler
 * still installed: the guest loses no write that nothing blocks any more,
 * and a write the new protection blocks is the new handler's to decide.
 */
SppDecision SppEngine::report(Vcpu &vcpu, SppViolation &v,
			      const std::function<std::optional<std::uint64_t>()> &blocked_now)
{
	for (;;) {
		violations_++;
		std::shared_ptr<const SppViolationHandler> handler;
		std::uint64_t gen;
		{
			std::lock_guard lock(handler_mu_);
			handler = handler_;
			gen = handler_gen_;
		}
		SppDecision d = handler ? (*handler)(vcpu, v) : SppDecision::drop;
		if (d != SppDecision::drop)
			return d;
		auto blocked = blocked_now();
		if (!blocked)
			return SppDecision::allow_once;
		{
			std::lock_guard lock(handler_mu_);
			if (gen == handler_gen_)
				return d;
		}
		v.gpa = *blocked;
	}
}

/*
 * cmpxchg16b on a trapping page: KVM's emulator cannot emulate 16-byte
 * cmpxchg and reports an emulation failure with the instruction not
 * executed. Decode it, check its 16 bytes against the maps and complete it
 * here - atomically on the VMM's mapping when allowed; when blocked, with the
 * compare done but the store dropped, as on ROM.
 */
ExitAction SppEngine::complete_cmpxchg16b(Vcpu &vcpu, Exit &exit)
{
	kvm_regs regs = vcpu.regs();
	kvm_sregs sregs = vcpu.sregs();
	std::array<std::uint8_t, 15> insn{};
	std::size_t got = 0;
	for (std::uint64_t va = regs.rip; got < insn.size();) {
		kvm_translation t = vcpu.translate(va);
		if (!t.valid)
			break;
		std::size_t n = std::min<std::uint64_t>(insn.size() - got, page - va % page);
		if (!vcpu.memory().contains(t.physical_address, n))
			break;
		vcpu.memory().read(t.physical_address,
				   std::as_writable_bytes(std::span(insn.data() + got, n)));
		got += n;
		va += n;
	}
	auto d = decode_cmpxchg16b(std::span(insn.data(), got), regs, sregs);
	if (!d)
		return ExitAction::pass;
	kvm_translation t = vcpu.translate(d->gva);
	if (!t.valid || !t.writeable || t.physical_address % 16)
		return ExitAction::pass;
	const std::uint64_t gpa = t.physical_address;
	std::uint64_t expected[2] = {regs.rax, regs.rdx};
	const std::uint64_t desired[2] = {regs.rbx, regs.rcx};
	std::optional<std::uint64_t> blocked;
	bool equal;
	{
		auto lock = mem_.lock_shared();
		if (!mem_.writable_ram_locked(gpa, 16))
			return ExitAction::pass;
		MapWindow maps(*store_, "SubpageProtection (cmpxchg16b)", gpa / page, gpa / page + 1);
		blocked = first_blocked(maps, gpa, 16);
		checked_++;
		if (!blocked) {
			equal = mem_.guest_cmpxchg16b_locked(gpa, expected, desired);
			allowed_++;
		} else {
			/* Compare only: an atomic read that stores nothing new. */
			std::uint64_t same[2] = {expected[0], expected[1]};
			equal = mem_.guest_cmpxchg16b_locked(gpa, expected, same);
		}
	}

	auto finish = [&](bool eq) {
		const std::uint64_t zf = 1u << 6;
		regs.rflags = eq ? regs.rflags | zf : regs.rflags & ~zf;
		regs.rax = expected[0];
		regs.rdx = expected[1];
		regs.rip += d->length;
		vcpu.set_regs(regs);
	};
	if (!blocked) {
		finish(equal);
		return ExitAction::resume;
	}

	/* The processor stores on failure too (the old value): report that. */
	SppViolation v{};
	v.vcpu = vcpu.id();
	v.gpa = *blocked;
	v.write_gpa = gpa;
	v.size = 16;
	v.write_size = 16;
	v.rip = regs.rip + d->length;
	const std::uint64_t *data = equal ? desired : expected;
	std::memcpy(v.bytes.data(), data, 16);
	auto blocked_now = [&]() -> std::optional<std::uint64_t> {
		auto lock = mem_.lock_shared();
		MapWindow maps(*store_, "SubpageProtection (cmpxchg16b)", gpa / page, gpa / page + 1);
		return first_blocked(maps, gpa, 16);
	};
	switch (report(vcpu, v, blocked_now)) {
	case SppDecision::drop:
		finish(equal);
		return ExitAction::resume;
	case SppDecision::allow_once: {
		expected[0] = regs.rax;
		expected[1] = regs.rdx;
		bool eq;
		{
			auto lock = mem_.lock_shared();
			eq = mem_.guest_cmpxchg16b_locked(gpa, expected, desired);
		}
		finish(eq);
		return ExitAction::resume;
	}
	case SppDecision::stop:
		break;
	}
	finish(equal);
	exit = SppViolationExit{v};
	return ExitAction::pass;
}

void SppEngine::watch_stalls(Vm &vm)
{
	struct Check final : VcpuWork {
		explicit Check(SppEngine &e) : engine(e) {}
		std::optional<Exit> before_entry(Vcpu &vcpu) override
		{
			return engine.complete_stalled(vcpu);
		}
		SppEngine &engine;
	};
	if (auto reg = RunControl::watch_stalls(vm, std::make_shared<Check>(*this)))
		stall_reg_ = std::move(*reg);
}

/*
 * The vCPU made no progress for a StallWatch period: if the instruction at
 * its RIP makes a write KVM cannot complete on a trapping page, decide it
 * here, as for any other write. A store (sgdt, sidt, fxsave in 32-bit
 * code) is then done or dropped and the guest continues after the
 * instruction. A descriptor's accessed or busy bit is set, and the guest
 * runs the instruction again; dropping that write would leave it stuck, so
 * a drop ends Vcpu::run() with the violation for the VMM to decide
 * (SppViolationExit, rip at the instruction).
 */
std::optional<Exit> SppEngine::complete_stalled(Vcpu &vcpu)
{
	/*
	 * An exception KVM keeps queued while it re-runs the instruction that
	 * raised it (kernels before 6.14, when the frame lands on a trapping
	 * page and the instruction can be emulated): deliver it here.
	 */
	if (kvm_vcpu_events ev = vcpu.events(); ev.exception.injected || ev.exception.pending) {
		Exit out = InternalErrorExit{};
		const auto ec = ev.exception.has_error_code ? std::optional(ev.exception.error_code)
							    : std::nullopt;
		if (deliver_event(vcpu, ev.exception.nr, 3, ec, ev, out) == ExitAction::resume)
			return std::nullopt;
		if (std::holds_alternative<SppViolationExit>(out))
			return out;
	}
	const kvm_regs regs = vcpu.regs();
	return complete_system_writes(vcpu, regs, find_system_writes(vcpu, regs, vcpu.sregs()),
				      nullptr);
}

/*
 * fxsave/fxsave64 in 64-bit code on a trapping page: KVM's emulator refuses
 * it (check_fxsr: X86EMUL_UNHANDLEABLE in 64-bit mode) and reports an
 * emulation failure, with a #UD queued that setting the registers clears.
 * Build the image from the vCPU's state and decide it whole, as the stall
 * watch does for 32-bit code.
 */
ExitAction SppEngine::complete_fxsave(Vcpu &vcpu, Exit &exit)
{
	const kvm_regs regs = vcpu.regs();
	auto w = find_fxsave(vcpu, regs, vcpu.sregs());
	if (!w)
		return ExitAction::pass;
	bool decided = false;
	auto out = complete_system_writes(vcpu, regs, {*w}, &decided);
	if (!decided)
		return ExitAction::pass;
	if (!out)
		return ExitAction::resume;
	exit = std::move(*out);
	return ExitAction::pass;
}

/*
 * Without KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM answers a failed emulation
 * by queueing #UD (handle_emulation_failure) and exits only at CPL 0: a
 * user-mode cmpxchg16b or fxsave on a trapping page would get a #UD the
 * processor never raises. With the capability KVM exits at every CPL and
 * queues nothing, so what the engine cannot complete gets KVM's own
 * answer here: #UD queued, the vCPU resumed at CPL > 0, the exit passed to
 * the VMM (with the #UD pending, as before) at CPL 0.
 */
ExitAction SppEngine::raise_undefined_opcode(Vcpu &vcpu)
{
	if (!exit_on_emulation_failure_.load(std::memory_order_relaxed))
		return ExitAction::pass;
	kvm_vcpu_events events = vcpu.events();
	events.exception.injected = 1;
	events.exception.pending = 0;
	events.exception.nr = 6; /* #UD */
	events.exception.has_error_code = 0;
	events.exception.error_code = 0;
	vcpu.set_events(events);
	/* KVM's CPL: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL. */
	const kvm_sregs s = vcpu.sregs();
	const bool cpl0 = !(s.cr0 & 1) || (!(vcpu.regs().rflags & (1u << 17)) && s.ss.dpl == 0);
	return cpl0 ? ExitAction::pass : ExitAction::resume;
}

std::optional<Exit> SppEngine::complete_system_writes(Vcpu &vcpu, kvm_regs regs,
						      const std::vector<SystemWrite> &writes,
						      bool *decided)
{
	bool advance = false;
	std::uint8_t length = 0;
	for (const SystemWrite &w : writes) {
		/* Its bytes by page: at most two pieces. */
		struct Piece {
			std::uint64_t gpa;
			std::uint32_t off, len;
		};
		std::array<Piece, 2> pieces{};
		std::size_t count = 0;
		for (std::uint32_t off = 0; off < w.size; count++) {
			const kvm_translation t = vcpu.translate(w.gva + off);
			if (!t.valid)
				return std::nullopt; /* the CPU faults on its own */
			const std::uint32_t len = std::min<std::uint64_t>(
				w.size - off, page - (w.gva + off) % page);
			pieces[count] = {t.physical_address, off, len};
			off += len;
		}
		auto perform_locked = [&] {
			for (std::size_t k = 0; k < count; k++) {
				const Piece &pc = pieces[k];
				if (w.kind == SystemWrite::Kind::store)
					mem_.guest_write_locked(pc.gpa, reinterpret_cast<const std::byte *>(
										w.bytes.data() + pc.off),
								pc.len);
				else
					mem_.guest_rmw_locked(pc.gpa, 1, [&](std::byte *host) {
						__atomic_fetch_or(reinterpret_cast<std::uint8_t *>(host),
								  w.set_bits, __ATOMIC_SEQ_CST);
					});
			}
		};
		auto blocked_locked = [&]() -> std::optional<std::uint64_t> {
			for (std::size_t k = 0; k < count; k++) {
				MapWindow maps(*store_, "SubpageProtection (system write)",
					       pieces[k].gpa / page, pieces[k].gpa / page + 1);
				if (auto b = first_blocked(maps, pieces[k].gpa, pieces[k].len))
					return b;
			}
			return std::nullopt;
		};
		std::optional<std::uint64_t> blocked;
		{
			auto lock = mem_.lock_shared();
			bool traps = false;
			for (std::size_t k = 0; k < count; k++) {
				if (!mem_.writable_ram_locked(pieces[k].gpa, pieces[k].len))
					return std::nullopt; /* not RAM: not a write we hold up */
				const std::uint64_t g = pieces[k].gpa / page;
				MapWindow maps = trap_window(*store_, "SubpageProtection (system write)", g, 1);
				traps |= needs_trap(g, [&](std::uint64_t x) { return maps.at(x); });
			}
			if (!traps)
				continue; /* KVM performs it */
			checked_++;
			blocked = blocked_locked();
			if (!blocked) {
				perform_locked();
				allowed_++;
			}
		}
		if (decided)
			*decided = true;
		if (w.kind == SystemWrite::Kind::store) {
			advance = true;
			length = w.length;
		}
		if (!blocked)
			continue;

		SppViolation v{};
		v.vcpu = vcpu.id();
		v.gpa = *blocked;
		v.write_gpa = pieces[0].gpa;
		v.size = std::min(w.size, SppViolation::max_write);
		v.write_size = w.size;
		v.rip = w.kind == SystemWrite::Kind::store ? regs.rip + w.length : regs.rip;
		std::memcpy(v.bytes.data(), w.bytes.data(), v.size);
		auto blocked_now = [&] {
			auto lock = mem_.lock_shared();
			return blocked_locked();
		};
		const SppDecision d = report(vcpu, v, blocked_now);
		if (d == SppDecision::allow_once) {
			auto lock = mem_.lock_shared();
			perform_locked();
			continue;
		}
		if (!ends_run(d, w.kind == SystemWrite::Kind::descriptor))
			continue;
		if (advance) {
			regs.rip += length;
			vcpu.set_regs(regs);
		}
		return SppViolationExit{v};
	}
	if (advance) {
		regs.rip += length;
		vcpu.set_regs(regs);
	}
	return std::nullopt;
}

/*
 * rep stos and rep movs: on a page that traps, KVM emulates one element per
 * exit, RIP staying at the instruction until RCX reaches 0. After an
 * element is decided (performed or dropped), go on with the following ones here, each decided as the
 * exit for it would be: an allowed element is performed; a run of
 * protected elements on one page (up to SppViolation::max_write bytes) is
 * reported as one violation and, unless allowed, not written - the guest
 * goes on after it, as after a dropped element - or, on stop, ends the
 * continuation at its first element with the violation. This goes on until
 * the count runs out, an element would leave guest RAM, read a hidden
 * page, straddle a page, or the batch (4096 elements) is full; the guest
 * then re-runs the instruction for the rest.
 */
std::optional<SppEngine::RepContinuation>
SppEngine::continue_rep_string(Vcpu &vcpu, const PrecedingCode &code, const kvm_regs &post,
			       std::uint64_t gpa, std::uint32_t len)
{
	const kvm_sregs &s = code.sregs;
	const bool long64 = code.long64;
	/*
	 * Single-stepping (TF, or the VMM's or a tool's KVM_GUESTDBG_SINGLESTEP)
	 * traps after every element: leave each to KVM.
	 */
	if ((post.rflags & (1u << 8)) || RunControl::guest_debug_single_steps(vcpu))
		return std::nullopt;
	/* RIP stays at a rep instruction until its count runs out. */
	const auto rep = decode_rep_string(code.at_rip(), long64);
	if (!rep || rep->size != len)
		return std::nullopt;
	const std::uint64_t amask = rep->addr_bytes == 8 ? ~0ull : 0xffffffffull;
	const std::int64_t step = post.rflags & (1u << 10) ? -std::int64_t{len} : len; /* DF */
	const std::uint64_t es = long64 ? 0 : s.es.base, ds = long64 ? 0 : s.ds.base;
	std::uint64_t count = post.rcx & amask, rdi = post.rdi & amask, rsi = post.rsi & amask;
	auto lin = [&](std::uint64_t base, std::uint64_t off) { return (base + off) & amask; };
	/* The element just written is the one before RDI. */
	if (!count || RunControl::guest_physical(vcpu, lin(es, rdi - step)) != gpa)
		return std::nullopt;

	RepContinuation out{post, std::nullopt};
	auto regs_now = [&] {
		kvm_regs r = post;
		r.rcx = (post.rcx & ~amask) | count;
		r.rdi = (post.rdi & ~amask) | (rdi & amask);
		if (rep->movs)
			r.rsi = (post.rsi & ~amask) | (rsi & amask);
		if (!count)
			r.rip += rep->length; /* retired, as the guest would on re-entry */
		return r;
	};
	/* The element's data: the source element (movs) or the low bytes of rax. */
	auto element = [&](std::uint64_t src_gpa, std::byte *data) {
		if (rep->movs)
			mem_.guest_read_locked(src_gpa, data, len);
		else
			std::memcpy(data, &post.rax, len);
	};
	std::uint64_t done = 0;
	for (bool more = true; more && count && done < 4096;) {
		/* The pages the next elements are on: translated outside the lock. */
		const std::uint64_t dva = lin(es, rdi), sva = lin(ds, rsi);
		const auto dpage = RunControl::guest_physical(vcpu, dva & ~(page - 1));
		const auto spage = rep->movs ? RunControl::guest_physical(vcpu, sva & ~(page - 1))
					     : std::optional<std::uint64_t>(0);
		if (!dpage || !spage)
			break;
		/* Whether the next element stays on these pages. */
		auto on_pages = [&](std::uint64_t d, std::uint64_t sv) {
			return d / page == dva / page && d % page + len <= page &&
			       (!rep->movs || (sv / page == sva / page && sv % page + len <= page));
		};
		/* A run of protected elements: how many, and its first protected byte. */
		std::uint64_t run = 0, first_protected = 0;
		{
			auto lock = mem_.lock_shared();
			MapWindow maps(*store_, "SubpageProtection (rep string)", *dpage / page,
				       *dpage / page + 1);
			while (count && done < 4096) {
				const std::uint64_t d = lin(es, rdi), sv = lin(ds, rsi);
				if (!on_pages(d, sv)) {
					more = d % page + len <= page && (!rep->movs || sv % page + len <= page);
					break;
				}
				const std::uint64_t dg = *dpage + d % page, sg = *spage + sv % page;
				if (!mem_.writable_ram_locked(dg, len) ||
				    (rep->movs && (!mem_.host_ptr_locked(sg, len) || mem_.hidden_locked(sg)))) {
					more = false;
					break;
				}
				if (auto b = first_blocked(maps, dg, len)) {
					/* This and the protected elements after it on the page. */
					first_protected = *b;
					for (std::uint64_t d2 = d, s2 = sv;
					     run < count && done + run < 4096 &&
					     (run + 1) * len <= SppViolation::max_write && on_pages(d2, s2) &&
					     first_blocked(maps, *dpage + d2 % page, len);
					     run++, d2 = lin(0, d2 + step), s2 = lin(0, s2 + step)) {
					}
					break;
				}
				std::array<std::byte, 8> data{};
				element(sg, data.data());
				mem_.guest_write_locked(dg, data.data(), len);
				checked_++;
				allowed_++;
				rdi += step;
				rsi += step;
				count--;
				done++;
			}
		}
		if (!run)
			continue;

		/* Report the run as one write, its bytes in address order. */
		const std::uint64_t d0 = *dpage + lin(es, rdi) % page, s0 = *spage + lin(ds, rsi) % page;
		const std::uint64_t lo = step > 0 ? d0 : d0 - (run - 1) * len;
		SppViolation v{};
		v.vcpu = vcpu.id();
		v.gpa = first_protected;
		v.write_gpa = lo;
		v.size = static_cast<std::uint32_t>(run * len);
		v.write_size = v.size;
		v.rip = post.rip;
		auto run_elements = [&](auto &&fn) {
			for (std::uint64_t k = 0; k < run; k++) {
				const std::int64_t off = static_cast<std::int64_t>(k) * step;
				fn(d0 + off, s0 + off);
			}
		};
		{
			auto lock = mem_.lock_shared();
			run_elements([&](std::uint64_t dg, std::uint64_t sg) {
				element(sg, v.bytes.data() + (dg - lo));
			});
		}
		checked_ += run;
		auto blocked_now = [&]() -> std::optional<std::uint64_t> {
			auto lock = mem_.lock_shared();
			MapWindow maps(*store_, "SubpageProtection (rep string)", *dpage / page,
				       *dpage / page + 1);
			return first_blocked(maps, lo, v.size);
		};
		const SppDecision decision = report(vcpu, v, blocked_now);
		if (decision == SppDecision::stop) {
			out.stop = v;
			break;
		}
		if (decision == SppDecision::allow_once) {
			/* Element by element: a source may be an earlier element's destination. */
			auto lock = mem_.lock_shared();
			run_elements([&](std::uint64_t dg, std::uint64_t sg) {
				std::array<std::byte, 8> data{};
				element(sg, data.data());
				mem_.guest_write_locked(dg, data.data(), len);
			});
		}
		rdi += run * step;
		rsi += run * step;
		count -= run;
		done += run;
	}
	if (!done && !out.stop)
		return std::nullopt;
	out.regs = regs_now();
	return out;
}

namespace {

struct SplitStore {
	std::uint64_t gva;
	std::uint64_t first_gpa;
	std::uint32_t performed;
};

/*
 * Whether the write whose first trapped piece begins the page at gpa
 * (bytes long) is the end of a store that started on another guest-virtual
 * page, mapped to a guest-physical page that is not adjacent (and so does
 * not trap): find the instruction that ended at RIP - a push (at the new
 * RSP) or a plain or read-modify-write store through a memory operand - whose
 * operand straddles into gpa with exactly `bytes` bytes.
 */
std::optional<SplitStore> find_split_store(Vcpu &vcpu, const PrecedingCode &code,
					   const kvm_regs &post, std::uint64_t gpa, std::uint32_t bytes)
{
	const kvm_sregs &s = code.sregs;
	auto fits = [&](std::uint64_t gva, std::uint32_t size) -> std::optional<SplitStore> {
		const std::uint32_t k = static_cast<std::uint32_t>(page - gva % page);
		if (k >= size || size - k != bytes)
			return std::nullopt;
		const kvm_translation second = vcpu.translate(gva + k);
		const kvm_translation first = vcpu.translate(gva);
		if (!second.valid || second.physical_address != gpa || !first.valid ||
		    first.physical_address + k == gpa || !vcpu.memory().contains(first.physical_address, k))
			return std::nullopt;
		return SplitStore{gva, first.physical_address, k};
	};
	/* push and call store at the new RSP. */
	for (std::uint32_t size : {8u, 4u, 2u})
		if (auto f = fits(code.long64 ? post.rsp : s.ss.base + (post.rsp & 0xffffffff), size))
			return f;
	for (const StoreCandidate &c : stores_ending_here(code.bytes(), code.long64))
		if (c.kind != StoreCandidate::Kind::rmw_elsewhere)
			if (auto f = fits(linear_address(c.mem, post, s, code.long64, post.rip), c.size))
				return f;
	return std::nullopt;
}

/* An event being delivered: VMX IDT-vectoring / SVM EXITINTINFO layout. */
struct Vectoring {
	std::uint8_t vector;
	std::uint8_t type; /* 0 external interrupt, 2 NMI, 3 hardware exception, 4+ software */
	bool has_error_code;
	std::uint32_t error_code;
};

bool host_is_amd()
{
	unsigned a, b, c, d;
	if (!__get_cpuid(0, &a, &b, &c, &d))
		return false;
	/* AuthenticAMD, HygonGenuine: SVM's exit information */
	return vendor_is_amd_compatible(b, c, d);
}

/*
 * The event KVM failed to deliver, from the exit and the vCPU's events.
 *
 * KVM_INTERNAL_ERROR_DELIVERY_EV (Linux 6.14+, x86_emulate_instruction ->
 * kvm_check_emulate_insn -> X86EMUL_UNHANDLEABLE_VECTORING): KVM left the
 * event queued for reinjection, so KVM_GET_VCPU_EVENTS has it (exception
 * with its error code, NMI or interrupt; not a software exception, #BP/#OF,
 * which the events hide).
 *
 * KVM_INTERNAL_ERROR_EMULATION (older kernels): KVM tried to emulate the
 * instruction at RIP, cleared the exception queue first and queued a #UD
 * of its own on failure (CPL 0), so the events lie; the vectoring info is
 * in the exit's data (prepare_emulation_failure_exit: flags, [instruction
 * bytes], exit reason, info1, info2, intr_info, error code). SVM reports
 * EXITINTINFO (intr_info) and its error code; VMX reports IDT-vectoring
 * info (info2) without the error code, so an exception with an error code
 * cannot be redelivered there.
 */
std::optional<Vectoring> failed_delivery(const InternalErrorExit &ie, const kvm_vcpu_events &e)
{
	if (ie.suberror == KVM_INTERNAL_ERROR_DELIVERY_EV) {
		if (e.exception.injected)
			return Vectoring{e.exception.nr, 3, e.exception.has_error_code != 0,
					 e.exception.error_code};
		if (e.nmi.injected)
			return Vectoring{2, 2, false, 0};
		if (e.interrupt.injected && !e.interrupt.soft)
			return Vectoring{e.interrupt.nr, 0, false, 0};
		return std::nullopt;
	}
	if (ie.suberror != KVM_INTERNAL_ERROR_EMULATION || ie.data.empty())
		return std::nullopt;
	const std::size_t info = (ie.data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) ? 3 : 1;
	if (ie.data.size() < info + 5)
		return std::nullopt;
	const bool amd = host_is_amd();
	const std::uint64_t v = amd ? ie.data[info + 3] : ie.data[info + 2];
	if (!(v >> 31 & 1))
		return std::nullopt;
	Vectoring ev{static_cast<std::uint8_t>(v), static_cast<std::uint8_t>(v >> 8 & 7),
		     (v >> 11 & 1) != 0, 0};
	if (ev.has_error_code) {
		if (!amd)
			return std::nullopt; /* VMX: the error code is not reported */
		ev.error_code = static_cast<std::uint32_t>(ie.data[info + 4]);
	}
	return ev;
}

} // namespace

/*
 * Deliver the event in 64-bit mode as the processor would (SDM 6.14,
 * APM 8.9): the IDT gate, the stack (IST, or RSPn from the TSS on a
 * privilege change, else the current one, aligned to 16 bytes), the frame
 * SS, RSP, RFLAGS, CS, RIP [, error code], then CS:RIP from the gate and
 * RFLAGS with TF, NT, RF (and IF for an interrupt gate) clear. Each 8-byte
 * push is checked against the maps. A frame on writable sub-pages is
 * written and the event delivered. A frame touching a protected sub-page is
 * reported once; allow_once writes it and delivers. The guest cannot go on
 * without its frame, so drop and stop end Vcpu::run() with the violation
 * and leave the event undelivered, queued as KVM had it (running the vCPU
 * again retries the delivery). Anything this does not model (legacy modes,
 * LDT selectors, software interrupts, a gate or stack that would fault) is
 * left to the caller, as KVM reported it.
 */
ExitAction SppEngine::complete_delivery(Vcpu &vcpu, Exit &exit)
{
	const auto &ie = std::get<InternalErrorExit>(exit);
	kvm_vcpu_events events = vcpu.events();
	auto ev = failed_delivery(ie, events);
	if (!ev || ev->type > 3)
		return ExitAction::pass;
	return deliver_event(vcpu, ev->vector, ev->type,
			     ev->has_error_code ? std::optional(ev->error_code) : std::nullopt, events,
			     exit);
}

ExitAction SppEngine::deliver_event(Vcpu &vcpu, std::uint8_t vector, std::uint8_t type,
				    std::optional<std::uint32_t> error_code,
				    kvm_vcpu_events events, Exit &exit)
{
	const Vectoring stored{vector, type, error_code.has_value(), error_code.value_or(0)};
	const Vectoring *ev = &stored;

	kvm_regs regs = vcpu.regs();
	kvm_sregs sregs = vcpu.sregs();
	const std::uint64_t efer_lma = 1u << 10;
	if (!(sregs.efer & efer_lma) || !sregs.cs.l)
		return ExitAction::pass;

	/* The gate. */
	if (ev->vector * 16ull + 15 > sregs.idt.limit)
		return ExitAction::pass;
	const auto gate = read_guest_object<std::array<std::uint64_t, 2>>(
		vcpu, sregs.idt.base + ev->vector * 16ull);
	if (!gate)
		return ExitAction::pass;
	const std::uint64_t lo = (*gate)[0], hi = (*gate)[1];
	const unsigned gtype = lo >> 40 & 0xf;
	if (!(lo >> 47 & 1) || (gtype != 0xe && gtype != 0xf))
		return ExitAction::pass;
	const std::uint16_t sel = lo >> 16 & 0xffff;
	const unsigned ist = lo >> 32 & 7;
	const std::uint64_t target = (lo & 0xffff) | (lo >> 48 & 0xffff) << 16 |
				     (hi & 0xffffffffull) << 32;

	/* The code segment. */
	if ((sel & 4) || (sel | 7) > sregs.gdt.limit || !(sel & ~7))
		return ExitAction::pass;
	const auto descriptor = read_guest_object<std::uint64_t>(vcpu, sregs.gdt.base + (sel & ~7));
	if (!descriptor)
		return ExitAction::pass;
	const std::uint64_t desc = *descriptor;
	const bool code = (desc >> 43 & 3) == 3, present = desc >> 47 & 1, longmode = desc >> 53 & 1;
	if (!code || !present || !longmode)
		return ExitAction::pass;
	const unsigned cpl = sregs.cs.selector & 3;
	const unsigned new_cpl = (desc >> 42 & 1) ? cpl : (desc >> 45 & 3);
	if (new_cpl > cpl)
		return ExitAction::pass;

	/* The stack. */
	std::optional<std::uint64_t> stack = regs.rsp;
	if (ist)
		stack = read_guest_object<std::uint64_t>(vcpu, sregs.tr.base + 0x24 + 8 * (ist - 1));
	else if (new_cpl < cpl)
		stack = read_guest_object<std::uint64_t>(vcpu, sregs.tr.base + 4 + 8 * new_cpl);
	if (!stack)
		return ExitAction::pass;
	const std::uint64_t rsp = *stack & ~0xfull;

	/* The frame, lowest address first. */
	std::array<std::uint64_t, 6> frame{};
	std::size_t n = 0;
	if (ev->has_error_code)
		frame[n++] = ev->error_code;
	frame[n++] = regs.rip;
	frame[n++] = sregs.cs.selector;
	frame[n++] = regs.rflags;
	frame[n++] = regs.rsp;
	frame[n++] = sregs.ss.selector;
	const std::uint64_t start = rsp - 8 * n;
	std::array<std::uint64_t, 6> slot_gpa{};
	for (std::size_t i = 0; i < n; i++) {
		kvm_translation t = vcpu.translate(start + 8 * i);
		if (!t.valid)
			return ExitAction::pass; /* a #PF on the push: not modelled */
		slot_gpa[i] = t.physical_address;
	}

	std::optional<std::uint64_t> first;
	auto write_frame_locked = [&] {
		for (std::size_t i = 0; i < n; i++)
			mem_.guest_write_locked(slot_gpa[i], reinterpret_cast<const std::byte *>(&frame[i]),
						8);
	};
	auto blocked_locked = [&]() -> std::optional<std::uint64_t> {
		for (std::size_t i = 0; i < n; i++) {
			MapWindow maps(*store_, "SubpageProtection (event delivery)", slot_gpa[i] / page,
				       slot_gpa[i] / page + 1);
			if (auto b = first_blocked(maps, slot_gpa[i], 8))
				return b;
		}
		return std::nullopt;
	};
	{
		auto lock = mem_.lock_shared();
		bool traps = false;
		for (std::size_t i = 0; i < n; i++) {
			if (!mem_.writable_ram_locked(slot_gpa[i], 8))
				return ExitAction::pass; /* not RAM: not a failure SPP caused */
			const std::uint64_t g = slot_gpa[i] / page;
			MapWindow maps = trap_window(*store_, "SubpageProtection (event delivery)", g, 1);
			traps |= needs_trap(g, [&](std::uint64_t x) { return maps.at(x); });
		}
		if (!traps)
			return ExitAction::pass;
		checked_++;
		first = blocked_locked();
		if (!first) {
			write_frame_locked();
			allowed_++;
		}
	}

	if (first) {
		SppViolation v{};
		v.vcpu = vcpu.id();
		v.gpa = *first;
		v.write_gpa = slot_gpa[0];
		v.size = static_cast<std::uint32_t>(8 * n);
		v.write_size = v.size;
		v.rip = regs.rip;
		std::memcpy(v.bytes.data(), frame.data(), 8 * n);
		auto blocked_now = [&] {
			auto lock = mem_.lock_shared();
			return blocked_locked();
		};
		const SppDecision d = report(vcpu, v, blocked_now);
		if (ends_run(d, true)) {
			/* Undelivered: queued again as KVM had it, for a later run to retry. */
			events.exception.injected = ev->type == 3;
			events.exception.pending = 0;
			events.exception.nr = ev->vector;
			events.exception.has_error_code = ev->has_error_code;
			events.exception.error_code = ev->error_code;
			events.nmi.injected = ev->type == 2;
			events.interrupt.injected = ev->type == 0;
			events.interrupt.nr = ev->vector;
			events.interrupt.soft = 0;
			vcpu.set_events(events);
			exit = SppViolationExit{v};
			return ExitAction::pass;
		}
		auto lock = mem_.lock_shared();
		write_frame_locked();
	}

	/* The event is delivered: nothing left to inject. */
	events.exception.injected = 0;
	events.exception.pending = 0;
	events.interrupt.injected = 0;
	events.nmi.injected = 0;
	events.interrupt.shadow = 0; /* delivery ends an STI / MOV SS shadow */
	if (ev->type == 2)
		events.nmi.masked = 1;
	vcpu.set_events(events);

	const std::uint64_t tf = 1u << 8, ifl = 1u << 9, nt = 1u << 14, rf = 1u << 16, vm = 1u << 17;
	regs.rsp = start;
	regs.rip = target;
	regs.rflags &= ~(tf | nt | rf | vm | (gtype == 0xe ? ifl : 0));
	vcpu.set_regs(regs);

	const std::uint16_t new_cs = (sel & ~3) | new_cpl;
	if (new_cs != sregs.cs.selector || new_cpl != cpl) {
		sregs.cs = segment_from_descriptor(new_cs, desc);
		if (new_cpl != cpl) {
			/* SS becomes the null selector with RPL = the new CPL (SDM 6.14.4). */
			sregs.ss = {};
			sregs.ss.selector = new_cpl;
			sregs.ss.limit = 0xffffffff;
			sregs.ss.type = 3;
			sregs.ss.s = 1;
			sregs.ss.dpl = new_cpl;
			sregs.ss.present = 1;
			sregs.ss.db = 1;
			sregs.ss.g = 1;
		}
		vcpu.set_sregs(sregs);
	}
	return ExitAction::resume;
}

ExitAction SppEngine::on_exit(Vcpu &vcpu, Exit &exit)
{
	if (auto *ie = std::get_if<InternalErrorExit>(&exit)) {
		if (ie->suberror == KVM_INTERNAL_ERROR_DELIVERY_EV ||
		    ie->suberror == KVM_INTERNAL_ERROR_EMULATION) {
			ExitAction a = complete_delivery(vcpu, exit);
			if (a == ExitAction::resume || !std::holds_alternative<InternalErrorExit>(exit))
				return a;
		}
		if (ie->suberror != KVM_INTERNAL_ERROR_EMULATION)
			return ExitAction::pass;
		ExitAction a = complete_cmpxchg16b(vcpu, exit);
		if (a == ExitAction::resume || !std::holds_alternative<InternalErrorExit>(exit))
			return a;
		a = complete_fxsave(vcpu, exit);
		if (a == ExitAction::resume || !std::holds_alternative<InternalErrorExit>(exit))
			return a;
		return raise_undefined_opcode(vcpu);
	}
	auto *m = std::get_if<MmioExit>(&exit);
	if (!m || !m->is_write() || m->data.empty())
		return ExitAction::pass;
	/*
	 * A write may straddle a page edge between guest RAM that traps and a
	 * device of the VMM (no memslot). It is decided whole: the device's
	 * part (the first piece that is not RAM, vmm_piece) reaches the VMM
	 * only if the write is performed.
	 */
	std::optional<MmioFragment> vmm_piece;
	bool vmm_pending = false; /* vmm_piece is the exit KVM waits to complete */
	MmioFragment first{};
	first.gpa = m->gpa;
	first.len = static_cast<std::uint32_t>(m->data.size());
	first.is_write = true;
	std::memcpy(first.data.data(), m->data.data(), first.len);
	{
		auto lock = mem_.lock_shared();
		if (!mem_.writable_ram_locked(m->gpa, m->data.size())) {
			/*
			 * A device write that ends at a page edge may go on into
			 * the next page: if that page traps with sub-page 0
			 * protected, the RAM part is blocked and so is the
			 * whole write; otherwise the device's part is the VMM's
			 * at once.
			 */
			const std::uint64_t next = m->gpa + m->data.size();
			if (next % page || !mem_.writable_ram_locked(next, 1))
				return ExitAction::pass;
			MapWindow maps(*store_, "SubpageProtection (guest write)", next / page,
				       next / page + 1);
			if (maps.at(next / page) & 1)
				return ExitAction::pass;
			vmm_piece = first;
		}
	}

	const kvm_regs post = vcpu.regs();
	/* The instruction that ended at RIP, for the decoders below. */
	const std::optional<PrecedingCode> code = preceding_code(vcpu, post.rip);
	/*
	 * KVM reports the pieces of one write one exit after another; the
	 * next is known only after completing this one without entering the
	 * guest (a KVM_RUN). When the instruction is known to store just this
	 * piece, that is saved.
	 */
	const StoreShape shape = code && !vmm_piece
					 ? store_shape(vcpu, *code, post, first.gpa, first.len)
					 : StoreShape{};
	const bool one_piece = shape.one_piece;
	PendingWrite w;
	w.add(first);
	while (!one_piece) {
		auto f = RunControl::next_mmio_fragment(vcpu);
		if (!f)
			break;
		if (!f->is_write)
			throw Error("KVM_RUN", EPROTO, "MMIO read inside a guest write");
		w.add(*f);
		bool ram;
		{
			auto lock = mem_.lock_shared();
			ram = mem_.writable_ram_locked(f->gpa, f->len);
		}
		if (!ram && !vmm_piece) {
			/* RAM, then the device: leave its piece to KVM for now. */
			vmm_piece = *f;
			vmm_pending = true;
			break;
		}
	}
	/* The rest of the write, once it will not reach the VMM. */
	auto drain = [&] {
		if (vmm_pending)
			while (RunControl::next_mmio_fragment(vcpu)) {
			}
		vmm_pending = false;
	};
	/* Resume, or hand the device's part of a performed write to the VMM. */
	auto done = [&] {
		if (!vmm_piece)
			return ExitAction::resume;
		exit = RunControl::replay_mmio(vcpu, *vmm_piece);
		return ExitAction::pass;
	};

	/* The (at most two) pages the write touches: their maps in one GET. */
	std::uint64_t lo = ~0ull, hi = 0;
	for (std::size_t i = 0; i < w.count; i++) {
		lo = std::min(lo, w.pieces[i].gpa / page);
		hi = std::max(hi, (w.pieces[i].gpa + w.pieces[i].len - 1) / page);
	}
	hi = std::min(hi, lo + 1);

	/* The first byte the maps block, or ~0; called with the layout locked. */
	auto first_blocked_locked = [&] {
		MapWindow maps(*store_, "SubpageProtection (guest write)", lo, hi + 1);
		for (std::size_t i = 0; i < w.count; i++) {
			const MmioFragment &f = w.pieces[i];
			if (!mem_.writable_ram_locked(f.gpa, f.len))
				continue; /* the non-RAM part of a straddling write */
			if (auto b = first_blocked(maps, f.gpa, f.len))
				return *b;
		}
		return std::numeric_limits<std::uint64_t>::max();
	};

	/*
	 * Whether KVM ran a lockable read-modify-write here (it did so
	 * non-atomically): found before the decision, as it takes ioctls.
	 */
	std::optional<RmwPlan> rmw;
	std::array<std::uint8_t, SppViolation::max_write> bytes;
	if (!w.overflow && code && shape.may_be_rmw)
		rmw = find_locked_rmw(vcpu, *code, post, first.gpa, w.data(bytes));
	std::optional<kvm_regs> regs;
	auto set_regs = [&] {
		if (regs && std::memcmp(&*regs, &post, sizeof(post)))
			vcpu.set_regs(*regs);
	};

	/* Decide on the whole write with the layout and the maps stable. */
	std::uint64_t blocked;
	{
		auto lock = mem_.lock_shared();
		blocked = first_blocked_locked();
		checked_++;
		if (blocked == ~0ull && !w.overflow) {
			perform_write_locked(mem_, w, rmw, post, regs);
			allowed_++;
		}
	}
	/*
	 * The write is decided (performed or dropped): when it was an element
	 * of rep stos/movs, decide the following elements here too.
	 */
	auto finish = [&](bool performed) {
		if (w.count == 1 && !rmw && !vmm_piece && code)
			if (auto r = continue_rep_string(vcpu, *code, post, first.gpa, first.len)) {
				regs = r->regs;
				if (r->stop) {
					set_regs();
					exit = SppViolationExit{*r->stop};
					return ExitAction::pass;
				}
			}
		set_regs();
		return performed ? done() : ExitAction::resume;
	};
	if (blocked == ~0ull && !w.overflow)
		return finish(true);
	SppViolation v{};
	v.vcpu = vcpu.id();
	v.gpa = blocked != ~0ull ? blocked : first.gpa;
	v.write_gpa = first.gpa;
	v.rip = post.rip;
	if (first.gpa % page == 0 && !vmm_piece && code)
		if (auto s = find_split_store(vcpu, *code, post, first.gpa, w.bytes)) {
			/* KVM stored the first part already: report the whole store. */
			v.gva = s->gva;
			v.write_gpa = s->first_gpa;
			v.performed = s->performed;
			vcpu.memory().read(s->first_gpa,
					   std::as_writable_bytes(std::span(v.bytes).first(s->performed)));
			v.size = s->performed;
		}
	for (std::size_t i = 0; i < w.count; i++) {
		std::memcpy(v.bytes.data() + v.size, w.pieces[i].data.data(), w.pieces[i].len);
		v.size += w.pieces[i].len;
	}
	v.write_size = v.size;

	auto blocked_now = [&]() -> std::optional<std::uint64_t> {
		auto lock = mem_.lock_shared();
		std::uint64_t b = first_blocked_locked();
		if (b != ~0ull)
			return b;
		if (w.overflow)
			return first.gpa; /* too large to perform: still the handler's */
		return std::nullopt;
	};
	switch (report(vcpu, v, blocked_now)) {
	case SppDecision::drop:
		drain();
		return finish(false);
	case SppDecision::allow_once:
		{
			auto lock = mem_.lock_shared();
			perform_write_locked(mem_, w, rmw, post, regs);
		}
		return finish(true);
	case SppDecision::stop:
		break;
	}
	drain();
	exit = SppViolationExit{v};
	return ExitAction::pass;
}

} // namespace virtkit::detail
