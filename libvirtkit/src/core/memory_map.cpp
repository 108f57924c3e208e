// SPDX-License-Identifier: MIT
/*
 * MemoryMap: the region table's lookups. The VMM's side of guest memory
 * (GuestMemory) is guest_memory.cpp; how regions become memslots is
 * memslot_layout.cpp; completing guest accesses that trapped is
 * guest_access.cpp.
 */
#include "core/memory_map.hpp"

#include <atomic>
#include <cerrno>
#include <string>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"

namespace virtkit::detail {

static constexpr std::uint64_t page = GuestMemory::page_size;

std::string gpa_range(std::uint64_t gpa, std::uint64_t size)
{
	return "gpa=" + hex(gpa) + " size=" + hex(size);
}

/* Generations are unique in the process: a new map at a freed one's address has its own. */
static std::atomic<std::uint64_t> next_generation{1};

MemoryMap::MemoryMap(int vm_fd, std::uint32_t max_slots, bool dirty_ring, RunGate &gate)
	: vm_fd_(vm_fd), gate_(gate), max_slots_(max_slots), dirty_ring_(dirty_ring),
	  generation_(next_generation.fetch_add(1, std::memory_order_relaxed))
{
}

void MemoryMap::regions_changing_locked() noexcept
{
	generation_ = next_generation.fetch_add(1, std::memory_order_relaxed);
}

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

const std::byte *MemoryMap::host_ptr_locked(std::uint64_t gpa, std::uint64_t size) const noexcept
{
	const Region *r = range_wraps(gpa, size) ? nullptr : find_gpa(gpa);
	if (!r || size > r->gpa + r->size - gpa)
		return nullptr;
	return r->map.data() + (gpa - r->gpa);
}

MemoryMap::HostExtent MemoryMap::host_extent_locked(std::uint64_t gpa) const noexcept
{
	const Region *r = find_gpa(gpa);
	if (!r)
		return {nullptr, 0, 0};
	return {r->map.data() + (gpa - r->gpa), gpa - r->gpa, r->gpa + r->size - gpa};
}

bool MemoryMap::writable_ram_locked(std::uint64_t gpa, std::uint64_t size) const
{
	if (range_wraps(gpa, size))
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
