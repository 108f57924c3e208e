// SPDX-License-Identifier: MIT
#include "spp/heap_table.hpp"

#include <cstdlib>
#include <cstring>

namespace virtkit::detail {

static __u64 alloc_page(void *)
{
	void *p = std::aligned_alloc(4096, 4096);
	if (!p)
		return 0;
	std::memset(p, 0, 4096);
	return reinterpret_cast<std::uintptr_t>(p);
}

static void free_page(void *, __u64 addr)
{
	std::free(reinterpret_cast<void *>(static_cast<std::uintptr_t>(addr)));
}

static __u64 *map_page(void *, __u64 addr)
{
	return reinterpret_cast<__u64 *>(static_cast<std::uintptr_t>(addr));
}

static const vk_sppt_ops heap_ops = {alloc_page, free_page, map_page, nullptr};

/* Heap addresses are user-space virtual addresses: below 2^47. */
SppTable::SppTable() { vk_sppt_init(&t_, &heap_ops, nullptr, 52); }
SppTable::~SppTable() { vk_sppt_destroy(&t_); }

int SppTable::set(std::uint64_t gfn, std::span<const std::uint32_t> maps)
{
	return vk_sppt_set(&t_, gfn, maps.size(), maps.data());
}

int SppTable::fill(std::uint64_t gfn, std::uint64_t npages, std::uint32_t map)
{
	return vk_sppt_fill(&t_, gfn, npages, map);
}

int SppTable::get(std::uint64_t gfn, std::span<std::uint32_t> maps) const
{
	return vk_sppt_get(&t_, gfn, maps.size(), maps.data());
}

std::uint32_t SppTable::get(std::uint64_t gfn) const
{
	std::uint32_t m = VK_SPP_ALL_WRITABLE;
	if (gfn >= VK_SPPT_GFN_LIMIT || vk_sppt_get(&t_, gfn, 1, &m) != VK_SPPT_OK)
		return VK_SPP_ALL_WRITABLE;
	return m;
}

} // namespace virtkit::detail
