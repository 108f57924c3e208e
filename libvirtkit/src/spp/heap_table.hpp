// SPDX-License-Identifier: MIT
/*
 * Internal: a userspace owner of the shared SPPT model (common/spp_table.h),
 * with table pages from the heap. Not thread-safe; its owner locks.
 */
#pragma once

#include <cstdint>
#include <span>

#include "spp_table.h"

namespace virtkit::detail {

class SppTable {
public:
	SppTable();
	~SppTable();
	SppTable(const SppTable &) = delete;
	SppTable &operator=(const SppTable &) = delete;

	/* VK_SPPT_OK or a VK_SPPT_E* code; see common/spp_table.h. */
	int set(std::uint64_t gfn, std::span<const std::uint32_t> maps);
	int fill(std::uint64_t gfn, std::uint64_t npages, std::uint32_t map);
	int get(std::uint64_t gfn, std::span<std::uint32_t> maps) const;
	/* One page's map; all-writable beyond the table's reach. */
	std::uint32_t get(std::uint64_t gfn) const;

private:
	vk_sppt t_;
};

} // namespace virtkit::detail
