// SPDX-License-Identifier: MIT
/*
 * Internal: the memslot layout of guest memory - how one region is cut into
 * KVM memslots. The planning here is pure; MemoryMap applies the plans with
 * KVM (memslot_layout.cpp) when regions or trapped pages change.
 *
 * A region is one memslot unless some of its pages must trap guest writes
 * (a read-only region, or pages write-protected by a feature such as
 * sub-page protection) or every guest access (pages an introspection tool
 * made unreadable). Write-protected pages become read-only slots - adjacent
 * pages merged into one slot -, fully trapped pages get no slot, and the
 * rest stays writable. The plan is a pure function so that re-planning can
 * diff old and new layouts and touch only the slots that change.
 */
#pragma once

#include <cstdint>
#include <vector>

#include "core/page_bitmap.hpp"

namespace virtkit::detail {

struct SlotSpec {
	std::uint64_t gpa;
	std::uint64_t size;
	std::uint64_t offset; /* into the region's memory */
	bool readonly;
	bool operator==(const SlotSpec &) const = default;
};

/*
 * Pages of a region (indices relative to it) that features take away from
 * the guest: `write` pages trap guest writes (read-only slots), `all` pages
 * have no slot at all, so every guest access to them exits (a page in both
 * is in no slot).
 */
struct TrappedPages {
	PageBitmap write;
	PageBitmap all;
};

/* No slot spans a multiple of this in guest-physical addresses. */
constexpr std::uint64_t slot_span = 1ull << 30;

/*
 * Slots for the region [gpa, gpa + size) with the given trapped pages.
 * Slots are returned in address order and cover the region except the
 * `all` pages; each lies within one slot_span-aligned span of
 * guest-physical addresses.
 */
std::vector<SlotSpec> plan_slots(std::uint64_t gpa, std::uint64_t size,
				 bool readonly, const TrappedPages &traps);

/*
 * The slots of a writable region at gpa for its pages [first, end) alone:
 * what plan_slots() gives for that range when first and end are slot
 * boundaries of the whole plan. Costs O(runs of trapped pages in the range), so
 * that re-planning around one page of a large layout stays cheap (runs of
 * trapped pages are found a word of the bitmaps at a time).
 */
std::vector<SlotSpec> plan_span(std::uint64_t gpa, std::uint64_t first, std::uint64_t end,
				const TrappedPages &traps);

} // namespace virtkit::detail
