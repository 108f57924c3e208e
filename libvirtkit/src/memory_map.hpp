// SPDX-License-Identifier: MIT
/*
 * Internal: the regions of guest memory of one VM and their memslots.
 *
 * Locking: mu_ protects the region table and every Region's fields. Readers
 * (address lookups, host copies, MMIO completion on vCPU threads) take it
 * shared; layout changes take it exclusive. Host mappings are stable while a
 * region exists, so a pointer taken under the lock may be used after it is
 * dropped, until the region is removed or moved.
 */
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <shared_mutex>
#include <vector>

#include <virtkit/exit.hpp>
#include <virtkit/fd.hpp>
#include <virtkit/memory.hpp>

#include "slot_plan.hpp"

namespace virtkit::detail {

class MemoryMap {
public:
	MemoryMap(int vm_fd, std::uint32_t max_slots, bool dirty_ring);
	MemoryMap(const MemoryMap &) = delete;
	MemoryMap &operator=(const MemoryMap &) = delete;

	RegionId add(std::uint64_t gpa, std::uint64_t size, const RegionOptions &opts);
	void move(RegionId id, std::uint64_t new_gpa);
	void remove(RegionId id);
	RegionInfo info(RegionId id) const;
	std::vector<RegionInfo> regions() const;
	RegionInfo region_at(std::uint64_t gpa) const;
	bool contains(std::uint64_t gpa, std::uint64_t size) const;
	std::byte *host_ptr(std::uint64_t gpa, std::uint64_t size) const;
	void read(std::uint64_t gpa, std::span<std::byte> out) const;
	void write(std::uint64_t gpa, std::span<const std::byte> in);
	void copy(std::uint64_t dst, std::uint64_t src, std::uint64_t size);
	void fill(std::uint64_t gpa, std::byte value, std::uint64_t size);
	void set_dirty_log(RegionId id, bool enable);
	DirtyBitmap dirty_log(RegionId id);
	std::size_t slot_count() const;

	/*
	 * For features: make pages [gpa, gpa + pages * 4096) trap guest writes
	 * (or stop trapping). All pages must be in writable regions. All or
	 * nothing.
	 */
	void set_write_protect(std::uint64_t gpa, std::uint64_t pages, bool wp);

	/*
	 * An MMIO exit the guest took on guest RAM that currently traps writes
	 * only because of the memslot layout (a write-protected page whose
	 * feature passed it on, or a layout change in flight): complete it from
	 * the host mapping. Returns false for accesses outside RAM and for
	 * writes to read-only regions, which belong to the VMM.
	 */
	bool complete_mmio(const MmioExit &exit);

	/* Guest-physical address of a dirty-ring entry, if its slot still exists. */
	std::optional<std::uint64_t> ring_entry_gpa(std::uint32_t slot,
						    std::uint64_t offset) const;

private:
	struct Slot {
		std::uint32_t id;
		SlotSpec spec;
	};
	struct Region {
		RegionId id;
		std::uint64_t gpa;
		std::uint64_t size;
		RegionOptions opts;
		FileDesc memfd;
		Mapping map;
		std::vector<Slot> slots;
		std::vector<std::uint64_t> dirty; /* harvested from deleted slots */
		std::set<std::uint64_t> wp_pages;
	};

	Region &find(RegionId id, const char *op) const;
	const Region *find_gpa(std::uint64_t gpa) const;
	void check_free(std::uint64_t gpa, std::uint64_t size, const Region *ignore,
			const char *op) const;
	void set_slot(std::uint32_t slot, std::uint64_t gpa, std::uint64_t size,
		      void *host, std::uint32_t flags);
	std::uint32_t slot_flags(const Region &r, const SlotSpec &s) const;
	void apply_plan(Region &r, const std::vector<SlotSpec> &plan);
	void remove_slots(Region &r);
	void harvest(Region &r, const Slot &s);
	void mark_dirty_locked(Region &r, std::uint64_t off, std::uint64_t len);
	std::uint32_t alloc_slot();

	int vm_fd_;
	std::uint32_t max_slots_;
	bool dirty_ring_;
	mutable std::shared_mutex mu_;
	std::map<std::uint64_t, std::unique_ptr<Region>> regions_; /* by gpa */
	RegionId next_id_ = 1;
	std::vector<std::uint32_t> free_slots_;
	std::uint32_t next_slot_ = 0;
	std::size_t used_slots_ = 0;
};

} // namespace virtkit::detail
