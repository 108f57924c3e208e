// SPDX-License-Identifier: MIT
#include "memory_map.hpp"

#include <virtkit/kvm.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include <virtkit/error.hpp>

#include "ioctl.hpp"

namespace virtkit::detail {

static constexpr std::uint64_t page = GuestMemory::page_size;

static std::string range(std::uint64_t gpa, std::uint64_t size)
{
	return "gpa=" + hex(gpa) + " size=" + hex(size);
}

/* [gpa, gpa + size) without wrapping past 2^64. */
static bool wraps(std::uint64_t gpa, std::uint64_t size)
{
	return size && gpa + size - 1 < gpa;
}

MemoryMap::MemoryMap(int vm_fd, std::uint32_t max_slots, bool dirty_ring)
	: vm_fd_(vm_fd), max_slots_(max_slots), dirty_ring_(dirty_ring) {}

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

void MemoryMap::remove_slots(Region &r)
{
	for (auto &s : r.slots) {
		harvest(r, s);
		set_slot(s.id, s.spec.gpa, 0, r.map.data() + s.spec.offset, 0);
		free_slots_.push_back(s.id);
		used_slots_--;
	}
	r.slots.clear();
}

/*
 * Move region r to a new slot layout. Slots that do not change are kept (no
 * KVM call, no TLB or dirty-log disturbance); changed ones are deleted first
 * (KVM rejects overlapping slots), then the new ones created. On failure the
 * old layout is restored before the error propagates.
 */
void MemoryMap::apply_plan(Region &r, const std::vector<SlotSpec> &plan)
{
	std::vector<Slot> keep, gone;
	for (auto &s : r.slots)
		(std::find(plan.begin(), plan.end(), s.spec) != plan.end() ? keep : gone).push_back(s);

	if (plan.size() > keep.size() &&
	    used_slots_ - gone.size() + (plan.size() - keep.size()) > max_slots_)
		throw Error("GuestMemory", ENOSPC,
			    "layout needs more than " + std::to_string(max_slots_) + " memslots");

	for (auto &s : gone) {
		harvest(r, s);
		set_slot(s.id, s.spec.gpa, 0, r.map.data() + s.spec.offset, 0);
		free_slots_.push_back(s.id);
		used_slots_--;
	}
	r.slots = keep;

	std::vector<Slot> added;
	try {
		for (auto &spec : plan) {
			if (std::any_of(keep.begin(), keep.end(),
					[&](const Slot &k) { return k.spec == spec; }))
				continue;
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
		}
	} catch (...) {
		for (auto &s : added) {
			set_slot(s.id, s.spec.gpa, 0, r.map.data() + s.spec.offset, 0);
			free_slots_.push_back(s.id);
			used_slots_--;
		}
		for (auto &s : gone) {
			Slot back{alloc_slot(), s.spec};
			set_slot(back.id, s.spec.gpa, s.spec.size,
				 r.map.data() + s.spec.offset, slot_flags(r, s.spec));
			r.slots.push_back(back);
		}
		throw;
	}
	r.slots.insert(r.slots.end(), added.begin(), added.end());
	std::sort(r.slots.begin(), r.slots.end(),
		  [](const Slot &a, const Slot &b) { return a.spec.gpa < b.spec.gpa; });
}

RegionId MemoryMap::add(std::uint64_t gpa, std::uint64_t size, const RegionOptions &opts)
{
	if (!size || gpa % page || size % page || wraps(gpa, size))
		throw Error("GuestMemory::add", EINVAL,
			    range(gpa, size) + ": must be non-empty, page aligned and not wrap");
	if (opts.dirty_log && opts.readonly)
		throw Error("GuestMemory::add", EINVAL,
			    "dirty logging of a read-only region");

	std::unique_lock lock(mu_);
	check_free(gpa, size, nullptr, "GuestMemory::add");

	auto r = std::make_unique<Region>();
	r->id = next_id_;
	r->gpa = gpa;
	r->size = size;
	r->opts = opts;
	std::string name = opts.name.empty() ? "virtkit-ram" : "virtkit-" + opts.name;
	r->memfd = FileDesc::memfd(name.c_str());
	if (::ftruncate(r->memfd.get(), static_cast<off_t>(size)) < 0)
		throw Error("ftruncate", errno, name + " " + range(gpa, size));
	r->map = Mapping::map(size, PROT_READ | PROT_WRITE, MAP_SHARED,
			      r->memfd.get(), 0, name.c_str());
	r->dirty.assign((size / page + 63) / 64, 0);
	apply_plan(*r, plan_slots(gpa, size, opts.readonly, r->wp_pages));

	next_id_++;
	RegionId id = r->id;
	regions_.emplace(gpa, std::move(r));
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

	auto node = regions_.extract(r.gpa);
	std::uint64_t old_gpa = r.gpa;
	remove_slots(r);
	r.gpa = new_gpa;
	try {
		apply_plan(r, plan_slots(r.gpa, r.size, r.opts.readonly, r.wp_pages));
	} catch (...) {
		r.gpa = old_gpa;
		apply_plan(r, plan_slots(r.gpa, r.size, r.opts.readonly, r.wp_pages));
		node.key() = old_gpa;
		regions_.insert(std::move(node));
		throw;
	}
	node.key() = new_gpa;
	regions_.insert(std::move(node));
}

void MemoryMap::remove(RegionId id)
{
	std::unique_lock lock(mu_);
	Region &r = find(id, "GuestMemory::remove");
	for (auto &s : r.slots) {
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

RegionInfo MemoryMap::region_at(std::uint64_t gpa) const
{
	std::shared_lock lock(mu_);
	const Region *r = find_gpa(gpa);
	if (!r)
		throw Error("GuestMemory::region_at", ENOENT, "gpa=" + hex(gpa));
	return info_of(r->id, r->gpa, r->size, r->opts, r->map.data());
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
	const Region *r = wraps(gpa, size) ? nullptr : find_gpa(gpa);
	if (!r || size > r->gpa + r->size - gpa)
		throw Error("GuestMemory::host_ptr", EFAULT,
			    range(gpa, size) + " is not inside one region");
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
		for (auto &s : r.slots)
			set_slot(s.id, s.spec.gpa, s.spec.size, r.map.data() + s.spec.offset,
				 slot_flags(r, s.spec));
	} catch (...) {
		r.opts.dirty_log = !enable;
		for (auto &s : r.slots)
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
	for (auto &s : r.slots)
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

void MemoryMap::set_write_protect(std::uint64_t gpa, std::uint64_t pages, bool wp)
{
	if (gpa % page || pages > (~0ull / page) || wraps(gpa, pages * page))
		throw Error("GuestMemory::set_write_protect", EINVAL, range(gpa, pages * page));
	std::unique_lock lock(mu_);
	/* Validate the whole range before touching anything. */
	std::vector<Region *> touched;
	for (std::uint64_t a = gpa, end = gpa + pages * page; a < end;) {
		auto *r = const_cast<Region *>(find_gpa(a));
		if (!r || r->opts.readonly)
			throw Error("GuestMemory::set_write_protect", EFAULT,
				    range(gpa, pages * page) + ": no writable guest RAM at " + hex(a));
		touched.push_back(r);
		a = std::min(end, r->gpa + r->size);
	}
	for (Region *r : touched) {
		auto old = r->wp_pages;
		std::uint64_t lo = std::max(gpa, r->gpa), hi = std::min(gpa + pages * page, r->gpa + r->size);
		for (std::uint64_t a = lo; a < hi; a += page) {
			if (wp)
				r->wp_pages.insert((a - r->gpa) / page);
			else
				r->wp_pages.erase((a - r->gpa) / page);
		}
		try {
			apply_plan(*r, plan_slots(r->gpa, r->size, false, r->wp_pages));
		} catch (...) {
			r->wp_pages = std::move(old);
			throw;
		}
	}
}

bool MemoryMap::complete_mmio(const MmioExit &exit)
{
	std::shared_lock lock(mu_);
	auto *r = const_cast<Region *>(find_gpa(exit.gpa));
	if (!r || exit.data.size() > r->gpa + r->size - exit.gpa)
		return false;
	if (exit.is_write && r->opts.readonly)
		return false;
	std::byte *host = r->map.data() + (exit.gpa - r->gpa);
	if (exit.is_write) {
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
		for (auto &s : r->slots)
			if (s.id == slot && offset < s.spec.size / page)
				return s.spec.gpa + offset * page;
	return std::nullopt;
}

} // namespace virtkit::detail
