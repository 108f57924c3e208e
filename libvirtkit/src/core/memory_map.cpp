// SPDX-License-Identifier: MIT
/*
 * MemoryMap: the region table and the VMM's access to guest memory through
 * it. How regions become memslots is memslot_layout.cpp; completing guest
 * accesses that trapped is guest_access.cpp.
 */
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

std::string gpa_range(std::uint64_t gpa, std::uint64_t size)
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
				    gpa_range(gpa, size) + " overlaps region " +
					    std::to_string(r->id) + " (" +
					    gpa_range(r->gpa, r->size) + ")");
	}
}

void MemoryMap::mark_dirty_locked(Region &r, std::uint64_t off, std::uint64_t len)
{
	if (!r.opts.dirty_log || !len)
		return;
	/* Runs under the shared lock on vCPU threads: set bits atomically. */
	for (std::uint64_t p = off / page; p <= (off + len - 1) / page; p++)
		std::atomic_ref(r.dirty[p / 64]).fetch_or(1ull << (p % 64));
}

RegionId MemoryMap::add(std::uint64_t gpa, std::uint64_t size, const RegionOptions &opts)
{
	if (!size || gpa % page || size % page || wraps(gpa, size))
		throw Error("GuestMemory::add", EINVAL,
			    gpa_range(gpa, size) + ": must be non-empty, page aligned and not wrap");
	if (opts.dirty_log && opts.readonly)
		throw Error("GuestMemory::add", EINVAL,
			    "dirty logging of a read-only region");
	if (opts.huge_pages && (gpa % huge_page || size % huge_page))
		throw Error("GuestMemory::add", EINVAL,
			    gpa_range(gpa, size) + ": huge-page regions must be 2 MiB aligned");

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
		throw Error("ftruncate", errno, name + " " + gpa_range(gpa, size));
	r->map = Mapping::map(size, PROT_READ | PROT_WRITE, MAP_SHARED,
			      r->memfd.get(), 0, name.c_str());
	/* hugetlbfs reserves at mmap; touching proves the pages exist (no SIGBUS later). */
	if (opts.huge_pages && ::madvise(r->map.data(), size, MADV_POPULATE_WRITE) < 0)
		throw Error("madvise(MADV_POPULATE_WRITE)", errno,
			    name + " " + gpa_range(gpa, size) + ": not enough free huge pages");
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
			    "region " + std::to_string(id) + " to " + gpa_range(new_gpa, r.size));
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
	/* The regions' mappings are writable; the const is host_ptr_locked()'s. */
	if (auto *p = host_ptr_locked(gpa, size))
		return const_cast<std::byte *>(p);
	throw Error("GuestMemory::host_ptr", EFAULT,
		    gpa_range(gpa, size) + " is not inside one region");
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
		throw Error("GuestMemory::read", EFAULT, gpa_range(gpa, out.size()));
	/* Check the whole range first: all or nothing. */
	for (std::uint64_t a = gpa, left = out.size(); left;) {
		const Region *r = find_gpa(a);
		if (!r)
			throw Error("GuestMemory::read", EFAULT,
				    gpa_range(gpa, out.size()) + ": no guest memory at " + hex(a));
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
		throw Error("GuestMemory::write", EFAULT, gpa_range(gpa, in.size()));
	for (std::uint64_t a = gpa, left = in.size(); left;) {
		const Region *r = find_gpa(a);
		if (!r)
			throw Error("GuestMemory::write", EFAULT,
				    gpa_range(gpa, in.size()) + ": no guest memory at " + hex(a));
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

} // namespace virtkit::detail
