// SPDX-License-Identifier: MIT
#include "core/memory_map.hpp"

#include <virtkit/kvm.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"
#include "core/run_gate.hpp"

namespace virtkit::detail {

static constexpr std::uint64_t page = GuestMemory::page_size;
static constexpr std::uint64_t huge_page = 2ull << 20;

static std::string range(std::uint64_t gpa, std::uint64_t size)
{
	return "gpa=" + hex(gpa) + " size=" + hex(size);
}

/* [gpa, gpa + size) without wrapping past 2^64. */
static bool wraps(std::uint64_t gpa, std::uint64_t size)
{
	return size && gpa + size - 1 < gpa;
}

MemoryMap::MemoryMap(int vm_fd, std::uint32_t max_slots, bool dirty_ring, RunGate &gate)
	: vm_fd_(vm_fd), gate_(gate), max_slots_(max_slots), dirty_ring_(dirty_ring) {}

/* The region with this id; ENOENT naming the caller's operation. */
MemoryMap::Region &MemoryMap::find(RegionId id, const char *op) const
{
	for (auto &[gpa, r] : regions_)
		if (r->id == id)
			return *r;
	throw Error(op, ENOENT, "no region with id " + std::to_string(id));
}

const MemoryMap::Region *MemoryMap::find_gpa(std::uint64_t gpa) const
{
	auto it = regions_.upper_bound(gpa);
	if (it == regions_.begin())
		return nullptr;
	--it;
	const Region &r = *it->second;
	return gpa - r.gpa < r.size ? &r : nullptr;
}

/* EEXIST, naming the caller's operation, if [gpa, gpa + size) overlaps a region. */
void MemoryMap::check_free(std::uint64_t gpa, std::uint64_t size, const Region *ignore,
			   const char *op) const
{
	for (auto &[rgpa, r] : regions_) {
		if (r.get() == ignore)
			continue;
		if (gpa < r->gpa + r->size && r->gpa < gpa + size)
			throw Error(op, EEXIST,
				    range(gpa, size) + " overlaps region " +
					    std::to_string(r->id) + " (" +
					    range(r->gpa, r->size) + ")");
	}
}

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
		 "slot=" + std::to_string(slot) + " " + range(gpa, size) +
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

void MemoryMap::mark_dirty_locked(Region &r, std::uint64_t off, std::uint64_t len)
{
	if (!r.opts.dirty_log || !len)
		return;
	/* Runs under the shared lock on vCPU threads: set bits atomically. */
	for (std::uint64_t p = off / page; p <= (off + len - 1) / page; p++)
		std::atomic_ref(r.dirty[p / 64]).fetch_or(1ull << (p % 64));
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

RegionId MemoryMap::add(std::uint64_t gpa, std::uint64_t size, const RegionOptions &opts)
{
	if (!size || gpa % page || size % page || wraps(gpa, size))
		throw Error("GuestMemory::add", EINVAL,
			    range(gpa, size) + ": must be non-empty, page aligned and not wrap");
	if (opts.dirty_log && opts.readonly)
		throw Error("GuestMemory::add", EINVAL,
			    "dirty logging of a read-only region");
	if (opts.huge_pages && (gpa % huge_page || size % huge_page))
		throw Error("GuestMemory::add", EINVAL,
			    range(gpa, size) + ": huge-page regions must be 2 MiB aligned");
	/* Checked here: memfd_create's EINVAL would quote the whole name. */
	if (opts.name.size() > RegionOptions::max_name)
		throw Error("GuestMemory::add", EINVAL,
			    "region name \"" + opts.name.substr(0, 32) + "...\" is " +
				    std::to_string(opts.name.size()) + " bytes long, at most " +
				    std::to_string(RegionOptions::max_name) + " are allowed");

	std::unique_lock lock(mu_);
	check_free(gpa, size, nullptr, "GuestMemory::add");

	auto r = std::make_unique<Region>();
	r->id = next_id_;
	r->gpa = gpa;
	r->size = size;
	r->opts = opts;
	std::string name = opts.name.empty() ? "virtkit-ram" : "virtkit-" + opts.name;
	r->memfd = FileDesc::memfd(name.c_str(), opts.huge_pages ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
	if (::ftruncate(r->memfd.get(), static_cast<off_t>(size)) < 0)
		throw Error("ftruncate", errno, name + " " + range(gpa, size));
	r->map = Mapping::map(size, PROT_READ | PROT_WRITE, MAP_SHARED,
			      r->memfd.get(), 0, name.c_str());
	/* hugetlbfs reserves at mmap; touching proves the pages exist (no SIGBUS later). */
	if (opts.huge_pages && ::madvise(r->map.data(), size, MADV_POPULATE_WRITE) < 0)
		throw Error("madvise(MADV_POPULATE_WRITE)", errno,
			    name + " " + range(gpa, size) + ": not enough free huge pages");
	r->dirty.assign((size / page + 63) / 64, 0);
	apply_plan(*r, plan_slots(gpa, size, opts.readonly, r->traps));

	next_id_++;
	RegionId id = r->id;
	bool writable = !opts.readonly;
	regions_.emplace(gpa, std::move(r));
	if (observer_ && writable)
		observer_->region_placed(gpa, size);
	return id;
}

void MemoryMap::move(RegionId id, std::uint64_t new_gpa)
{
	std::unique_lock lock(mu_);
	Region &r = find(id, "GuestMemory::move");
	if (new_gpa % page || wraps(new_gpa, r.size))
		throw Error("GuestMemory::move", EINVAL,
			    "region " + std::to_string(id) + " to " + range(new_gpa, r.size));
	check_free(new_gpa, r.size, &r, "GuestMemory::move");
	if (new_gpa == r.gpa)
		return;
	if (observer_ && !r.opts.readonly)
		observer_->region_moved(r.gpa, new_gpa, r.size);

	auto node = regions_.extract(r.gpa);
	std::uint64_t old_gpa = r.gpa;
	remove_slots(r);
	r.gpa = new_gpa;
	try {
		apply_plan(r, plan_slots(r.gpa, r.size, r.opts.readonly, r.traps));
	} catch (...) {
		r.gpa = old_gpa;
		apply_plan(r, plan_slots(r.gpa, r.size, r.opts.readonly, r.traps));
		node.key() = old_gpa;
		regions_.insert(std::move(node));
		if (observer_ && !r.opts.readonly) {
			observer_->region_moved(new_gpa, old_gpa, r.size);
			observer_->region_placed(old_gpa, r.size);
		}
		throw;
	}
	node.key() = new_gpa;
	regions_.insert(std::move(node));
	if (observer_ && !r.opts.readonly)
		observer_->region_placed(new_gpa, r.size);
}

void MemoryMap::remove(RegionId id)
{
	std::unique_lock lock(mu_);
	Region &r = find(id, "GuestMemory::remove");
	if (observer_ && !r.opts.readonly)
		observer_->region_removed(r.gpa, r.size);
	for (auto &[first, s] : r.slots) {
		set_slot(s.id, s.spec.gpa, 0, r.map.data() + s.spec.offset, 0);
		free_slots_.push_back(s.id);
		used_slots_--;
	}
	r.slots.clear();
	regions_.erase(r.gpa);
}

static RegionInfo info_of(const RegionId id, std::uint64_t gpa, std::uint64_t size,
			  const RegionOptions &o, std::byte *host)
{
	return RegionInfo{id, gpa, size, o, host};
}

RegionInfo MemoryMap::info(RegionId id) const
{
	std::shared_lock lock(mu_);
	Region &r = find(id, "GuestMemory::info");
	return info_of(r.id, r.gpa, r.size, r.opts, r.map.data());
}

std::vector<RegionInfo> MemoryMap::regions() const
{
	std::shared_lock lock(mu_);
	std::vector<RegionInfo> v;
	for (auto &[gpa, r] : regions_)
		v.push_back(info_of(r->id, r->gpa, r->size, r->opts, r->map.data()));
	return v;
}

std::optional<RegionInfo> MemoryMap::try_region_at(std::uint64_t gpa) const
{
	std::shared_lock lock(mu_);
	const Region *r = find_gpa(gpa);
	if (!r)
		return std::nullopt;
	return info_of(r->id, r->gpa, r->size, r->opts, r->map.data());
}

RegionInfo MemoryMap::region_at(std::uint64_t gpa) const
{
	if (auto r = try_region_at(gpa))
		return std::move(*r);
	throw Error("GuestMemory::region_at", ENOENT, "gpa=" + hex(gpa));
}

bool MemoryMap::contains(std::uint64_t gpa, std::uint64_t size) const
{
	if (wraps(gpa, size))
		return false;
	std::shared_lock lock(mu_);
	while (size) {
		const Region *r = find_gpa(gpa);
		if (!r)
			return false;
		std::uint64_t n = std::min(size, r->gpa + r->size - gpa);
		gpa += n;
		size -= n;
	}
	return true;
}

std::byte *MemoryMap::host_ptr(std::uint64_t gpa, std::uint64_t size) const
{
	std::shared_lock lock(mu_);
	/* The regions' mappings are writable; the const is host_ptr_locked()'s. */
	if (auto *p = host_ptr_locked(gpa, size))
		return const_cast<std::byte *>(p);
	throw Error("GuestMemory::host_ptr", EFAULT,
		    range(gpa, size) + " is not inside one region");
}

const std::byte *MemoryMap::host_ptr_locked(std::uint64_t gpa, std::uint64_t size) const noexcept
{
	const Region *r = wraps(gpa, size) ? nullptr : find_gpa(gpa);
	if (!r || size > r->gpa + r->size - gpa)
		return nullptr;
	return r->map.data() + (gpa - r->gpa);
}

void MemoryMap::read(std::uint64_t gpa, std::span<std::byte> out) const
{
	std::shared_lock lock(mu_);
	if (wraps(gpa, out.size()))
		throw Error("GuestMemory::read", EFAULT, range(gpa, out.size()));
	/* Check the whole range first: all or nothing. */
	for (std::uint64_t a = gpa, left = out.size(); left;) {
		const Region *r = find_gpa(a);
		if (!r)
			throw Error("GuestMemory::read", EFAULT,
				    range(gpa, out.size()) + ": no guest memory at " + hex(a));
		std::uint64_t n = std::min(left, r->gpa + r->size - a);
		a += n;
		left -= n;
	}
	std::size_t done = 0;
	while (done < out.size()) {
		const Region *r = find_gpa(gpa + done);
		std::uint64_t off = gpa + done - r->gpa;
		std::size_t n = std::min<std::uint64_t>(out.size() - done, r->size - off);
		std::memcpy(out.data() + done, r->map.data() + off, n);
		done += n;
	}
}

void MemoryMap::write(std::uint64_t gpa, std::span<const std::byte> in)
{
	std::shared_lock lock(mu_);
	if (wraps(gpa, in.size()))
		throw Error("GuestMemory::write", EFAULT, range(gpa, in.size()));
	for (std::uint64_t a = gpa, left = in.size(); left;) {
		const Region *r = find_gpa(a);
		if (!r)
			throw Error("GuestMemory::write", EFAULT,
				    range(gpa, in.size()) + ": no guest memory at " + hex(a));
		std::uint64_t n = std::min(left, r->gpa + r->size - a);
		a += n;
		left -= n;
	}
	std::size_t done = 0;
	while (done < in.size()) {
		const Region *r = find_gpa(gpa + done);
		std::uint64_t off = gpa + done - r->gpa;
		std::size_t n = std::min<std::uint64_t>(in.size() - done, r->size - off);
		std::memcpy(r->map.data() + off, in.data() + done, n);
		done += n;
	}
}

void MemoryMap::copy(std::uint64_t dst, std::uint64_t src, std::uint64_t size)
{
	std::vector<std::byte> buf(size);
	read(src, buf);
	write(dst, buf);
}

void MemoryMap::fill(std::uint64_t gpa, std::byte value, std::uint64_t size)
{
	std::vector<std::byte> buf(size, value);
	write(gpa, buf);
}

void MemoryMap::set_dirty_log(RegionId id, bool enable)
{
	std::unique_lock lock(mu_);
	Region &r = find(id, "GuestMemory::set_dirty_log");
	if (enable && r.opts.readonly)
		throw Error("GuestMemory::set_dirty_log", EINVAL,
			    "region " + std::to_string(id) + " is read-only");
	if (r.opts.dirty_log == enable)
		return;
	r.opts.dirty_log = enable;
	try {
		for (auto &[first, s] : r.slots)
			set_slot(s.id, s.spec.gpa, s.spec.size, r.map.data() + s.spec.offset,
				 slot_flags(r, s.spec));
	} catch (...) {
		r.opts.dirty_log = !enable;
		for (auto &[first, s] : r.slots)
			set_slot(s.id, s.spec.gpa, s.spec.size, r.map.data() + s.spec.offset,
				 slot_flags(r, s.spec));
		throw;
	}
	std::fill(r.dirty.begin(), r.dirty.end(), 0);
}

DirtyBitmap MemoryMap::dirty_log(RegionId id)
{
	std::unique_lock lock(mu_);
	Region &r = find(id, "GuestMemory::dirty_log");
	if (!r.opts.dirty_log)
		throw Error("GuestMemory::dirty_log", EINVAL,
			    "dirty logging is off for region " + std::to_string(id));
	if (dirty_ring_)
		throw Error("GuestMemory::dirty_log", EINVAL,
			    "the VM uses the dirty ring; use Vcpu::harvest_dirty_ring");
	for (auto &[first, s] : r.slots)
		harvest(r, s);
	DirtyBitmap bm{r.gpa, r.size / page, r.dirty};
	std::fill(r.dirty.begin(), r.dirty.end(), 0);
	return bm;
}

std::size_t MemoryMap::slot_count() const
{
	std::shared_lock lock(mu_);
	return used_slots_;
}

bool MemoryMap::writable_ram_locked(std::uint64_t gpa, std::uint64_t size) const
{
	if (wraps(gpa, size))
		return false;
	while (size) {
		const Region *r = find_gpa(gpa);
		if (!r || r->opts.readonly)
			return false;
		std::uint64_t n = std::min(size, r->gpa + r->size - gpa);
		gpa += n;
		size -= n;
	}
	return true;
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

void MemoryMap::retrap_locked(std::set<std::uint64_t> TrappedPages::*which, std::uint64_t gfn,
			      std::uint64_t n, const std::function<bool(std::uint64_t)> &want)
{
	struct Change {
		Region *r;
		std::uint64_t lo, hi;		/* pages of r whose trap may change */
		std::uint64_t first, end;	/* the slots re-planned */
		std::vector<bool> old;		/* trap state of pages lo..hi-1 */
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
		auto &set = r->traps.*which;
		Change c{r, lo, hi, 0, 0, {}};
		bool differs = false;
		for (std::uint64_t p = lo; p < hi; p++) {
			bool was = set.count(p), on = want(base + p);
			c.old.push_back(was);
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

	auto set_trap = [which](Region &r, std::uint64_t p, bool on) {
		if (on)
			(r.traps.*which).insert(p);
		else
			(r.traps.*which).erase(p);
	};
	RunGate::Pause pause(gate_);
	std::size_t done = 0;
	try {
		for (; done < changes.size(); done++) {
			Change &c = changes[done];
			std::uint64_t base = c.r->gpa / page;
			for (std::uint64_t p = c.lo; p < c.hi; p++)
				set_trap(*c.r, p, want(base + p));
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
	return r && r->traps.all.count((gpa - r->gpa) / page);
}

/*
 * A naturally aligned 1, 2, 4 or 8-byte guest access is one load or store
 * on the processor: call access(T{}) with its unsigned type T and return
 * true; false for any other size or alignment.
 */
template <class Access>
static bool single_access(std::uint64_t gpa, std::uint32_t len, Access &&access)
{
	if (len == 0 || (gpa & (len - 1)))
		return false;
	switch (len) {
	case 1: access(std::uint8_t{}); return true;
	case 2: access(std::uint16_t{}); return true;
	case 4: access(std::uint32_t{}); return true;
	case 8: access(std::uint64_t{}); return true;
	default: return false;
	}
}

void MemoryMap::guest_write_locked(std::uint64_t gpa, const std::byte *data, std::uint32_t len)
{
	auto *r = const_cast<Region *>(find_gpa(gpa));
	if (!r || r->opts.readonly || len > r->gpa + r->size - gpa)
		throw Error("GuestMemory", EFAULT, range(gpa, len) + " is not writable RAM");
	std::byte *host = r->map.data() + (gpa - r->gpa);
	/* Other vCPUs read this memory directly: do not tear aligned stores. */
	if (!single_access(gpa, len, [&](auto v) {
		    std::memcpy(&v, data, sizeof(v));
		    __atomic_store_n(reinterpret_cast<decltype(v) *>(host), v, __ATOMIC_RELAXED);
	    }))
		std::memcpy(host, data, len);
	mark_dirty_locked(*r, gpa - r->gpa, len);
}

void MemoryMap::guest_read_locked(std::uint64_t gpa, std::byte *data, std::uint32_t len) const
{
	const Region *r = find_gpa(gpa);
	if (!r || len > r->gpa + r->size - gpa)
		throw Error("GuestMemory", EFAULT, range(gpa, len) + " is not RAM");
	const std::byte *host = r->map.data() + (gpa - r->gpa);
	/* Other vCPUs write this memory directly: do not tear aligned loads. */
	if (!single_access(gpa, len, [&](auto v) {
		    v = __atomic_load_n(reinterpret_cast<const decltype(v) *>(host),
					__ATOMIC_RELAXED);
		    std::memcpy(data, &v, sizeof(v));
	    }))
		std::memcpy(data, host, len);
}

bool MemoryMap::guest_cmpxchg16b_locked(std::uint64_t gpa, std::uint64_t expected[2],
					const std::uint64_t desired[2])
{
	auto *r = const_cast<Region *>(find_gpa(gpa));
	if (!r || r->opts.readonly || gpa % 16 || 16 > r->gpa + r->size - gpa)
		throw Error("GuestMemory", EFAULT, range(gpa, 16) + " is not aligned writable RAM");
	std::byte *host = r->map.data() + (gpa - r->gpa);
	bool equal;
	asm volatile("lock cmpxchg16b %1"
		     : "=@ccz"(equal), "+m"(*reinterpret_cast<unsigned __int128 *>(host)),
		       "+a"(expected[0]), "+d"(expected[1])
		     : "b"(desired[0]), "c"(desired[1])
		     : "memory");
	if (equal && (desired[0] != expected[0] || desired[1] != expected[1]))
		mark_dirty_locked(*r, gpa - r->gpa, 16);
	return equal;
}

bool MemoryMap::complete_mmio(const MmioExit &exit)
{
	std::shared_lock lock(mu_);
	auto *r = const_cast<Region *>(find_gpa(exit.gpa));
	if (!r || exit.data.size() > r->gpa + r->size - exit.gpa)
		return false;
	if (exit.is_write() && r->opts.readonly)
		return false;
	/* Pages a feature took from the guest are that feature's to complete. */
	std::uint64_t last = exit.gpa + (exit.data.empty() ? 0 : exit.data.size() - 1);
	if (hidden_locked(exit.gpa) || hidden_locked(last))
		return false;
	std::byte *host = r->map.data() + (exit.gpa - r->gpa);
	if (exit.is_write()) {
		std::memcpy(host, exit.data.data(), exit.data.size());
		mark_dirty_locked(*r, exit.gpa - r->gpa, exit.data.size());
	} else {
		std::memcpy(exit.data.data(), host, exit.data.size());
	}
	return true;
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
