// SPDX-License-Identifier: MIT
#include <virtkit/x86/page_tables.hpp>

#include <cerrno>

#include <virtkit/error.hpp>

#include "core/ioctl.hpp"

namespace virtkit::x86 {

using detail::hex;

/* Level 1 holds 4 KiB leaves, level 2 2 MiB, level 3 1 GiB. */
static unsigned index_of(std::uint64_t gva, int level)
{
	return (gva >> (12 + 9 * (level - 1))) & 511;
}

static int leaf_level(PageSize p)
{
	return p == PageSize::k4 ? 1 : p == PageSize::m2 ? 2 : 3;
}

bool PageTables::canonical(std::uint64_t gva, int levels) noexcept
{
	int bits = levels == 5 ? 57 : 48;
	std::int64_t s = static_cast<std::int64_t>(gva << (64 - bits)) >> (64 - bits);
	return static_cast<std::uint64_t>(s) == gva;
}

PageTables::PageTables(PhysicalMemory &mem, int levels) : mem_(mem), levels_(levels)
{
	if (levels != 4 && levels != 5)
		throw Error("PageTables", EINVAL, "levels=" + std::to_string(levels));
	root_ = mem_.alloc_table_page();
}

std::uint64_t *PageTables::entries(std::uint64_t table_gpa) const
{
	return reinterpret_cast<std::uint64_t *>(mem_.page(table_gpa));
}

std::uint64_t *PageTables::walk_create(std::uint64_t gva, int target)
{
	std::uint64_t table = root_;
	for (int level = levels_; level > target; level--) {
		std::uint64_t &e = entries(table)[index_of(gva, level)];
		if (!(e & PTE_PRESENT)) {
			/* Tables are permissive; leaves decide the rights. */
			e = mem_.alloc_table_page() | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
		} else if (e & PTE_LARGE) {
			throw Error("PageTables::map", EEXIST,
				    "gva=" + hex(gva) + " is inside a large page");
		}
		table = e & PTE_ADDR_MASK;
	}
	return &entries(table)[index_of(gva, target)];
}

void PageTables::map(std::uint64_t gva, std::uint64_t gpa, std::uint64_t size,
		     const PageFlags &flags, PageSize page)
{
	const std::uint64_t ps = static_cast<std::uint64_t>(page);
	const std::string what = "gva=" + hex(gva) + " gpa=" + hex(gpa) + " size=" + hex(size);
	if (!size || gva % ps || gpa % ps || size % ps || gva + size - 1 < gva ||
	    !canonical(gva, levels_) || !canonical(gva + size - 1, levels_) ||
	    gpa + size - 1 < gpa || (gpa + size - 1) > PTE_ADDR_MASK || flags.pkey > 15)
		throw Error("PageTables::map", EINVAL, what);
	if (any_mapped(gva, size))
		throw Error("PageTables::map", EEXIST, what + " overlaps a mapping");

	std::uint64_t bits = PTE_PRESENT;
	if (flags.writable)
		bits |= PTE_WRITABLE;
	if (flags.user)
		bits |= PTE_USER;
	if (!flags.executable)
		bits |= PTE_NX;
	if (flags.global)
		bits |= PTE_GLOBAL;
	if (page != PageSize::k4)
		bits |= PTE_LARGE;
	bits |= static_cast<std::uint64_t>(flags.pkey) << PTE_PKEY_SHIFT;

	for (std::uint64_t off = 0; off < size; off += ps)
		*walk_create(gva + off, leaf_level(page)) = (gpa + off) | bits;
}

void PageTables::unmap(std::uint64_t gva, std::uint64_t size)
{
	for (std::uint64_t off = 0; off < size; off += 4096)
		if (auto *e = leaf(gva + off))
			*e = 0;
}

std::uint64_t *PageTables::leaf(std::uint64_t gva)
{
	if (!canonical(gva, levels_))
		return nullptr;
	std::uint64_t table = root_;
	for (int level = levels_; level >= 1; level--) {
		std::uint64_t &e = entries(table)[index_of(gva, level)];
		if (!(e & PTE_PRESENT))
			return nullptr;
		if (level == 1 || (level <= 3 && (e & PTE_LARGE)))
			return &e;
		table = e & PTE_ADDR_MASK;
	}
	return nullptr;
}

std::optional<Translation> PageTables::translate(std::uint64_t gva) const
{
	auto *e = const_cast<PageTables *>(this)->leaf(gva);
	if (!e)
		return std::nullopt;
	/* Find the level again to know the page size. */
	std::uint64_t table = root_;
	for (int level = levels_; level >= 1; level--) {
		std::uint64_t &x = entries(table)[index_of(gva, level)];
		if (&x == e) {
			PageSize size = level == 1 ? PageSize::k4
					: level == 2 ? PageSize::m2 : PageSize::g1;
			std::uint64_t ps = static_cast<std::uint64_t>(size);
			std::uint64_t base = *e & PTE_ADDR_MASK & ~(ps - 1);
			return Translation{base + (gva & (ps - 1)), size, *e};
		}
		table = x & PTE_ADDR_MASK;
	}
	return std::nullopt;
}

bool PageTables::any_mapped(std::uint64_t gva, std::uint64_t size) const
{
	for (std::uint64_t off = 0; off < size; off += 4096)
		if (translate(gva + off))
			return true;
	return false;
}

} // namespace virtkit::x86
