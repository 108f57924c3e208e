// SPDX-License-Identifier: MIT
/*
 * Sub-page protection and the guest memory layout: the maps follow regions
 * that are removed and moved, protect pages at the edge between two adjacent
 * regions (writes straddling the edge are blocked whole), survive the slot
 * re-cutting that other protections cause and host memory events on the
 * region's mapping, and leave the rest of a huge-page region mapped with
 * 2 MiB pages.
 *
 * Every guest write is run with Vcpu::run() through GuestVm; the host then
 * checks guest memory and the violations the handler recorded (all dropped).
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_probes.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t KiB = 1ull << 10;
static constexpr std::uint64_t MiB = 1ull << 20;
static constexpr std::uint64_t GiB = 1ull << 30;
static constexpr std::uint64_t PAGE = 4096;
static constexpr std::uint64_t SUB = SubpageProtection::subpage_size;
static constexpr std::uint32_t ALL = SubpageProtection::all_writable;
/* A lower-half guest-virtual address the executable does not use. */
static constexpr std::uint64_t EXTRA_GVA = 0x500000000000ull;
static constexpr std::uint64_t EXTRA_GVA2 = 0x510000000000ull;

/* Only sub-page i protected. */
static constexpr std::uint32_t only(unsigned i)
{
	return ~(1u << i);
}

/* ---- guest code ---- */

static void guest_nop(void) {}

static void guest_nop_sync(void)
{
	GUEST_SYNC(0);
}

/* One 8-byte store (a single mov, also when unaligned). */
static void guest_store(std::uint64_t gva, std::uint64_t value)
{
	/* The host may have changed the PTE of gva since the last run. */
	guest_invlpg(gva);
	__asm__ volatile("movq %1, (%0)" ::"r"(gva), "r"(value) : "memory");
	GUEST_SYNC(value);
}

/* Write i + 1 at offset 0 of every page i of [base, base + pages * 4 KiB). */
static void guest_touch_pages(std::uint64_t base, std::uint64_t pages)
{
	for (std::uint64_t i = 0; i < pages; i++)
		*(volatile std::uint64_t *)(base + i * 4096) = i + 1;
	GUEST_SYNC(pages);
}

/* ---- host side ---- */

/*
 * A guest with SPP enabled, one vCPU and a handler that records and drops
 * every violation. Extra regions are added by the tests.
 */
struct LayoutGuest {
	GuestVm g{vkt::kvm()};
	GuestMemory &mem = g.memory();
	SubpageProtection &spp = SubpageProtection::enable(g.vm());
	Vcpu &v = g.add_vcpu(guest_nop);
	std::vector<SppViolation> seen;

	LayoutGuest()
	{
		spp.on_violation([this](Vcpu &, const SppViolation &x) {
			seen.push_back(x);
			return SppDecision::drop;
		});
	}

	template <class Fn, class... Args> std::uint64_t call(Fn *fn, Args... args)
	{
		g.set_entry(v, fn, args...);
		Ucall uc = g.run(v);
		TEST_ASSERT(uc.kind == Ucall::Kind::sync, "expected GUEST_SYNC, got %s",
			    uc.describe().c_str());
		return uc.args.at(0);
	}

	/*
	 * The guest stores value (8 bytes) at gva, which is backed by
	 * write_gpa: the store must not land, not even partly, and must be
	 * reported once with gpa as its first protected byte.
	 */
	void expect_blocked(std::uint64_t gva, std::uint64_t write_gpa, std::uint64_t gpa,
			    std::uint64_t value)
	{
		auto before = mem.read_obj<std::uint64_t>(write_gpa);
		TEST_ASSERT(before != value);
		std::size_t n = seen.size();
		TEST_ASSERT_EQ(call(guest_store, gva, value), value);
		TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(write_gpa), before);
		TEST_ASSERT_EQ(seen.size(), n + 1);
		const SppViolation &x = seen.back();
		TEST_ASSERT_EQ(x.gpa, gpa);
		TEST_ASSERT_EQ(x.write_gpa, write_gpa);
		TEST_ASSERT_EQ(x.size, 8u);
		TEST_ASSERT_EQ(x.vcpu, v.id());
		std::uint64_t data;
		std::memcpy(&data, x.data().data(), 8);
		TEST_ASSERT_EQ(data, value);
	}

	/* The guest's store of value at gva (backed by gpa) lands, unreported. */
	void expect_lands(std::uint64_t gva, std::uint64_t gpa, std::uint64_t value)
	{
		TEST_ASSERT(mem.read_obj<std::uint64_t>(gpa) != value);
		std::size_t n = seen.size();
		TEST_ASSERT_EQ(call(guest_store, gva, value), value);
		TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(gpa), value);
		TEST_ASSERT_EQ(seen.size(), n);
	}

	/* Identity-mapped variants. */
	void expect_blocked(std::uint64_t write_gpa, std::uint64_t gpa, std::uint64_t value)
	{
		expect_blocked(write_gpa, write_gpa, gpa, value);
	}
	void expect_lands(std::uint64_t gpa, std::uint64_t value) { expect_lands(gpa, gpa, value); }

	/* Maps of [gfn, gfn + n): want at the listed pages, all-writable elsewhere. */
	void expect_maps(std::uint64_t gfn, std::uint64_t n,
			 std::initializer_list<std::pair<std::uint64_t, std::uint32_t>> want)
	{
		std::vector<std::uint32_t> maps(n, ALL);
		for (auto &[page, map] : want)
			maps.at(page) = map;
		auto got = spp.get_access(gfn, n);
		for (std::uint64_t i = 0; i < n; i++)
			TEST_ASSERT(got[i] == maps[i], "gfn 0x%llx: map 0x%08x, want 0x%08x",
				    (unsigned long long)(gfn + i), got[i], maps[i]);
	}
};

VK_TEST(spp_region_remove_forgets_its_maps_only)
{
	LayoutGuest t;
	const std::uint64_t a_gpa = GiB, b_gpa = GiB + MiB, size = 16 * PAGE;
	const std::uint64_t a_gfn = a_gpa / PAGE, b_gfn = b_gpa / PAGE;
	RegionId a = t.mem.add(a_gpa, size, {.name = "a"});
	t.mem.add(b_gpa, size, {.name = "b"});
	t.g.identity_map(a_gpa, size);
	t.g.identity_map(b_gpa, size);

	t.spp.set_access(a_gfn + 2, {0u});
	t.spp.set_access(b_gfn + 3, {only(1)});
	const std::uint64_t a_blocked = a_gpa + 2 * PAGE + 8;
	const std::uint64_t b_blocked = b_gpa + 3 * PAGE + SUB + 16;
	const std::uint64_t b_allowed = b_gpa + 3 * PAGE + 2 * SUB;
	t.expect_blocked(a_blocked, a_blocked, 0x1111);
	t.expect_blocked(b_blocked, b_blocked, 0x2222);
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 2u);
	std::size_t slots = t.mem.slot_count();

	t.mem.remove(a);

	/* B keeps its map and its enforcement. */
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 1u);
	t.expect_maps(b_gfn, 16, {{3, only(1)}});
	t.expect_blocked(b_blocked, b_blocked, 0x3333);
	t.expect_lands(b_allowed, 0x4444);
	/* A's pages are no guest RAM any more. */
	TEST_EXPECT_ERROR(t.spp.get_access(a_gfn, 16), EFAULT);
	TEST_EXPECT_ERROR(t.spp.get_access(a_gfn + 2, 1), EFAULT);
	TEST_EXPECT_ERROR(t.spp.set_access(a_gfn + 2, {0u}), EFAULT);

	/* A new region at A's address starts unprotected: one plain slot. */
	std::size_t slots_removed = t.mem.slot_count();
	TEST_ASSERT(slots_removed < slots);
	t.mem.add(a_gpa, size, {.name = "a2"});
	TEST_ASSERT_EQ(t.mem.slot_count(), slots_removed + 1);
	t.expect_maps(a_gfn, 16, {});
	auto st = t.spp.stats();
	t.expect_lands(a_blocked, 0x5555);
	t.expect_lands(a_gpa + 2 * PAGE + 4088, 0x6666);
	TEST_ASSERT_EQ(t.spp.stats().checked_writes, st.checked_writes); /* plain RAM */
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 1u);
	/* ...and B is still protected. */
	t.expect_blocked(b_blocked, b_blocked, 0x7777);
}

VK_TEST(spp_region_move_carries_its_maps)
{
	LayoutGuest t;
	const std::uint64_t old_gpa = GiB, new_gpa = 2 * GiB + 64 * KiB, size = 16 * PAGE;
	const std::uint64_t old_gfn = old_gpa / PAGE, new_gfn = new_gpa / PAGE;
	RegionId id = t.mem.add(old_gpa, size, {.name = "moving"});
	t.g.map(EXTRA_GVA, old_gpa, size);

	t.spp.set_access(old_gfn + 5, {only(3)});
	const std::uint64_t off = 5 * PAGE + 3 * SUB + 8, ok_off = 5 * PAGE + 4 * SUB;
	t.expect_blocked(EXTRA_GVA + off, old_gpa + off, old_gpa + off, 0x1111);

	t.mem.move(id, new_gpa);
	t.g.page_tables().unmap(EXTRA_GVA, size);
	t.g.map(EXTRA_GVA, new_gpa, size);
	TEST_ASSERT_EQ(*t.g.gva_to_gpa(EXTRA_GVA + off), new_gpa + off);

	/* Same guest-virtual address, same bytes: blocked, reported at the new gpa. */
	t.expect_blocked(EXTRA_GVA + off, new_gpa + off, new_gpa + off, 0x2222);
	t.expect_lands(EXTRA_GVA + ok_off, new_gpa + ok_off, 0x3333);
	t.expect_maps(new_gfn, 16, {{5, only(3)}});
	TEST_EXPECT_ERROR(t.spp.get_access(old_gfn + 5, 1), EFAULT);
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 1u);

	/* RAM added at the old address is not protected. */
	t.mem.add(old_gpa, size, {.name = "after"});
	t.g.map(EXTRA_GVA2, old_gpa, size);
	t.expect_maps(old_gfn, 16, {});
	auto checked = t.spp.stats().checked_writes;
	t.expect_lands(EXTRA_GVA2 + off, old_gpa + off, 0x4444);
	TEST_ASSERT_EQ(t.spp.stats().checked_writes, checked);

	/* A move by one page onto its own range shifts the map with the page. */
	const std::uint64_t shifted = new_gpa + PAGE;
	t.mem.move(id, shifted);
	t.g.page_tables().unmap(EXTRA_GVA, size);
	t.g.map(EXTRA_GVA, shifted, size);
	t.expect_maps(new_gfn + 1, 16, {{5, only(3)}});
	t.expect_blocked(EXTRA_GVA + off, shifted + off, shifted + off, 0x5555);
	t.expect_lands(EXTRA_GVA + ok_off, shifted + ok_off, 0x6666);
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 1u);
}

VK_TEST(spp_protected_page_at_region_edge)
{
	LayoutGuest t;
	const std::uint64_t x = GiB, half = 16 * PAGE, edge = x + half;
	const std::uint64_t edge_gfn = edge / PAGE;
	RegionId r1 = t.mem.add(x, half, {.name = "r1"});
	t.mem.add(edge, half, {.name = "r2"});
	t.g.identity_map(x, 2 * half);
	auto fill = [&](std::uint8_t b) { t.mem.fill(edge - PAGE, std::byte{b}, 2 * PAGE); };
	auto check_fill = [&](std::uint8_t b) {
		std::uint64_t want = 0x0101010101010101ull * b;
		/* Each side of the edge on its own. */
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint32_t>(edge - 4), static_cast<std::uint32_t>(want));
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint32_t>(edge), static_cast<std::uint32_t>(want));
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(edge - 4), want);
	};

	/* Unprotected, a store across the edge lands in both regions. */
	fill(0x11);
	t.expect_lands(edge - 4, 0xaaaabbbbccccddddull);
	TEST_ASSERT_EQ(t.mem.read_obj<std::uint32_t>(edge - 4), 0xccccddddu);
	TEST_ASSERT_EQ(t.mem.read_obj<std::uint32_t>(edge), 0xaaaabbbbu);

	/* R2's first sub-page protected: the store is blocked whole. */
	fill(0x11);
	t.spp.set_access(edge_gfn, {only(0)});
	t.expect_blocked(edge - 4, edge, 0x0102030405060708ull);
	check_fill(0x11);
	t.expect_lands(edge - 16, 0x1234);		/* R1 only */
	t.expect_lands(edge + SUB, 0x5678);		/* R2, writable sub-page */
	t.expect_blocked(edge + 8, edge + 8, 0x9abc);	/* R2 only */

	/* R1's last sub-page protected instead: blocked whole again. */
	t.spp.set_access(edge_gfn, {ALL});
	t.spp.set_access(edge_gfn - 1, {only(31)});
	t.expect_maps(edge_gfn - 1, 2, {{0, only(31)}});
	fill(0x22);
	t.expect_blocked(edge - 4, edge - 4, 0x1112131415161718ull);
	check_fill(0x22);
	t.expect_lands(edge, 0x2345);			/* R2 only */
	t.expect_lands(edge - PAGE + 8, 0x3456);	/* R1, writable sub-page */
	t.expect_blocked(edge - 16, edge - 16, 0x4567);	/* R1 only */

	/* Protection first, neighbour later: R1 re-added next to a protected R2. */
	t.mem.remove(r1);
	t.spp.set_access(edge_gfn, {only(0)});
	t.mem.add(x, half, {.name = "r1-again"});
	fill(0x33);
	t.expect_blocked(edge - 4, edge, 0x2122232425262728ull);
	check_fill(0x33);
	t.expect_lands(edge - 8, 0x5678);
}

VK_TEST(spp_slot_count_follows_protected_pages)
{
	LayoutGuest t;
	const std::uint64_t gpa = GiB, pages = 64, gfn = gpa / PAGE;
	const std::size_t before = t.mem.slot_count();
	t.mem.add(gpa, pages * PAGE, {.name = "slots"});
	t.g.identity_map(gpa, pages * PAGE);
	const std::size_t base = t.mem.slot_count();
	TEST_ASSERT_EQ(base, before + 1);
	/* Slots of the region: base - 1 are the others'. */
	auto region_slots = [&] { return t.mem.slot_count() - (base - 1); };
	/* Sub-page 9: protects neither edge, so no neighbour page traps. */
	const std::uint32_t mid = only(9);

	const std::uint64_t scattered[] = {3, 10, 20, 30, 50};
	std::size_t n = 0;
	for (auto p : scattered) {
		t.spp.set_access(gfn + p, {mid});
		n++;
		TEST_ASSERT_EQ(region_slots(), 2 * n + 1);
	}
	/* Adjacent pages share one read-only slot, however they were protected. */
	t.spp.set_access(gfn + 40, {mid, mid, mid});
	TEST_ASSERT_EQ(region_slots(), 2 * 6 + 1);
	t.spp.set_access(gfn + 43, {mid});
	t.spp.set_access(gfn + 39, {mid});
	TEST_ASSERT_EQ(region_slots(), 2 * 6 + 1);
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 10u);
	/* Protecting more of an already protected page changes no slot. */
	t.spp.set_access(gfn + 41, {mid & only(10)});
	TEST_ASSERT_EQ(region_slots(), 2 * 6 + 1);

	/* Enforcement is per page inside the merged slot. */
	t.expect_blocked(gpa + 41 * PAGE + 9 * SUB, gpa + 41 * PAGE + 9 * SUB, 0x11);
	t.expect_blocked(gpa + 41 * PAGE + 10 * SUB + 8, gpa + 41 * PAGE + 10 * SUB + 8, 0x12);
	t.expect_lands(gpa + 41 * PAGE + 11 * SUB, 0x13);
	t.expect_lands(gpa + 42 * PAGE + 10 * SUB, 0x14);
	auto checked = t.spp.stats().checked_writes;
	t.expect_lands(gpa + 44 * PAGE + 9 * SUB, 0x15);	/* not trapped */
	TEST_ASSERT_EQ(t.spp.stats().checked_writes, checked);

	/* Unprotecting the middle of the run splits it. */
	t.spp.set_access(gfn + 41, {ALL});
	TEST_ASSERT_EQ(region_slots(), 2 * 7 + 1);
	t.expect_lands(gpa + 41 * PAGE + 9 * SUB, 0x16);

	/* Everything unprotected: back to one slot, and all writes are plain. */
	t.spp.set_access(gfn, std::vector<std::uint32_t>(pages, ALL));
	TEST_ASSERT_EQ(t.mem.slot_count(), base);
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 0u);
	checked = t.spp.stats().checked_writes;
	for (auto p : scattered)
		t.expect_lands(gpa + p * PAGE + 9 * SUB, 0x100 + p);
	t.expect_lands(gpa + 40 * PAGE + 9 * SUB, 0x17);
	TEST_ASSERT_EQ(t.spp.stats().checked_writes, checked);
	t.expect_maps(gfn, pages, {});
}

/* xorshift64: reproducible pseudo-random choices. */
static std::uint64_t next_rand(std::uint64_t &s)
{
	s ^= s << 13;
	s ^= s >> 7;
	s ^= s << 17;
	return s;
}

VK_TEST(spp_protection_survives_replanning)
{
	LayoutGuest t;
	const std::uint64_t gpa = GiB, pages = 64, gfn = gpa / PAGE;
	t.mem.add(gpa, pages * PAGE, {.name = "replan"});
	t.g.identity_map(gpa, pages * PAGE);
	const std::size_t base = t.mem.slot_count();

	/* The page that must stay protected through everything below. */
	const std::uint64_t keep = 20;
	const std::uint64_t keep_blocked = gpa + keep * PAGE + 9 * SUB + 8;
	t.spp.set_access(gfn + keep, {only(9)});
	t.expect_blocked(keep_blocked, keep_blocked, 1);

	std::vector<std::uint32_t> shadow(pages, ALL);
	shadow[keep] = only(9);
	std::uint64_t rng = 0x9e3779b97f4a7c15ull, value = 0x1000;
	for (int it = 0; it < 200; it++) {
		std::uint64_t p = next_rand(rng) % pages;
		if (p == keep)
			continue;
		std::uint32_t map;
		switch (next_rand(rng) % 5) {
		case 0: map = ALL; break;
		case 1: map = 0; break;
		case 2: map = only(0); break;		/* pulls in the page before */
		case 3: map = only(31); break;		/* and the page after */
		default: map = static_cast<std::uint32_t>(next_rand(rng)) | 0x0ff0ff00u; break;
		}
		/* Sometimes a run of pages in one call. */
		std::uint64_t n = it % 7 == 0 ? std::min<std::uint64_t>(3, pages - p) : 1;
		if (p < keep && p + n > keep)
			n = keep - p;
		t.spp.set_access(gfn + p, std::vector<std::uint32_t>(n, map));
		for (std::uint64_t i = 0; i < n; i++)
			shadow[p + i] = map;

		if (it % 20 != 19)
			continue;
		TEST_ASSERT(t.spp.get_access(gfn, pages) == shadow, "iteration %d", it);
		t.expect_blocked(keep_blocked, keep_blocked, ++value);
		t.expect_lands(gpa + keep * PAGE + 10 * SUB + 8 * (it % 16), ++value);
		/* Some other protected page still blocks its first protected sub-page. */
		for (std::uint64_t q = 0; q < pages; q++) {
			if (q == keep || shadow[q] == ALL)
				continue;
			unsigned s = __builtin_ctz(~shadow[q]);
			std::uint64_t a = gpa + q * PAGE + s * SUB + 8 * (it % 16);
			t.expect_blocked(a, a, ++value);
			break;
		}
	}

	/* Back to just the kept page: its slot and its protection. */
	for (std::uint64_t q = 0; q < pages; q++)
		if (q != keep)
			t.spp.set_access(gfn + q, {ALL});
	TEST_ASSERT_EQ(t.mem.slot_count(), base + 2);
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 1u);
	t.expect_blocked(keep_blocked, keep_blocked, ++value);
	t.expect_lands(gpa + keep * PAGE + 8 * SUB, ++value);
}

VK_TEST(spp_protection_survives_host_memory_events)
{
	LayoutGuest t;
	const std::uint64_t gpa = GiB, pages = 16, size = pages * PAGE, gfn = gpa / PAGE;
	RegionId id = t.mem.add(gpa, size, {.name = "madvise"});
	t.g.identity_map(gpa, size);
	std::byte *host = t.mem.info(id).host;
	TEST_ASSERT(host != nullptr);
	/* A recognisable pattern everywhere. */
	for (std::uint64_t i = 0; i < size / 8; i++)
		t.mem.write_obj<std::uint64_t>(gpa + i * 8, 0xfeed000000000000ull | i);
	auto word = [&](std::uint64_t gpa_) {
		return 0xfeed000000000000ull | (gpa_ - gpa) / 8;
	};

	t.spp.set_access(gfn + 4, {only(2)});
	t.spp.set_access(gfn + 8, {0u});
	const std::uint64_t blocked4 = gpa + 4 * PAGE + 2 * SUB + 24;
	const std::uint64_t blocked8 = gpa + 8 * PAGE + 1000;
	std::uint64_t value = 0x100;
	auto check = [&](const char *when) {
		vkt::diag("checking after %s", when);
		t.expect_maps(gfn, pages, {{4, only(2)}, {8, 0u}});
		t.expect_blocked(blocked4, blocked4, ++value);
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(blocked4), word(blocked4));
		t.expect_blocked(blocked8, blocked8, ++value);
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(blocked8), word(blocked8));
		/* Allowed writes land, in the trapped page and in plain ones. */
		value++;
		t.expect_lands(gpa + 4 * PAGE + 3 * SUB + 8 * (value % 16), value);
		value++;
		t.expect_lands(gpa + 5 * PAGE + 8 * (value % 16), value);
		/* The pattern is intact elsewhere. */
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(gpa + 8 * PAGE), word(gpa + 8 * PAGE));
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(gpa + 15 * PAGE + 8),
			       word(gpa + 15 * PAGE + 8));
	};
	check("setup");

	TEST_ASSERT(::madvise(host, size, MADV_DONTNEED) == 0, "MADV_DONTNEED: %s",
		    strerror(errno));
	check("MADV_DONTNEED");

	int r = ::madvise(host, size, MADV_PAGEOUT);
	TEST_ASSERT(r == 0 || errno == EINVAL, "MADV_PAGEOUT: %s", strerror(errno));
	if (r != 0)
		vkt::diag("MADV_PAGEOUT is not supported here (EINVAL)");
	check("MADV_PAGEOUT");

	/* And both once more, with the guest having just written everywhere. */
	TEST_ASSERT(::madvise(host, size, MADV_DONTNEED) == 0);
	(void)!::madvise(host, size, MADV_PAGEOUT);
	check("MADV_DONTNEED + MADV_PAGEOUT");
}

/* ---- huge pages ---- */

static std::optional<long> read_long(const char *path)
{
	std::ifstream f(path);
	long v;
	if (f >> v)
		return v;
	return std::nullopt;
}

/* A "Key: value" field of /proc/meminfo. */
static std::optional<long> meminfo(const std::string &key)
{
	std::ifstream f("/proc/meminfo");
	std::string k;
	long v;
	while (f >> k >> v) {
		if (k == key + ":")
			return v;
		f.ignore(1 << 10, '\n');
	}
	return std::nullopt;
}

static bool write_long(const char *path, long v)
{
	std::ofstream f(path);
	f << v << '\n';
	f.flush();
	return static_cast<bool>(f);
}

/*
 * Makes sure `need` default-size (2 MiB) huge pages are free, raising
 * /proc/sys/vm/nr_hugepages if necessary; puts the old value back when it
 * goes away (after the VM that used the pages).
 */
class HugePageReserve {
public:
	static constexpr const char *nr_path = "/proc/sys/vm/nr_hugepages";

	bool ensure(long need)
	{
		if (meminfo("Hugepagesize") != 2048)
			return false;
		auto free = meminfo("HugePages_Free");
		if (!free)
			return false;
		if (*free >= need)
			return true;
		auto nr = read_long(nr_path);
		if (!nr)
			return false;
		old_ = *nr;
		if (!write_long(nr_path, *nr + need - *free))
			vkt::diag("cannot write %s: %s", nr_path, strerror(errno));
		auto now = meminfo("HugePages_Free");
		vkt::diag("nr_hugepages %ld -> %ld, %ld free", *nr, read_long(nr_path).value_or(-1),
			  now.value_or(-1));
		return now && *now >= need;
	}

	~HugePageReserve()
	{
		if (old_ >= 0)
			write_long(nr_path, old_);
	}

private:
	long old_ = -1;
};

/*
 * A VM statistic by name from KVM's binary statistics (KVM_GET_STATS_FD,
 * Documentation/virt/kvm/api.rst 4.133): a header, then num_desc descriptors
 * of sizeof(kvm_stats_desc) + name_size bytes each, then the data, u64 each,
 * at data_offset + desc->offset. nullopt if there is no such statistic.
 */
static std::optional<std::uint64_t> vm_stat(Vm &vm, const char *name)
{
	TEST_REQUIRE(vm.check_extension(KVM_CAP_BINARY_STATS_FD) > 0, "KVM_CAP_BINARY_STATS_FD");
	int fd = ::ioctl(vm.fd(), KVM_GET_STATS_FD, nullptr);
	TEST_ASSERT(fd >= 0, "KVM_GET_STATS_FD: %s", strerror(errno));
	struct Closer {
		int fd;
		~Closer() { ::close(fd); }
	} closer{fd};

	kvm_stats_header h;
	TEST_ASSERT(::pread(fd, &h, sizeof(h), 0) == static_cast<ssize_t>(sizeof(h)));
	const std::size_t head = 16; /* kvm_stats_desc without its name */
	static_assert(offsetof(kvm_stats_desc, name) == 16);
	const std::size_t desc_size = head + h.name_size;
	std::vector<char> descs(desc_size * h.num_desc);
	TEST_ASSERT(::pread(fd, descs.data(), descs.size(), h.desc_offset) ==
		    static_cast<ssize_t>(descs.size()));
	for (std::uint32_t i = 0; i < h.num_desc; i++) {
		const char *d = descs.data() + i * desc_size;
		if (strncmp(d + head, name, h.name_size) != 0)
			continue;
		std::uint16_t size;
		std::uint32_t offset;
		std::memcpy(&size, d + offsetof(kvm_stats_desc, size), sizeof(size));
		std::memcpy(&offset, d + offsetof(kvm_stats_desc, offset), sizeof(offset));
		TEST_ASSERT(size >= 1);
		std::uint64_t v;
		TEST_ASSERT(::pread(fd, &v, sizeof(v), h.data_offset + offset) ==
			    static_cast<ssize_t>(sizeof(v)));
		return v;
	}
	return std::nullopt;
}

VK_TEST(spp_huge_pages_stay_huge_around_protected_page)
{
	const std::uint64_t gpa = 2 * GiB, size = 8 * MiB, huge = 2 * MiB;
	const std::uint64_t pages = size / PAGE, gfn = gpa / PAGE;
	HugePageReserve reserve; /* outlives the VM */
	TEST_REQUIRE(reserve.ensure(size / huge), "free 2 MiB huge pages (/proc/sys/vm/nr_hugepages)");
	/* Some KVMs never map guest memory with large pages, with or without SPP. */
	TEST_REQUIRE_PROBE(platform::large_mappings(vkt::kvm()),
			   "KVM mapping 2 MiB-backed guest memory with 2 MiB pages");

	LayoutGuest t;
	t.mem.add(gpa, size, {.name = "huge", .huge_pages = true});
	t.g.map(gpa, gpa, size, {}, PageSize::m2);
	TEST_REQUIRE(vm_stat(t.g.vm(), "pages_2m").has_value(),
		     "the KVM VM statistic pages_2m (KVM_GET_STATS_FD)");

	/* One 4 KiB page in the second 2 MiB block: sub-page 7 protected. */
	const std::uint64_t prot = huge / PAGE + 100;
	t.spp.set_access(gfn + prot, {only(7)});
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 1u);

	t.call(guest_nop_sync);
	std::uint64_t before = *vm_stat(t.g.vm(), "pages_2m");
	auto checked = t.spp.stats().checked_writes;
	TEST_ASSERT_EQ(t.call(guest_touch_pages, gpa, pages), pages);
	std::uint64_t after = *vm_stat(t.g.vm(), "pages_2m");
	vkt::diag("pages_2m: %llu before the guest touched the region, %llu after",
		  (unsigned long long)before, (unsigned long long)after);

	/* Every write landed; only the protected page's write was checked. */
	for (std::uint64_t i = 0; i < pages; i++)
		TEST_ASSERT_EQ(t.mem.read_obj<std::uint64_t>(gpa + i * PAGE), i + 1);
	TEST_ASSERT_EQ(t.spp.stats().checked_writes, checked + 1);
	TEST_ASSERT(t.seen.empty());
	/*
	 * Exactly the three blocks without the protected page are mapped with
	 * 2 MiB pages: the block holding it must not be (a large mapping there
	 * would let writes to the protected page through).
	 */
	TEST_ASSERT(after - before == 3, "pages_2m %llu, %llu before",
		    (unsigned long long)after, (unsigned long long)before);

	/* And the page is still protected. */
	const std::uint64_t blocked = gpa + prot * PAGE + 7 * SUB + 16;
	t.expect_blocked(blocked, blocked, 0xabcdef);
	t.expect_lands(gpa + prot * PAGE + 8 * SUB, 0xfedcba);
	t.expect_lands(gpa + 3 * huge + 12345 * 8, 0x123456);
}
