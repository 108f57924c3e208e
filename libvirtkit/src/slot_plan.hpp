// SPDX-License-Identifier: MIT
/*
 * Internal: how one region of guest memory is cut into KVM memslots.
 *
 * A region is one memslot unless some of its pages must trap guest writes
 * (a read-only region, or pages write-protected by a feature such as
 * sub-page protection). Write-protected pages become read-only slots -
 * adjacent pages merged into one slot - and the rest stays writable. The plan
 * is a pure function so that re-planning can diff old and new layouts and
 * touch only the slots that change.
 */
#pragma once

#include <cstdint>
#include <set>
#include <vector>

namespace virtkit::detail {

struct SlotSpec {
	std::uint64_t gpa;
	std::uint64_t size;
	std::uint64_t offset; /* into the region's memory */
	bool readonly;

	bool operator==(const SlotSpec &) const = default;
};

/*
 * Slots for the region [gpa, gpa + size) whose pages (indices relative to
 * the region) in wp_pages must trap writes. Slots are returned in address
 * order and cover the region exactly.
 */
std::vector<SlotSpec> plan_slots(std::uint64_t gpa, std::uint64_t size,
				 bool readonly, const std::set<std::uint64_t> &wp_pages);

/*
 * The slots of a writable region at gpa for its pages [first, end) alone:
 * what plan_slots() gives for that range when first and end are slot
 * boundaries of the whole plan. Costs O(protected pages in the range), so
 * that re-planning around one page of a large layout stays cheap.
 */
std::vector<SlotSpec> plan_span(std::uint64_t gpa, std::uint64_t first, std::uint64_t end,
				const std::set<std::uint64_t> &wp_pages);

} // namespace virtkit::detail
