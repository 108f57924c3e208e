// SPDX-License-Identifier: MIT
/*
 * virtkit::x86::PageTables - builds and walks x86-64 page tables (4- or
 * 5-level) stored in guest-physical memory. Pure code: it reaches memory only
 * through the PhysicalMemory interface, so it is unit-tested on a plain
 * buffer and used on guest memory by GuestVm.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

namespace virtkit::x86 {

/* Leaf and table entry bits. */
inline constexpr std::uint64_t PTE_PRESENT = 1ull << 0;
inline constexpr std::uint64_t PTE_WRITABLE = 1ull << 1;
inline constexpr std::uint64_t PTE_USER = 1ull << 2;
inline constexpr std::uint64_t PTE_ACCESSED = 1ull << 5;
inline constexpr std::uint64_t PTE_DIRTY = 1ull << 6;
inline constexpr std::uint64_t PTE_LARGE = 1ull << 7;
inline constexpr std::uint64_t PTE_GLOBAL = 1ull << 8;
inline constexpr std::uint64_t PTE_NX = 1ull << 63;
inline constexpr std::uint64_t PTE_ADDR_MASK = 0x000ffffffffff000ull;
inline constexpr unsigned PTE_PKEY_SHIFT = 59;

enum class PageSize : std::uint64_t {
	k4 = 1ull << 12,
	m2 = 1ull << 21,
	g1 = 1ull << 30,
};

struct PageFlags {
	bool writable = true;
	bool user = false;
	bool executable = true;
	bool global = false;
	std::uint8_t pkey = 0; /* protection key, bits 62:59 of the leaf */
};

struct Translation {
	std::uint64_t gpa;
	PageSize size;
	std::uint64_t leaf; /* the leaf entry */
};

/* Where page tables live: guest-physical pages the builder can read and write. */
class PhysicalMemory {
public:
	/* Host pointer to the 4 KiB page at gpa (page aligned); throws if absent. */
	virtual std::byte *page(std::uint64_t gpa) = 0;
	/* A new zeroed page for a table; returns its gpa. */
	virtual std::uint64_t alloc_table_page() = 0;

protected:
	~PhysicalMemory() = default;
};

class PageTables {
public:
	/* levels: 4 or 5. Allocates the root table. */
	PageTables(PhysicalMemory &mem, int levels = 4);

	std::uint64_t root() const noexcept { return root_; }
	int levels() const noexcept { return levels_; }

	/*
	 * Map [gva, gva + size) to [gpa, gpa + size) with pages of `page`
	 * size. Addresses and size must be aligned to the page size and gva
	 * canonical. A page already mapped is an error (EEXIST); nothing is
	 * changed then.
	 */
	void map(std::uint64_t gva, std::uint64_t gpa, std::uint64_t size,
		 const PageFlags &flags = {}, PageSize page = PageSize::k4);
	/* Remove the mappings of [gva, gva + size) (4 KiB pages). */
	void unmap(std::uint64_t gva, std::uint64_t size);

	/* Software walk; nullopt when not mapped. */
	std::optional<Translation> translate(std::uint64_t gva) const;
	/* Whether any page of [gva, gva + size) is mapped. */
	bool any_mapped(std::uint64_t gva, std::uint64_t size) const;
	/* The leaf entry of gva, for tests that flip bits (nullptr if unmapped). */
	std::uint64_t *leaf(std::uint64_t gva);

	static bool canonical(std::uint64_t gva, int levels = 4) noexcept;

private:
	std::uint64_t *entries(std::uint64_t table_gpa) const;
	std::uint64_t *walk_create(std::uint64_t gva, int leaf_level);

	PhysicalMemory &mem_;
	int levels_;
	std::uint64_t root_;
};

} // namespace virtkit::x86
