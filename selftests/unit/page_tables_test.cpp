// SPDX-License-Identifier: MIT
/*
 * virtkit::x86::PageTables on a plain buffer: the entries it writes (checked
 * bit by bit against the architecture's layout), its software walk, and the
 * arguments it refuses without changing anything.
 */
#include <catch2/catch.hpp>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include <virtkit/error.hpp>
#include <virtkit/x86/page_tables.hpp>

using namespace virtkit::x86;

namespace {

constexpr std::uint64_t page = 4096;

/* Guest-physical memory as a map of separately allocated pages. */
class FakeMemory : public PhysicalMemory {
public:
	std::byte *page(std::uint64_t gpa) override
	{
		REQUIRE(gpa % 4096 == 0);
		auto it = pages_.find(gpa);
		if (it == pages_.end())
			throw virtkit::Error("FakeMemory", EFAULT, "no page");
		return it->second.get();
	}
	std::uint64_t alloc_table_page() override
	{
		std::uint64_t gpa = next_;
		next_ += 4096;
		auto p = std::make_unique<std::byte[]>(4096);
		std::memset(p.get(), 0, 4096);
		pages_.emplace(gpa, std::move(p));
		return gpa;
	}
	std::uint64_t entry(std::uint64_t table, unsigned index)
	{
		std::uint64_t e;
		std::memcpy(&e, page(table) + index * 8, 8);
		return e;
	}
	std::size_t tables() const { return pages_.size(); }
	/* A byte-for-byte copy of every table, to show that nothing changed. */
	std::vector<std::byte> snapshot() const
	{
		std::vector<std::byte> v;
		for (auto &[gpa, p] : pages_)
			v.insert(v.end(), p.get(), p.get() + 4096);
		return v;
	}

private:
	std::map<std::uint64_t, std::unique_ptr<std::byte[]>> pages_;
	std::uint64_t next_ = 0x100000;
};

int error_of(auto &&fn)
{
	try {
		fn();
	} catch (const virtkit::Error &e) {
		return e.err();
	}
	return 0;
}

} // namespace

TEST_CASE("a 4 KiB mapping writes one entry per level with the architectural bits", "[page_tables]")
{
	FakeMemory mem;
	PageTables pt(mem, 4);
	const std::uint64_t gva = 0x00007f1234567000ull, gpa = 0xabcd000;
	pt.map(gva, gpa, page, {.writable = false, .user = true, .executable = false, .pkey = 9});

	std::uint64_t table = pt.root();
	for (int level = 4; level > 1; level--) {
		unsigned idx = (gva >> (12 + 9 * (level - 1))) & 511;
		std::uint64_t e = mem.entry(table, idx);
		INFO("level " << level);
		/* Non-leaf entries are permissive: the leaf decides. */
		CHECK((e & (PTE_PRESENT | PTE_WRITABLE | PTE_USER)) == (PTE_PRESENT | PTE_WRITABLE | PTE_USER));
		CHECK((e & PTE_NX) == 0);
		CHECK((e & PTE_LARGE) == 0);
		table = e & PTE_ADDR_MASK;
	}
	std::uint64_t leaf = mem.entry(table, (gva >> 12) & 511);
	CHECK((leaf & PTE_ADDR_MASK) == gpa);
	CHECK((leaf & PTE_PRESENT) != 0);
	CHECK((leaf & PTE_WRITABLE) == 0);
	CHECK((leaf & PTE_USER) != 0);
	CHECK((leaf & PTE_NX) != 0);
	CHECK((leaf >> 59 & 15) == 9);
	CHECK(mem.tables() == 4);
}

TEST_CASE("translate walks 4 KiB, 2 MiB and 1 GiB pages", "[page_tables]")
{
	FakeMemory mem;
	PageTables pt(mem, 4);
	pt.map(0x400000, 0x7000, page);
	pt.map(0x40000000, 0x80200000, 2 * (2ull << 20), {}, PageSize::m2);
	pt.map(0x8000000000ull, 0x40000000, 1ull << 30, {}, PageSize::g1);

	auto t = pt.translate(0x400123);
	REQUIRE(t);
	CHECK(t->gpa == 0x7123);
	CHECK(t->size == PageSize::k4);

	t = pt.translate(0x40000000 + (2ull << 20) + 0x1234);
	REQUIRE(t);
	CHECK(t->gpa == 0x80200000 + (2ull << 20) + 0x1234);
	CHECK(t->size == PageSize::m2);
	CHECK((t->leaf & PTE_LARGE) != 0);

	t = pt.translate(0x8000000000ull + 0x3456789);
	REQUIRE(t);
	CHECK(t->gpa == 0x40000000 + 0x3456789);
	CHECK(t->size == PageSize::g1);

	CHECK_FALSE(pt.translate(0x401000));
	CHECK_FALSE(pt.translate(0x8000000000ull + (1ull << 30)));
	CHECK_FALSE(pt.translate(0x8000000000000000ull)); /* non-canonical */
}

TEST_CASE("5-level tables use bits 56:48 and accept 57-bit addresses", "[page_tables]")
{
	FakeMemory mem;
	PageTables pt(mem, 5);
	CHECK(pt.levels() == 5);
	const std::uint64_t gva = 0x00ff000000001000ull; /* canonical only with LA57 */
	CHECK_FALSE(PageTables::canonical(gva, 4));
	CHECK(PageTables::canonical(gva, 5));
	pt.map(gva, 0x5000, page);
	std::uint64_t e5 = mem.entry(pt.root(), (gva >> 48) & 511);
	CHECK((e5 & PTE_PRESENT) != 0);
	auto t = pt.translate(gva + 8);
	REQUIRE(t);
	CHECK(t->gpa == 0x5008);
	CHECK(mem.tables() == 5);
}

TEST_CASE("unmap removes leaves; leaf() exposes them for tests", "[page_tables]")
{
	FakeMemory mem;
	PageTables pt(mem);
	pt.map(0x10000, 0x20000, 4 * page);
	REQUIRE(pt.leaf(0x11000));
	*pt.leaf(0x11000) &= ~PTE_WRITABLE;
	CHECK((pt.translate(0x11000)->leaf & PTE_WRITABLE) == 0);
	pt.unmap(0x11000, 2 * page);
	CHECK(pt.translate(0x10000));
	CHECK_FALSE(pt.translate(0x11000));
	CHECK_FALSE(pt.translate(0x12000));
	CHECK(pt.translate(0x13000));
	CHECK(pt.any_mapped(0x11000, 3 * page));
	CHECK_FALSE(pt.any_mapped(0x11000, 2 * page));
	/* The freed range can be mapped again. */
	pt.map(0x11000, 0x99000, page);
	CHECK(pt.translate(0x11000)->gpa == 0x99000);
}

TEST_CASE("bad mappings are refused and change nothing", "[page_tables]")
{
	FakeMemory mem;
	PageTables pt(mem);
	pt.map(0x200000, 0x200000, 2ull << 20, {}, PageSize::m2);
	pt.map(0x600000, 0x1000, page);
	auto before = mem.snapshot();
	auto tables = mem.tables();

	CHECK(error_of([&] { pt.map(0x1001, 0x1000, page); }) == EINVAL);	  /* gva alignment */
	CHECK(error_of([&] { pt.map(0x1000, 0x1001, page); }) == EINVAL);	  /* gpa alignment */
	CHECK(error_of([&] { pt.map(0x1000, 0x1000, 100); }) == EINVAL);	  /* size */
	CHECK(error_of([&] { pt.map(0x1000, 0x1000, 0); }) == EINVAL);	  /* empty */
	CHECK(error_of([&] { pt.map(0x400000, 0x1000, 2ull << 20, {}, PageSize::m2); }) == EINVAL);
	CHECK(error_of([&] { pt.map(0x0000800000000000ull, 0, page); }) == EINVAL); /* non-canonical */
	CHECK(error_of([&] { pt.map(0x00007ffffffff000ull, 0, 2 * page); }) == EINVAL); /* runs off */
	CHECK(error_of([&] { pt.map(0xfffffffffffff000ull, 0, 2 * page); }) == EINVAL); /* wraps */
	CHECK(error_of([&] { pt.map(0x1000, 0x0010000000000000ull, page); }) == EINVAL); /* gpa > 52 bits */
	CHECK(error_of([&] { pt.map(0x1000, 0x1000, page, {.pkey = 16}); }) == EINVAL);
	/* Overlaps: with a 4 KiB page, inside a 2 MiB page, a range covering one. */
	CHECK(error_of([&] { pt.map(0x600000, 0x2000, page); }) == EEXIST);
	CHECK(error_of([&] { pt.map(0x300000, 0x2000, page); }) == EEXIST);
	CHECK(error_of([&] { pt.map(0x5ff000, 0x2000, 2 * page); }) == EEXIST);
	CHECK(error_of([] { FakeMemory m; PageTables p(m, 3); }) == EINVAL);

	CHECK(mem.tables() == tables);
	CHECK(mem.snapshot() == before);
}
