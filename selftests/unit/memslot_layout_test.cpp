// SPDX-License-Identifier: MIT
/* virtkit::detail::plan_slots (core/memslot_layout.hpp): cutting a region into memslots. */
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/memslot_layout.hpp"

using virtkit::detail::SlotSpec;
using virtkit::detail::slot_span;
using virtkit::detail::PageBitmap;
using virtkit::detail::TrappedPages;

namespace {

constexpr std::uint64_t page = 4096;
constexpr std::uint64_t base = 0x100000;

/* plan_slots() with write-trapped pages wp and fully trapped pages hidden. */
std::vector<SlotSpec> plan_slots(std::uint64_t gpa, std::uint64_t size, bool readonly,
				 std::set<std::uint64_t> wp, std::set<std::uint64_t> hidden = {})
{
	return virtkit::detail::plan_slots(gpa, size, readonly,
					   TrappedPages{PageBitmap::of(wp), PageBitmap::of(hidden)});
}

std::string show(const std::vector<SlotSpec> &v)
{
	std::ostringstream os;
	os << std::hex;
	for (const auto &s : v)
		os << "{gpa=0x" << s.gpa << " size=0x" << s.size << " off=0x" << s.offset
		   << (s.readonly ? " ro" : " rw") << "} ";
	return os.str();
}

/* The invariants every plan keeps. */
void check_covers(std::uint64_t gpa, std::uint64_t size, bool readonly,
		  const std::set<std::uint64_t> &wp, const std::set<std::uint64_t> &hidden,
		  const std::vector<SlotSpec> &slots)
{
	INFO("plan: " << show(slots));
	auto gap = [&](std::uint64_t p) { return !readonly && hidden.count(p); };
	std::uint64_t next = 0, sum = 0, gaps = 0;
	for (std::size_t i = 0; i < slots.size(); i++) {
		const auto &s = slots[i];
		CHECK(s.size > 0);
		CHECK(s.size % page == 0);
		/* In order; what lies between two slots is hidden pages only. */
		CHECK(s.offset >= next);
		for (std::uint64_t p = next / page; p < s.offset / page; p++, gaps++)
			CHECK(gap(p));
		CHECK(s.gpa == gpa + s.offset);
		for (std::uint64_t p = s.offset / page; p < (s.offset + s.size) / page; p++) {
			bool want_ro = readonly || wp.count(p);
			if (s.readonly != want_ro || gap(p)) {
				FAIL_CHECK("page " << p << " readonly=" << s.readonly);
				break;
			}
		}
		/* Within one slot_span; maximal: touching neighbours differ, or a span ends. */
		CHECK(s.gpa / slot_span == (s.gpa + s.size - 1) / slot_span);
		if (i > 0 && slots[i - 1].offset + slots[i - 1].size == s.offset)
			CHECK((slots[i - 1].readonly != s.readonly || s.gpa % slot_span == 0));
		next = s.offset + s.size;
		sum += s.size;
	}
	for (std::uint64_t p = next / page; p < size / page; p++, gaps++)
		CHECK(gap(p));
	CHECK(sum + gaps * page == size);
}

} // namespace

TEST_CASE("plan: whole region is one writable slot", "[slot_plan]")
{
	auto v = plan_slots(base, 16 * page, false, {});
	REQUIRE(v.size() == 1);
	CHECK(v[0] == SlotSpec{base, 16 * page, 0, false});
}

TEST_CASE("plan: one-page region", "[slot_plan]")
{
	CHECK(plan_slots(0, page, false, {}) == std::vector<SlotSpec>{{0, page, 0, false}});
	CHECK(plan_slots(0, page, false, {0}) == std::vector<SlotSpec>{{0, page, 0, true}});
}

TEST_CASE("plan: readonly region is one readonly slot", "[slot_plan]")
{
	auto v = plan_slots(base, 16 * page, true, {});
	REQUIRE(v.size() == 1);
	CHECK(v[0] == SlotSpec{base, 16 * page, 0, true});

	SECTION("write-protected pages change nothing") {
		CHECK(plan_slots(base, 16 * page, true, {1, 2, 9}) == v);
	}
}

TEST_CASE("plan: one protected page in the middle makes three slots", "[slot_plan]")
{
	auto v = plan_slots(base, 16 * page, false, {5});
	INFO(show(v));
	REQUIRE(v.size() == 3);
	CHECK(v[0] == SlotSpec{base, 5 * page, 0, false});
	CHECK(v[1] == SlotSpec{base + 5 * page, page, 5 * page, true});
	CHECK(v[2] == SlotSpec{base + 6 * page, 10 * page, 6 * page, false});
}

TEST_CASE("plan: adjacent protected pages are merged", "[slot_plan]")
{
	auto v = plan_slots(base, 16 * page, false, {4, 5, 6});
	INFO(show(v));
	REQUIRE(v.size() == 3);
	CHECK(v[0] == SlotSpec{base, 4 * page, 0, false});
	CHECK(v[1] == SlotSpec{base + 4 * page, 3 * page, 4 * page, true});
	CHECK(v[2] == SlotSpec{base + 7 * page, 9 * page, 7 * page, false});

	SECTION("two separate runs") {
		auto w = plan_slots(base, 16 * page, false, {2, 3, 8, 9, 10});
		INFO(show(w));
		REQUIRE(w.size() == 5);
		CHECK(w[0] == SlotSpec{base, 2 * page, 0, false});
		CHECK(w[1] == SlotSpec{base + 2 * page, 2 * page, 2 * page, true});
		CHECK(w[2] == SlotSpec{base + 4 * page, 4 * page, 4 * page, false});
		CHECK(w[3] == SlotSpec{base + 8 * page, 3 * page, 8 * page, true});
		CHECK(w[4] == SlotSpec{base + 11 * page, 5 * page, 11 * page, false});
	}
	SECTION("every page protected") {
		std::set<std::uint64_t> all;
		for (std::uint64_t p = 0; p < 16; p++)
			all.insert(p);
		CHECK(plan_slots(base, 16 * page, false, all) ==
		      std::vector<SlotSpec>{{base, 16 * page, 0, true}});
	}
}

TEST_CASE("plan: protected first page", "[slot_plan]")
{
	auto v = plan_slots(base, 8 * page, false, {0});
	INFO(show(v));
	REQUIRE(v.size() == 2);
	CHECK(v[0] == SlotSpec{base, page, 0, true});
	CHECK(v[1] == SlotSpec{base + page, 7 * page, page, false});
}

TEST_CASE("plan: protected last page", "[slot_plan]")
{
	auto v = plan_slots(base, 8 * page, false, {7});
	INFO(show(v));
	REQUIRE(v.size() == 2);
	CHECK(v[0] == SlotSpec{base, 7 * page, 0, false});
	CHECK(v[1] == SlotSpec{base + 7 * page, page, 7 * page, true});
}

TEST_CASE("plan: protected pages beyond the region are ignored", "[slot_plan]")
{
	SECTION("only beyond") {
		CHECK(plan_slots(base, 8 * page, false, {8, 9, 100}) ==
		      std::vector<SlotSpec>{{base, 8 * page, 0, false}});
	}
	SECTION("a run crossing the end is cut at the end") {
		auto v = plan_slots(base, 8 * page, false, {6, 7, 8, 9});
		INFO(show(v));
		REQUIRE(v.size() == 2);
		CHECK(v[0] == SlotSpec{base, 6 * page, 0, false});
		CHECK(v[1] == SlotSpec{base + 6 * page, 2 * page, 6 * page, true});
	}
	SECTION("mixed inside and beyond") {
		auto v = plan_slots(base, 8 * page, false, {3, 12});
		INFO(show(v));
		REQUIRE(v.size() == 3);
		CHECK(v[0] == SlotSpec{base, 3 * page, 0, false});
		CHECK(v[1] == SlotSpec{base + 3 * page, page, 3 * page, true});
		CHECK(v[2] == SlotSpec{base + 4 * page, 4 * page, 4 * page, false});
	}
}

TEST_CASE("plan: slots cover the region exactly (random sets)", "[slot_plan]")
{
	std::mt19937_64 rng(0x5eed1234);
	for (int iter = 0; iter < 200; iter++) {
		std::uint64_t pages = 1 + rng() % 64;
		std::uint64_t gpa = (rng() % 0x100000) * page;
		bool readonly = rng() % 8 == 0;
		std::set<std::uint64_t> wp;
		/* Vary density: sparse, dense, beyond-the-end pages. */
		unsigned density = rng() % 4;
		for (std::uint64_t p = 0; p < pages + 8; p++)
			if (rng() % 4 < density)
				wp.insert(p);
		INFO("iter " << iter << " pages=" << pages << " readonly=" << readonly
			     << " density=" << density);
		check_covers(gpa, pages * page, readonly, wp, {},
			     plan_slots(gpa, pages * page, readonly, wp));
	}
}

/*
 * Re-planning touches only the slots around a change: planning the span
 * between two slot boundaries of the full plan must give exactly the full
 * plan's slots there, so that splicing it into the old layout is correct.
 */
TEST_CASE("plan_span between slot boundaries equals the full plan there", "[slot_plan]")
{
	using virtkit::detail::plan_span;
	std::mt19937_64 rng(0xabcdef01);
	for (int iter = 0; iter < 500; iter++) {
		std::uint64_t pages = 1 + rng() % 96;
		std::uint64_t gpa = (rng() % 0x100000) * page;
		std::set<std::uint64_t> wp;
		unsigned density = rng() % 4;
		for (std::uint64_t p = 0; p < pages; p++)
			if (rng() % 4 < density)
				wp.insert(p);
		auto full = plan_slots(gpa, pages * page, false, wp);
		std::size_t a = rng() % full.size();
		std::size_t b = a + rng() % (full.size() - a);
		std::uint64_t first = full[a].offset / page;
		std::uint64_t end = (full[b].offset + full[b].size) / page;
		INFO("iter " << iter << " pages=" << pages << " span " << first << ".." << end);
		auto span = plan_span(gpa, first, end, TrappedPages{PageBitmap::of(wp), {}});
		CHECK(span == std::vector<SlotSpec>(full.begin() + a, full.begin() + b + 1));
	}
}

TEST_CASE("plan: slots are cut at slot_span boundaries", "[slot_plan]")
{
	/* 2.5 GiB from 0.75 GiB, one page protected right before the 2 GiB line. */
	const std::uint64_t gpa = 3 * slot_span / 4, size = 5 * slot_span / 2;
	const std::uint64_t p = (2 * slot_span - gpa) / page - 1;
	auto v = plan_slots(gpa, size, false, {p});
	INFO(show(v));
	check_covers(gpa, size, false, {p}, {}, v);
	REQUIRE(v.size() == 5);
	CHECK(v[0] == SlotSpec{gpa, slot_span / 4, 0, false});
	CHECK(v[1] == SlotSpec{slot_span, slot_span - page, slot_span / 4, false});
	CHECK(v[2] == SlotSpec{2 * slot_span - page, page, p * page, true});
	CHECK(v[3] == SlotSpec{2 * slot_span, slot_span, (p + 1) * page, false});
	CHECK(v[4] == SlotSpec{3 * slot_span, slot_span / 4, (p + 1) * page + slot_span, false});

	/* Re-planning around the page re-cuts only its span. */
	auto span = virtkit::detail::plan_span(gpa, v[1].offset / page,
					       (v[2].offset + v[2].size) / page,
					       TrappedPages{PageBitmap::of(std::set<std::uint64_t>{p}), {}});
	CHECK(span == std::vector<SlotSpec>(v.begin() + 1, v.begin() + 3));

	/* A read-only region is cut the same way. */
	auto ro = plan_slots(gpa, size, true, {});
	CHECK(ro.size() == 4);
	check_covers(gpa, size, true, {}, {}, ro);
}

TEST_CASE("plan: fully trapped pages get no slot", "[slot_plan]")
{
	auto v = plan_slots(base, 16 * page, false, {}, {5});
	INFO(show(v));
	REQUIRE(v.size() == 2);
	CHECK(v[0] == SlotSpec{base, 5 * page, 0, false});
	CHECK(v[1] == SlotSpec{base + 6 * page, 10 * page, 6 * page, false});

	SECTION("next to write-trapped pages, and in both sets") {
		auto w = plan_slots(base, 16 * page, false, {3, 4, 5, 6}, {5, 7});
		INFO(show(w));
		REQUIRE(w.size() == 4);
		CHECK(w[0] == SlotSpec{base, 3 * page, 0, false});
		CHECK(w[1] == SlotSpec{base + 3 * page, 2 * page, 3 * page, true});
		CHECK(w[2] == SlotSpec{base + 6 * page, page, 6 * page, true});
		CHECK(w[3] == SlotSpec{base + 8 * page, 8 * page, 8 * page, false});
	}
	SECTION("every page hidden: no slot") {
		std::set<std::uint64_t> all;
		for (std::uint64_t p = 0; p < 4; p++)
			all.insert(p);
		CHECK(plan_slots(base, 4 * page, false, {}, all).empty());
	}
}

TEST_CASE("plan: write and full traps (random sets)", "[slot_plan]")
{
	using virtkit::detail::plan_span;
	std::mt19937_64 rng(0x41d3);
	for (int iter = 0; iter < 300; iter++) {
		std::uint64_t pages = 1 + rng() % 64;
		std::uint64_t gpa = (rng() % 0x100000) * page;
		std::set<std::uint64_t> wp, hidden;
		for (std::uint64_t p = 0; p < pages + 4; p++) {
			if (rng() % 3 == 0)
				wp.insert(p);
			if (rng() % 5 == 0)
				hidden.insert(p);
		}
		INFO("iter " << iter << " pages=" << pages);
		auto full = plan_slots(gpa, pages * page, false, wp, hidden);
		check_covers(gpa, pages * page, false, wp, hidden, full);
		/* A span from a slot's start (or a hidden page) to a slot's end. */
		if (full.empty())
			continue;
		std::size_t a = rng() % full.size();
		std::size_t b = a + rng() % (full.size() - a);
		std::uint64_t first = full[a].offset / page;
		std::uint64_t end = (full[b].offset + full[b].size) / page;
		auto span = plan_span(gpa, first, end, TrappedPages{PageBitmap::of(wp), PageBitmap::of(hidden)});
		CHECK(span == std::vector<SlotSpec>(full.begin() + a, full.begin() + b + 1));
	}
}
