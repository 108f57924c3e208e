// SPDX-License-Identifier: MIT
/*
 * The memslot layout of guest memory (memslot_layout.hpp): planning the
 * slots of a region, and MemoryMap applying those plans with KVM.
 */
#include "core/memslot_layout.hpp"

#include <virtkit/kvm.h>

#include <algorithm>
#include <cerrno>
#include <string>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"
#include "core/memory_map.hpp"
#include "core/run_gate.hpp"

namespace virtkit::detail {

static constexpr std::uint64_t page = 4096;
static_assert(page == GuestMemory::page_size);

/*
 * Slots for pages [first, end) of a region at gpa, cut at every
 * slot_span boundary of guest-physical addresses: KVM allocates a slot's
 * metadata (rmaps, large-page info) when the slot is created, so re-cutting
 * around one page re-creates at most slot_span of it, not a whole large
 * region; aligned boundaries keep large mappings possible.
 */
static void add_slots(std::vector<SlotSpec> &out, std::uint64_t gpa, std::uint64_t first,
		      std::uint64_t end, bool readonly)
{
	while (first < end) {
		const std::uint64_t at = gpa + first * page;
		const std::uint64_t to_boundary = (slot_span - at % slot_span) / page;
		const std::uint64_t n = std::min(end - first, to_boundary);
		out.push_back({at, n * page, first * page, readonly});
		first += n;
	}
}

std::vector<SlotSpec> plan_span(std::uint64_t gpa, std::uint64_t first, std::uint64_t end,
				const TrappedPages &traps)
{
	std::vector<SlotSpec> out;
	std::uint64_t next = first; /* first page not yet planned */
	while (next < end) {
		/* The next run of trapped pages: hidden ones (no slot), or write-trapped. */
		const std::uint64_t run_first =
			std::min(traps.write.next_set(next, end), traps.all.next_set(next, end));
		if (run_first == end)
			break;
		const bool gap = traps.all.test(run_first);
		const std::uint64_t run_end =
			gap ? traps.all.next_clear(run_first, end)
			    : std::min(traps.write.next_clear(run_first, end),
				       traps.all.next_set(run_first, end));
		add_slots(out, gpa, next, run_first, false);
		if (!gap)
			add_slots(out, gpa, run_first, run_end, true);
		next = run_end;
	}
	add_slots(out, gpa, next, end, false);
	return out;
}

std::vector<SlotSpec> plan_slots(std::uint64_t gpa, std::uint64_t size,
				 bool readonly, const TrappedPages &traps)
{
	if (readonly) {
		std::vector<SlotSpec> out;
		add_slots(out, gpa, 0, size / page, true);
		return out;
	}
	return plan_span(gpa, 0, size / page, traps);
}

/* --- MemoryMap: applying plans --- */

std::uint32_t MemoryMap::alloc_slot()
{
	if (used_slots_ >= max_slots_)
		throw Error("GuestMemory", ENOSPC,
			    "all " + std::to_string(max_slots_) + " KVM memslots are in use");
	used_slots_++;
	if (!free_slots_.empty()) {
		auto s = free_slots_.back();
		free_slots_.pop_back();
		return s;
	}
	return next_slot_++;
}

void MemoryMap::set_slot(std::uint32_t slot, std::uint64_t gpa, std::uint64_t size,
			 void *host, std::uint32_t flags)
{
	kvm_userspace_memory_region mr{};
	mr.slot = slot;
	mr.flags = flags;
	mr.guest_phys_addr = gpa;
	mr.memory_size = size;
	mr.userspace_addr = reinterpret_cast<std::uint64_t>(host);
	VK_IOCTL(vm_fd_, KVM_SET_USER_MEMORY_REGION, &mr,
		 "slot=" + std::to_string(slot) + " " + gpa_range(gpa, size) +
			 " flags=" + hex(flags),
		 vm_fd_);
}

std::uint32_t MemoryMap::slot_flags(const Region &r, const SlotSpec &s) const
{
	std::uint32_t f = 0;
	if (s.readonly)
		f |= KVM_MEM_READONLY;
	if (r.opts.dirty_log)
		f |= KVM_MEM_LOG_DIRTY_PAGES;
	return f;
}

void MemoryMap::harvest(Region &r, const Slot &s)
{
	if (!r.opts.dirty_log || dirty_ring_)
		return;
	std::uint64_t pages = s.spec.size / page;
	std::vector<std::uint64_t> bits((pages + 63) / 64);
	kvm_dirty_log log{};
	log.slot = s.id;
	log.dirty_bitmap = bits.data();
	VK_IOCTL(vm_fd_, KVM_GET_DIRTY_LOG, &log, "slot=" + std::to_string(s.id), vm_fd_);
	std::uint64_t first = s.spec.offset / page;
	for (std::uint64_t i = 0; i < pages; i++)
		if (bits[i / 64] >> (i % 64) & 1)
			r.dirty[(first + i) / 64] |= 1ull << ((first + i) % 64);
}

void MemoryMap::delete_slot(Region &r, const Slot &s)
{
	harvest(r, s);
	set_slot(s.id, s.spec.gpa, 0, r.map.data() + s.spec.offset, 0);
	free_slots_.push_back(s.id);
	used_slots_--;
}

void MemoryMap::remove_slots(Region &r)
{
	for (auto &[first, s] : r.slots)
		delete_slot(r, s);
	r.slots.clear();
}

/*
 * Replace the slots of region r that tile its pages [first, end) by plan.
 * Slots that do not change are kept (no KVM call, no TLB or dirty-log
 * disturbance); changed ones are deleted first (KVM rejects overlapping
 * slots), then the new ones created. On failure the old slots are restored
 * before the error propagates.
 */
void MemoryMap::apply_span(Region &r, std::uint64_t first, std::uint64_t end,
			   const std::vector<SlotSpec> &plan)
{
	std::vector<Slot> gone;
	std::vector<SlotSpec> todo;
	for (auto it = r.slots.lower_bound(first); it != r.slots.end() && it->first < end; ++it)
		if (std::find(plan.begin(), plan.end(), it->second.spec) == plan.end())
			gone.push_back(it->second);
	for (auto &spec : plan) {
		auto it = r.slots.find(spec.offset / page);
		if (it == r.slots.end() || !(it->second.spec == spec))
			todo.push_back(spec);
	}
	if (todo.size() > gone.size() && used_slots_ - gone.size() + todo.size() > max_slots_)
		throw Error("GuestMemory", ENOSPC,
			    "layout needs more than " + std::to_string(max_slots_) + " memslots");

	for (auto &s : gone) {
		delete_slot(r, s);
		r.slots.erase(s.spec.offset / page);
	}
	std::vector<Slot> added;
	try {
		for (auto &spec : todo) {
			Slot s{alloc_slot(), spec};
			try {
				set_slot(s.id, spec.gpa, spec.size, r.map.data() + spec.offset,
					 slot_flags(r, spec));
			} catch (...) {
				free_slots_.push_back(s.id);
				used_slots_--;
				throw;
			}
			added.push_back(s);
			r.slots.emplace(spec.offset / page, s);
		}
	} catch (...) {
		for (auto &s : added) {
			set_slot(s.id, s.spec.gpa, 0, r.map.data() + s.spec.offset, 0);
			free_slots_.push_back(s.id);
			used_slots_--;
			r.slots.erase(s.spec.offset / page);
		}
		for (auto &s : gone) {
			Slot back{alloc_slot(), s.spec};
			set_slot(back.id, s.spec.gpa, s.spec.size,
				 r.map.data() + s.spec.offset, slot_flags(r, s.spec));
			r.slots.emplace(s.spec.offset / page, back);
		}
		throw;
	}
}

void MemoryMap::apply_plan(Region &r, const std::vector<SlotSpec> &plan)
{
	apply_span(r, 0, r.size / page, plan);
}

void MemoryMap::set_traps_locked(std::uint64_t gfn, std::uint64_t n,
				 const std::function<bool(std::uint64_t)> &trapped)
{
	retrap_locked(&TrappedPages::write, gfn, n, trapped);
}

void MemoryMap::set_hidden_locked(std::uint64_t gfn, std::uint64_t n,
				  const std::function<bool(std::uint64_t)> &hidden)
{
	retrap_locked(&TrappedPages::all, gfn, n, hidden);
}

void MemoryMap::retrap_locked(PageBitmap TrappedPages::*which, std::uint64_t gfn,
			      std::uint64_t n, const std::function<bool(std::uint64_t)> &want)
{
	struct Change {
		Region *r;
		std::uint64_t lo, hi;		/* pages of r whose trap may change */
		std::uint64_t first, end;	/* the slots re-planned */
		std::vector<bool> old, now;	/* trap state of pages lo..hi-1 */
	};
	std::vector<Change> changes;
	std::uint64_t end_gfn = gfn + n;
	for (std::uint64_t g = gfn; g < end_gfn;) {
		Region *r = const_cast<Region *>(find_gpa(g * page));
		if (!r) {
			auto next = regions_.upper_bound(g * page);
			if (next == regions_.end() || next->first / page >= end_gfn)
				break;
			g = next->first / page;
			continue;
		}
		std::uint64_t base = r->gpa / page, pages = r->size / page;
		std::uint64_t lo = g - base, hi = std::min(end_gfn - base, pages);
		g = base + hi;
		if (r->opts.readonly)
			continue;
		const PageBitmap &set = r->traps.*which;
		Change c{r, lo, hi, 0, 0, {}, {}};
		c.old.resize(hi - lo);
		c.now.resize(hi - lo);
		bool differs = false;
		for (std::uint64_t p = lo; p < hi; p++) {
			const bool was = set.test(p), on = want(base + p);
			c.old[p - lo] = was;
			c.now[p - lo] = on;
			differs |= was != on;
		}
		if (!differs)
			continue;
		/*
		 * Slots touching lo - 1 .. hi may split or merge: re-plan them
		 * whole. A page in no slot (fully trapped) is a boundary itself.
		 */
		auto slot_first = [&](std::uint64_t p) {
			auto it = r->slots.upper_bound(p);
			if (it == r->slots.begin())
				return p;
			--it;
			return p < it->first + it->second.spec.size / page ? it->first : p;
		};
		auto slot_end = [&](std::uint64_t p) {
			auto it = r->slots.upper_bound(p);
			if (it == r->slots.begin())
				return p + 1;
			--it;
			std::uint64_t e = it->first + it->second.spec.size / page;
			return p < e ? e : p + 1;
		};
		c.first = slot_first(lo ? lo - 1 : 0);
		c.end = slot_end(std::min(hi, pages - 1));
		changes.push_back(std::move(c));
	}
	if (changes.empty())
		return;

	/* Room for every page first: marking and unmarking them below cannot fail. */
	for (Change &c : changes)
		(c.r->traps.*which).reserve(c.hi);
	auto set_trap = [which](Region &r, std::uint64_t p, bool on) { (r.traps.*which).assign(p, on); };
	RunGate::Pause pause(gate_);
	std::size_t done = 0;
	try {
		for (; done < changes.size(); done++) {
			Change &c = changes[done];
			for (std::uint64_t p = c.lo; p < c.hi; p++)
				set_trap(*c.r, p, c.now[p - c.lo]);
			try {
				apply_span(*c.r, c.first, c.end,
					   plan_span(c.r->gpa, c.first, c.end, c.r->traps));
			} catch (...) {
				for (std::uint64_t p = c.lo; p < c.hi; p++)
					set_trap(*c.r, p, c.old[p - c.lo]);
				throw;
			}
		}
	} catch (...) {
		while (done--) {
			Change &c = changes[done];
			for (std::uint64_t p = c.lo; p < c.hi; p++)
				set_trap(*c.r, p, c.old[p - c.lo]);
			apply_span(*c.r, c.first, c.end,
				   plan_span(c.r->gpa, c.first, c.end, c.r->traps));
		}
		throw;
	}
}

bool MemoryMap::hidden_locked(std::uint64_t gpa) const
{
	const Region *r = find_gpa(gpa);
	return r && r->traps.all.test((gpa - r->gpa) / page);
}

std::optional<std::uint64_t> MemoryMap::ring_entry_gpa(std::uint32_t slot,
						       std::uint64_t offset) const
{
	std::shared_lock lock(mu_);
	for (auto &[gpa, r] : regions_)
		for (auto &[first, s] : r->slots)
			if (s.id == slot && offset < s.spec.size / page)
				return s.spec.gpa + offset * page;
	return std::nullopt;
}

} // namespace virtkit::detail
