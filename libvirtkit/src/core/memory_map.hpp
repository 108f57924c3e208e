// SPDX-License-Identifier: MIT
/*
 * Internal: the regions of guest memory of one VM and their memslots.
 * GuestMemory (guest_memory.cpp) is the VMM's side, implemented directly on
 * this table; memory_map.cpp holds the lookups; memslot_layout.cpp applies
 * the memslot plans (memslot_layout.hpp); guest_access.cpp completes guest
 * accesses that trapped.
 *
 * Locking: mu_ protects the region table and every Region's fields. Readers
 * (address lookups, host copies, MMIO completion on vCPU threads) take it
 * shared; layout changes take it exclusive. Host mappings are stable while a
 * region exists, so a pointer taken under the lock may be used after it is
 * dropped, until the region is removed or moved.
 */
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <vector>

#include <virtkit/exit.hpp>
#include <virtkit/fd.hpp>
#include <virtkit/memory.hpp>

#include "core/memslot_layout.hpp"

namespace virtkit::detail {

class RunGate;

/*
 * A feature that keeps per-page state keyed by guest-physical address
 * (sub-page protection) follows the regions through this interface. Called
 * with the map's lock held exclusively, before the change; region_moved may
 * throw to refuse the move (nothing changed then), region_removed must not.
 * region_placed may throw to refuse the region where it is (its pages need
 * memslots that are not there): the addition or move is then undone.
 */
class RegionObserver {
public:
	virtual void region_moved(std::uint64_t from, std::uint64_t to, std::uint64_t size) = 0;
	virtual void region_removed(std::uint64_t gpa, std::uint64_t size) noexcept = 0;
	/* After a region appeared at gpa (added, moved or moved back). */
	virtual void region_placed(std::uint64_t gpa, std::uint64_t size) = 0;

protected:
	~RegionObserver() = default;
};

class MemoryMap {
public:
	MemoryMap(int vm_fd, std::uint32_t max_slots, bool dirty_ring, RunGate &gate);
	MemoryMap(const MemoryMap &) = delete;
	MemoryMap &operator=(const MemoryMap &) = delete;

	/*
	 * The lookups and host access of the region table that the library's
	 * own code needs; what the VMM calls is GuestMemory (guest_memory.cpp),
	 * which works on the table directly.
	 *
	 * Host address of [gpa, gpa + size) without throwing, for many small
	 * lookups under one lock_shared() (page walks): nullptr when the range
	 * is not inside one region.
	 */
	const std::byte *host_ptr_locked(std::uint64_t gpa, std::uint64_t size) const noexcept;

	/*
	 * gpa in the VMM's mapping, with the bytes of its region before it and
	 * from it on, for copies that walk region by region; host is nullptr
	 * when gpa is no guest memory.
	 */
	struct HostExtent {
		std::byte *host;
		std::uint64_t before, after;
	};
	HostExtent host_extent_locked(std::uint64_t gpa) const noexcept;

	/*
	 * A value that changes whenever a region is added, moved or removed,
	 * to one that no MemoryMap of this process has had before: a host
	 * pointer taken under the lock may be used again under a later lock
	 * while the generation is the same (caches of host pointers across
	 * exits: read_guest_virtual_cached() in paging/vcpu_paging.cpp). Under lock()
	 * or lock_shared().
	 */
	std::uint64_t generation_locked() const noexcept { return generation_; }

	/*
	 * For features that decide about guest writes (sub-page protection):
	 * they hold the map's lock while they read their own state and complete
	 * writes, so that a decision and the layout always agree.
	 */
	std::unique_lock<std::shared_mutex> lock() { return std::unique_lock(mu_); }
	std::shared_lock<std::shared_mutex> lock_shared() const { return std::shared_lock(mu_); }
	/* Set under lock(); nullptr to detach. */
	void set_observer_locked(RegionObserver *o) { observer_ = o; }

	/* Whether [gpa, gpa + size) is writable guest RAM, in one region or several. */
	bool writable_ram_locked(std::uint64_t gpa, std::uint64_t size) const;
	/*
	 * Make the writable-RAM pages among gfn .. gfn + n - 1 trap guest
	 * writes or not, as trapped(gfn) says; pages that are not writable RAM
	 * are skipped. Vcpus are held out of the guest while slots change. All
	 * or nothing.
	 */
	void set_traps_locked(std::uint64_t gfn, std::uint64_t n,
			      const std::function<bool(std::uint64_t)> &trapped);
	/*
	 * The same for taking pages away from the guest entirely (no memslot:
	 * every guest access exits as MMIO; instruction fetches from them
	 * fail). complete_mmio() leaves such accesses to the feature.
	 */
	void set_hidden_locked(std::uint64_t gfn, std::uint64_t n,
			       const std::function<bool(std::uint64_t)> &hidden);
	/* Whether the page holding gpa is hidden. Under lock() or lock_shared(). */
	bool hidden_locked(std::uint64_t gpa) const;
	/*
	 * Perform a guest write the feature allowed: [gpa, gpa + len) must be
	 * writable RAM inside one region. Naturally aligned 1/2/4/8-byte
	 * writes are single stores, as the guest's own would be. Marks the
	 * page dirty. Under lock_shared().
	 */
	void guest_write_locked(std::uint64_t gpa, const std::byte *data, std::uint32_t len);
	/*
	 * The same for a guest read the feature allowed (on a page it hid):
	 * [gpa, gpa + len) must be RAM inside one region; naturally aligned
	 * 1/2/4/8-byte reads are single loads. Under lock_shared().
	 */
	void guest_read_locked(std::uint64_t gpa, std::byte *data, std::uint32_t len) const;
	/*
	 * lock cmpxchg16b on the 16-byte aligned guest RAM at gpa: compares with
	 * expected (low, high), stores desired if equal and marks the page
	 * dirty, else loads the current value into expected. Under
	 * lock_shared(). desired == expected reads atomically without a change.
	 */
	bool guest_cmpxchg16b_locked(std::uint64_t gpa, std::uint64_t expected[2],
				     const std::uint64_t desired[2]);
	/*
	 * A locked read-modify-write the feature performs for the guest:
	 * rmw(host) runs on the host bytes of [gpa, gpa + len), which must be
	 * writable RAM inside one region (false if not, and rmw is not
	 * called); the range is marked dirty afterwards. Under lock_shared().
	 */
	bool guest_rmw_locked(std::uint64_t gpa, std::uint32_t len,
			      const std::function<void(std::byte *host)> &rmw);

	/*
	 * An MMIO exit the guest took on guest RAM only because of the memslot
	 * layout - the VMM moved or added a region while the vCPU ran, so the
	 * access raced the new slots: complete it from the host mapping (the
	 * library's own re-planning pauses vCPUs and never needs this). Returns false for accesses outside RAM and for
	 * writes to read-only regions, which belong to the VMM.
	 */
	bool complete_mmio(const MmioExit &exit);

	/* Guest-physical address of a dirty-ring entry, if its slot still exists. */
	std::optional<std::uint64_t> ring_entry_gpa(std::uint32_t slot,
						    std::uint64_t offset) const;

private:
	friend class ::virtkit::GuestMemory;

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
		std::map<std::uint64_t, Slot> slots; /* by first page */
		std::vector<std::uint64_t> dirty; /* harvested from deleted slots */
		TrappedPages traps;
	};

	Region &find(RegionId id, const char *op) const;
	const Region *find_gpa(std::uint64_t gpa) const;
	void check_free(std::uint64_t gpa, std::uint64_t size, const Region *ignore,
			const char *op) const;
	void set_slot(std::uint32_t slot, std::uint64_t gpa, std::uint64_t size,
		      void *host, std::uint32_t flags);
	std::uint32_t slot_flags(const Region &r, const SlotSpec &s) const;
	void apply_plan(Region &r, const std::vector<SlotSpec> &plan);
	void retrap_locked(PageBitmap TrappedPages::*which, std::uint64_t gfn,
			   std::uint64_t n, const std::function<bool(std::uint64_t)> &want);
	void apply_span(Region &r, std::uint64_t first, std::uint64_t end,
			const std::vector<SlotSpec> &plan);
	void delete_slot(Region &r, const Slot &s);
	void remove_slots(Region &r);
	void harvest(Region &r, const Slot &s);
	void mark_dirty_locked(Region &r, std::uint64_t off, std::uint64_t len);
	std::uint32_t alloc_slot();
	/* The regions are about to change: a new generation_. Under mu_, exclusive. */
	void regions_changing_locked() noexcept;

	int vm_fd_;
	RunGate &gate_;
	RegionObserver *observer_ = nullptr;
	std::uint32_t max_slots_;
	bool dirty_ring_;
	mutable std::shared_mutex mu_;
	std::uint64_t generation_; /* under mu_ */
	std::map<std::uint64_t, std::unique_ptr<Region>> regions_; /* by gpa */
	RegionId next_id_ = 1;
	std::vector<std::uint32_t> free_slots_;
	std::uint32_t next_slot_ = 0;
	std::size_t used_slots_ = 0;
};

/* Whether [gpa, gpa + size) wraps past 2^64. */
inline bool range_wraps(std::uint64_t gpa, std::uint64_t size) noexcept
{
	return size && gpa + size - 1 < gpa;
}

/* "gpa=0x... size=0x..." for errors about a guest-physical range. */
std::string gpa_range(std::uint64_t gpa, std::uint64_t size);

/* The friend through which library internals reach a GuestMemory's map. */
struct GuestMemoryAccess {
	static const MemoryMap &map(const GuestMemory &m) noexcept { return m.map_; }
};

} // namespace virtkit::detail
