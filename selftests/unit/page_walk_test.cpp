// SPDX-License-Identifier: MIT
/*
 * common/page_walk.c: the guest page-walk permission engine, on page tables
 * built in a fake guest memory (a map from GPA to 8-byte entry: test data,
 * not a model of KVM).
 */
#include <catch2/catch.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <sstream>
#include <string>

#include <virtkit/x86/page_tables.hpp>

#include "page_walk.h"

namespace {

using u32 = __u32;
using u64 = __u64;

constexpr u64 P = VK_WALK_PTE_P;
constexpr u64 W = VK_WALK_PTE_W;
constexpr u64 U = VK_WALK_PTE_U;
constexpr u64 PS = VK_WALK_PTE_PS;
constexpr u64 NX = VK_WALK_PTE_NX;
constexpr u64 ADDR = VK_WALK_PTE_ADDR;

constexpr u32 EC_P = VK_WALK_PFEC_P;
constexpr u32 EC_W = VK_WALK_PFEC_W;
constexpr u32 EC_U = VK_WALK_PFEC_U;
constexpr u32 EC_RSVD = VK_WALK_PFEC_RSVD;
constexpr u32 EC_ID = VK_WALK_PFEC_ID;
constexpr u32 EC_PK = VK_WALK_PFEC_PK;

constexpr unsigned RD = VK_WALK_READ;
constexpr unsigned WR = VK_WALK_WRITE;
constexpr unsigned FE = VK_WALK_FETCH;
constexpr unsigned IMPL = VK_WALK_IMPLICIT;

constexpr u64 K4 = VK_WALK_PAGE_4K;
constexpr u64 M2 = VK_WALK_PAGE_2M;
constexpr u64 G1 = VK_WALK_PAGE_1G;

/*
 * The outcome of a walk as one number, so that a CHECK shows it: the #PF
 * error code (>= 0), or one of these.
 */
constexpr long OK = -1;
constexpr long GP = -2;
constexpr long READ_FAIL = -3;
constexpr long UNSUPPORTED = -4;
constexpr long BAD_ARG = -5;

u64 key_bits(u32 key)
{
	return static_cast<u64>(key) << VK_WALK_PTE_KEY_SHIFT;
}

/* Guest-physical memory: 8-byte entries; absent ones read as 0. */
struct Mem {
	std::map<u64, u64> words;
	std::set<u64> bad;	/* reads of these GPAs fail */
	u64 next = 0x100000;	/* the next table page */
	unsigned reads = 0;
	int wrong = 0;		/* misaligned reads (the engine's bug) */

	static int read(void *ctx, u64 gpa, u64 *val)
	{
		Mem *m = static_cast<Mem *>(ctx);

		m->reads++;
		if (gpa & 7)
			m->wrong++;
		if (m->bad.count(gpa))
			return -1;
		auto it = m->words.find(gpa);
		*val = it == m->words.end() ? 0 : it->second;
		return 0;
	}

	u64 alloc()
	{
		u64 a = next;

		next += 0x1000;
		return a;
	}
};

unsigned index_of(u64 la, int level)
{
	return (la >> (12 + 9 * (level - 1))) & 0x1ff;
}

/* 4- or 5-level page tables in a Mem. */
struct Guest {
	Mem mem;
	int levels;
	u64 root;

	explicit Guest(int levels_ = 4) : levels(levels_), root(mem.alloc()) {}

	/*
	 * Map la to pa with a leaf at leaf_level (1: 4 KiB, 2: 2 MiB with PS,
	 * 3: 1 GiB with PS); tables created on the way get table_flags.
	 */
	void map(u64 la, u64 pa, int leaf_level, u64 leaf_flags,
		 u64 table_flags = P | W | U)
	{
		u64 table = root;

		for (int l = levels; l > leaf_level; l--) {
			u64 &e = mem.words[table + index_of(la, l) * 8];

			if (!(e & P))
				e = mem.alloc() | table_flags;
			table = e & ADDR;
		}
		mem.words[table + index_of(la, leaf_level) * 8] =
			pa | leaf_flags | (leaf_level > 1 ? PS : 0);
	}

	/* The entry for la at level (its tables must exist). */
	u64 &entry(u64 la, int level)
	{
		u64 table = root;

		for (int l = levels; l > level; l--)
			table = mem.words.at(table + index_of(la, l) * 8) & ADDR;
		return mem.words.at(table + index_of(la, level) * 8);
	}

	vk_walk_mem ops() { return vk_walk_mem{Mem::read, &mem}; }
};

/* Long mode with 4-level paging: CR0.PG/WP, PAE, NXE, CPL 0, 46 bits. */
vk_walk_state long_mode(const Guest &g)
{
	vk_walk_state s{};

	s.cr0 = VK_WALK_CR0_PG | VK_WALK_CR0_WP | 1;	/* PE */
	s.cr3 = g.root;
	s.cr4 = 1ull << 5;				/* PAE */
	if (g.levels == 5)
		s.cr4 |= VK_WALK_CR4_LA57;
	s.efer = VK_WALK_EFER_LMA | VK_WALK_EFER_NXE | (1ull << 8); /* LME */
	s.rflags = 2;
	s.maxphyaddr = 46;
	s.features = VK_WALK_FEAT_ALL;
	return s;
}

long outcome(const vk_walk &w)
{
	switch (w.result) {
	case VK_WALK_OK:
		return OK;
	case VK_WALK_PF:
		return w.error_code;
	case VK_WALK_GP:
		return GP;
	case VK_WALK_EREAD:
		return READ_FAIL;
	case VK_WALK_UNSUPPORTED:
		return UNSUPPORTED;
	case VK_WALK_EINVAL:
		return BAD_ARG;
	}
	return -100 - w.result;
}

vk_walk walk(const vk_walk_state &s, Guest &g, u64 la, unsigned access)
{
	vk_walk w;
	vk_walk_mem m = g.ops();
	int r = vk_walk_translate(&s, &m, la, access, &w);

	REQUIRE(r == w.result);
	REQUIRE(g.mem.wrong == 0);
	return w;
}

long run(const vk_walk_state &s, Guest &g, u64 la, unsigned access)
{
	return outcome(walk(s, g, la, access));
}

} // namespace

TEST_CASE("page walk: no paging is the identity", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);

	s.cr0 = 1;
	s.efer = 0;
	s.cpl = 3;
	for (unsigned acc : {RD, WR, FE, RD | IMPL, WR | IMPL}) {
		vk_walk w = walk(s, g, 0x12345678, acc);

		CHECK(outcome(w) == OK);
		CHECK(w.gpa == 0x12345678);
		CHECK(w.page_size == K4);
		CHECK(w.allowed == (VK_WALK_ALLOW_READ | VK_WALK_ALLOW_WRITE |
				    VK_WALK_ALLOW_FETCH));
		CHECK(w.level == 0);
	}
	CHECK(g.mem.reads == 0);
}

TEST_CASE("page walk: legacy 32-bit and PAE paging are unsupported", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);

	s.efer = 0;		/* 32-bit paging */
	s.cr4 = 0;
	CHECK(run(s, g, 0x1000, RD) == UNSUPPORTED);
	s.cr4 = 1ull << 5;	/* PAE paging */
	s.efer = VK_WALK_EFER_NXE;
	CHECK(run(s, g, 0x1000, RD) == UNSUPPORTED);
	CHECK(g.mem.reads == 0);
}

TEST_CASE("page walk: bad arguments are refused", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);

	CHECK(run(s, g, 0, 3) == BAD_ARG);
	CHECK(run(s, g, 0, FE | IMPL) == BAD_ARG);
	CHECK(run(s, g, 0, RD | 8) == BAD_ARG);
	s.cpl = 4;
	CHECK(run(s, g, 0, RD) == BAD_ARG);
	s.cpl = 0;
	s.maxphyaddr = 53;
	CHECK(run(s, g, 0, RD) == BAD_ARG);
	s.maxphyaddr = 31;
	CHECK(run(s, g, 0, RD) == BAD_ARG);
	CHECK(g.mem.reads == 0);
}

TEST_CASE("page walk: 4 KiB, 2 MiB and 1 GiB pages, 4- and 5-level", "[page_walk]")
{
	int levels = GENERATE(4, 5);
	Guest g(levels);
	vk_walk_state s = long_mode(g);
	/* Canonical in both widths; bits 47:39 differ between the three. */
	u64 la4k = 0x0000123456789abcull;
	u64 la2m = 0xffff8a5a5a5abcdeull;
	u64 la1g = 0x00007f0012345678ull;

	if (levels == 5) {
		la4k |= 0x00ab000000000000ull;		/* PML5 index 0xab */
		la2m = 0xff6f8a5a5a5abcdeull;
	}
	g.map(la4k, 0x2000000000ull, 1, P | W);
	g.map(la2m, 0x3000000000ull, 2, P | W);
	g.map(la1g, 0x1c0000000ull, 3, P | W);

	vk_walk w = walk(s, g, la4k, RD);
	CHECK(outcome(w) == OK);
	CHECK(w.gpa == (0x2000000000ull | 0xabc));
	CHECK(w.page_size == K4);
	CHECK(w.level == 1);
	CHECK(w.entry[1] == (0x2000000000ull | P | W));
	CHECK(w.entry_gpa[levels] == g.root + index_of(la4k, levels) * 8);
	CHECK(g.mem.reads == static_cast<unsigned>(levels));

	w = walk(s, g, la2m, WR);
	CHECK(outcome(w) == OK);
	CHECK(w.gpa == (0x3000000000ull | (la2m & 0x1fffff)));
	CHECK(w.page_size == M2);
	CHECK(w.level == 2);

	w = walk(s, g, la1g, FE);
	CHECK(outcome(w) == OK);
	CHECK(w.gpa == (0x1c0000000ull | (la1g & 0x3fffffff)));
	CHECK(w.page_size == G1);
	CHECK(w.level == 3);
	CHECK(w.entry[4] != 0);
	CHECK(w.entry[2] == 0);

	if (levels == 5) {
		/* Under 4-level paging the same address is not canonical. */
		s.cr4 &= ~VK_WALK_CR4_LA57;
		CHECK(run(s, g, la4k, RD) == GP);
	}
}

TEST_CASE("page walk: effective rights, key and allowed accesses", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);

	g.map(0x1000, 0x5000, 1, P | U | key_bits(9));
	vk_walk w = walk(s, g, 0x1000, RD);
	CHECK(outcome(w) == OK);
	CHECK(w.rights == (VK_WALK_RIGHT_U | VK_WALK_RIGHT_X));
	CHECK(w.key == 9);
	/* CPL 0, WP=1: no writes to a read-only page. */
	CHECK(w.allowed == (VK_WALK_ALLOW_READ | VK_WALK_ALLOW_FETCH));

	g.entry(0x1000, 2) |= NX;
	w = walk(s, g, 0x1000, RD);
	CHECK(w.rights == VK_WALK_RIGHT_U);
	CHECK(w.allowed == VK_WALK_ALLOW_READ);

	/* A protection fault still describes the page. */
	w = walk(s, g, 0x1000, WR);
	CHECK(outcome(w) == (EC_P | EC_W));
	CHECK(w.gpa == 0x5000);
	CHECK(w.key == 9);
	CHECK(w.allowed == VK_WALK_ALLOW_READ);

	/* Bits 62:59 of a non-leaf entry are not the key. */
	g.entry(0x1000, 3) |= key_bits(3);
	CHECK(walk(s, g, 0x1000, RD).key == 9);
}

TEST_CASE("page walk: not-present entries at every level", "[page_walk]")
{
	int levels = GENERATE(4, 5);
	Guest g(levels);
	vk_walk_state s = long_mode(g);
	const u64 la = 0x0000400000201000ull;

	g.map(la, 0x7000, 1, P | W | U);
	for (int l = levels; l >= 1; l--) {
		INFO("level " << l);
		u64 &e = g.entry(la, l);
		u64 saved = e;

		/* Reserved bits do not matter in a not-present entry. */
		e = (saved & ~P) | (1ull << 50) | PS;
		vk_walk w = walk(s, g, la, RD);
		CHECK(outcome(w) == 0);
		CHECK(w.level == l);
		CHECK(w.gpa == 0);
		CHECK(run(s, g, la, WR) == EC_W);
		CHECK(run(s, g, la, FE) == EC_ID);
		s.cpl = 3;
		CHECK(run(s, g, la, WR) == (EC_W | EC_U));
		CHECK(run(s, g, la, FE) == (EC_ID | EC_U));
		CHECK(run(s, g, la, RD | IMPL) == 0);
		s.cpl = 0;
		e = saved;
	}
	CHECK(run(s, g, la, WR) == OK);
}

TEST_CASE("page walk: I/D only with EFER.NXE or CR4.SMEP", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);

	s.efer &= ~VK_WALK_EFER_NXE;
	CHECK(run(s, g, 0x1000, FE) == 0);
	s.cr4 |= VK_WALK_CR4_SMEP;
	CHECK(run(s, g, 0x1000, FE) == EC_ID);
	s.cr4 &= ~VK_WALK_CR4_SMEP;
	s.efer |= VK_WALK_EFER_NXE;
	CHECK(run(s, g, 0x1000, FE) == EC_ID);
	/* Reserved-bit faults carry it too. */
	g.map(0x1000, 0x5000, 1, P | (1ull << 47));
	CHECK(run(s, g, 0x1000, FE) == (EC_P | EC_RSVD | EC_ID));
	s.efer &= ~VK_WALK_EFER_NXE;
	CHECK(run(s, g, 0x1000, FE) == (EC_P | EC_RSVD));
}

TEST_CASE("page walk: canonical addresses, 48 and 57 bits", "[page_walk]")
{
	Guest g4(4), g5(5);
	vk_walk_state s4 = long_mode(g4), s5 = long_mode(g5);

	/* Nothing is mapped: canonical means #PF (not present), else #GP. */
	for (unsigned acc : {RD, WR, FE, RD | IMPL}) {
		CHECK(run(s4, g4, 0x00007fffffffffffull, acc) >= 0);
		CHECK(run(s4, g4, 0xffff800000000000ull, acc) >= 0);
		CHECK(run(s4, g4, 0x0000800000000000ull, acc) == GP);
		CHECK(run(s4, g4, 0xffff7fffffffffffull, acc) == GP);
		CHECK(run(s4, g4, 0x8000000000000000ull, acc) == GP);
		CHECK(run(s4, g4, 0x0001000000000000ull, acc) == GP);

		CHECK(run(s5, g5, 0x0000800000000000ull, acc) >= 0);
		CHECK(run(s5, g5, 0xffff7fffffffffffull, acc) >= 0);
		CHECK(run(s5, g5, 0x00ffffffffffffffull, acc) >= 0);
		CHECK(run(s5, g5, 0xff00000000000000ull, acc) >= 0);
		CHECK(run(s5, g5, 0x0100000000000000ull, acc) == GP);
		CHECK(run(s5, g5, 0xfeffffffffffffffull, acc) == GP);
		CHECK(run(s5, g5, 0x8000000000000000ull, acc) == GP);
	}
	/* #GP comes before any entry is read, even a failing one. */
	unsigned reads = g4.mem.reads;
	g4.mem.bad.insert(g4.root);
	CHECK(run(s4, g4, 0x0000800000000000ull, RD) == GP);
	CHECK(g4.mem.reads == reads);
	vk_walk w = walk(s4, g4, 0x0000800000000000ull, RD);
	CHECK(w.level == 0);
}

TEST_CASE("page walk: address bits at or above MAXPHYADDR are reserved", "[page_walk]")
{
	int levels = GENERATE(4, 5);
	Guest g(levels);
	vk_walk_state s = long_mode(g);
	const u64 la = 0x0000008040201000ull;

	s.maxphyaddr = 40;
	g.map(la, 0x9000, 1, P | W | U);
	for (int l = levels; l >= 1; l--) {
		INFO("level " << l);
		u64 &e = g.entry(la, l);
		u64 saved = e;

		for (int bit : {40, 45, 51}) {
			INFO("bit " << bit);
			e = saved | (1ull << bit);
			vk_walk w = walk(s, g, la, WR);
			CHECK(outcome(w) == (EC_P | EC_W | EC_RSVD));
			CHECK(w.level == l);
			CHECK(w.gpa == 0);
		}
		/* Bits 62:52 are ignored (62:59 are the key, in a leaf). */
		for (int bit : {52, 55, 58, 59, 62}) {
			INFO("bit " << bit);
			e = saved | (1ull << bit);
			CHECK(run(s, g, la, WR) == OK);
		}
		e = saved | (1ull << 39);
		/* Below MAXPHYADDR: a different (absent, zero) table. */
		CHECK(run(s, g, la, WR) != (EC_P | EC_W | EC_RSVD));
		e = saved;
	}
	/* With MAXPHYADDR 52 no address bit is reserved. */
	s.maxphyaddr = 52;
	g.entry(la, 1) |= 1ull << 51;
	vk_walk w = walk(s, g, la, RD);
	CHECK(outcome(w) == OK);
	CHECK(w.gpa == ((1ull << 51) | 0x9000));
}

TEST_CASE("page walk: XD is reserved without EFER.NXE", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 la = 0x40201000;

	s.efer &= ~VK_WALK_EFER_NXE;
	g.map(la, 0x9000, 1, P | W | U);
	for (int l = 4; l >= 1; l--) {
		INFO("level " << l);
		u64 &e = g.entry(la, l);

		e |= NX;
		CHECK(run(s, g, la, RD) == (EC_P | EC_RSVD));
		CHECK(run(s, g, la, FE) == (EC_P | EC_RSVD));
		s.cpl = 3;
		CHECK(run(s, g, la, FE) == (EC_P | EC_RSVD | EC_U));
		s.cpl = 0;
		e &= ~NX;
	}
	CHECK(run(s, g, la, FE) == OK);
}

TEST_CASE("page walk: PS is reserved in a PML5E and a PML4E", "[page_walk]")
{
	int levels = GENERATE(4, 5);
	Guest g(levels);
	vk_walk_state s = long_mode(g);
	const u64 la = 0x40201000;

	g.map(la, 0x9000, 1, P | W | U);
	for (int l = levels; l >= 4; l--) {
		INFO("level " << l);
		g.entry(la, l) |= PS;
		vk_walk w = walk(s, g, la, RD);
		CHECK(outcome(w) == (EC_P | EC_RSVD));
		CHECK(w.level == l);
		g.entry(la, l) &= ~PS;
	}
	/* In a PTE bit 7 is PAT. */
	g.entry(la, 1) |= PS;
	CHECK(run(s, g, la, RD) == OK);
}

TEST_CASE("page walk: reserved bits of 1 GiB and 2 MiB leaves", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 la1g = 0x0000004040000000ull + 0x12345;
	const u64 la2m = 0x0000008000200000ull + 0x12345;

	g.map(la1g, 0x80000000ull, 3, P | W);
	g.map(la2m, 0x40000000ull, 2, P | W);

	for (int bit = 13; bit <= 29; bit++) {
		INFO("1G bit " << bit);
		g.entry(la1g, 3) |= 1ull << bit;
		vk_walk w = walk(s, g, la1g, RD);
		CHECK(outcome(w) == (EC_P | EC_RSVD));
		CHECK(w.level == 3);
		g.entry(la1g, 3) &= ~(1ull << bit);
	}
	for (int bit = 13; bit <= 20; bit++) {
		INFO("2M bit " << bit);
		g.entry(la2m, 2) |= 1ull << bit;
		vk_walk w = walk(s, g, la2m, WR);
		CHECK(outcome(w) == (EC_P | EC_W | EC_RSVD));
		CHECK(w.level == 2);
		g.entry(la2m, 2) &= ~(1ull << bit);
	}
	/* Bit 12 is PAT; bit 30 (1G) and 21 (2M) are address bits. */
	g.entry(la1g, 3) |= VK_WALK_PTE_PAT_LARGE;
	g.entry(la2m, 2) |= VK_WALK_PTE_PAT_LARGE;
	vk_walk w = walk(s, g, la1g, RD);
	CHECK(outcome(w) == OK);
	CHECK(w.gpa == 0x80012345ull);
	w = walk(s, g, la2m, RD);
	CHECK(outcome(w) == OK);
	CHECK(w.gpa == 0x40012345ull);
	g.entry(la2m, 2) |= 1ull << 21;
	CHECK(walk(s, g, la2m, RD).gpa == 0x40212345ull);

	/* The large-page check comes after the generic one, both RSVD. */
	s.maxphyaddr = 36;
	g.entry(la1g, 3) |= 1ull << 40;
	CHECK(run(s, g, la1g, RD) == (EC_P | EC_RSVD));
}

TEST_CASE("page walk: PS in a PDPTE is reserved without Page1GB", "[page_walk]")
{
	int levels = GENERATE(4, 5);
	Guest g(levels);
	vk_walk_state s = long_mode(g);
	const u64 la1g = 0x0000004040000000ull + 0x12345;
	const u64 la2m = 0x0000008000200000ull + 0x12345;

	g.map(la1g, 0x80000000ull, 3, P | W | U);
	g.map(la2m, 0x40000000ull, 2, P | W | U);
	REQUIRE(run(s, g, la1g, RD) == OK);

	/* A CPU without Page1GB (CPUID.80000001H:EDX[26] = 0): RSVD at level 3. */
	s.features &= ~VK_WALK_FEAT_PAGE1GB;
	for (unsigned acc : {RD, WR, FE, RD | IMPL}) {
		for (u32 cpl : {0u, 3u}) {
			INFO("access " << acc << " cpl " << cpl);
			s.cpl = cpl;
			vk_walk w = walk(s, g, la1g, acc);
			u32 want = EC_P | EC_RSVD;
			if (acc == WR)
				want |= EC_W;
			if (acc == FE)
				want |= EC_ID;
			if (cpl == 3 && !(acc & IMPL))
				want |= EC_U;
			CHECK(outcome(w) == want);
			CHECK(w.level == 3);
			CHECK(w.gpa == 0);
			CHECK(w.page_size == 0);
		}
	}
	s.cpl = 0;
	/* 2 MiB pages do not depend on it; a PDPTE that points to a table neither. */
	CHECK(run(s, g, la2m, RD) == OK);
	/* A reserved bit at a level above still wins. */
	g.entry(la1g, 4) |= 1ull << 51;
	CHECK(run(s, g, la1g, RD) == (EC_P | EC_RSVD));
	CHECK(walk(s, g, la1g, RD).level == 4);
	g.entry(la1g, 4) &= ~(1ull << 51);
	/* Not present wins over PS. */
	g.entry(la1g, 3) &= ~P;
	CHECK(run(s, g, la1g, RD) == 0);
	g.entry(la1g, 3) |= P;
	/* QEMU's quirk applies to this RSVD too. */
	s.quirks = VK_WALK_QUIRK_RSVD_NO_P;
	CHECK(run(s, g, la1g, RD) == EC_RSVD);
	s.quirks = 0;
	s.features |= VK_WALK_FEAT_PAGE1GB;
	CHECK(run(s, g, la1g, RD) == OK);
}

TEST_CASE("page walk: a control bit of a feature the CPU lacks is refused", "[page_walk]")
{
	int levels = GENERATE(4, 5);
	Guest g(levels);
	const u64 la = 0x0000123456789000ull;

	g.map(la, 0x2000000ull, 1, P | W);	/* a supervisor page: SMAP lets CPL 0 read */
	const struct {
		u64 cr4;
		u64 efer;
		u32 feature;
	} bits[] = {
		{VK_WALK_CR4_SMEP, 0, VK_WALK_FEAT_SMEP},
		{VK_WALK_CR4_SMAP, 0, VK_WALK_FEAT_SMAP},
		{VK_WALK_CR4_PKE, 0, VK_WALK_FEAT_PKU},
		{VK_WALK_CR4_PKS, 0, VK_WALK_FEAT_PKS},
		{0, VK_WALK_EFER_NXE, VK_WALK_FEAT_NX},
	};
	for (const auto &b : bits) {
		INFO("feature " << b.feature);
		vk_walk_state s = long_mode(g);
		s.cr4 |= b.cr4;
		s.efer |= b.efer;
		CHECK(run(s, g, la, RD) == OK);
		s.features &= ~b.feature;
		CHECK(run(s, g, la, RD) == BAD_ARG);
		/* With the bit clear the feature's absence changes nothing. */
		s.cr4 &= ~b.cr4;
		s.efer &= ~b.efer;
		CHECK(run(s, g, la, RD) == OK);
	}
	vk_walk_state s = long_mode(g);
	s.features &= ~VK_WALK_FEAT_LA57;
	CHECK(run(s, g, la, RD) == (levels == 5 ? BAD_ARG : OK));
	/* No paging does not look at the features. */
	s.features = 0;
	s.cr0 = 1;
	s.efer = 0;
	CHECK(run(s, g, la, RD) == OK);
}

TEST_CASE("page walk: a reserved bit above wins over a lower not-present entry", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 la = 0x40201000;

	g.map(la, 0x9000, 1, P | W | U);
	g.entry(la, 1) &= ~P;
	CHECK(run(s, g, la, RD) == 0);
	g.entry(la, 3) |= 1ull << 50;
	vk_walk w = walk(s, g, la, RD);
	CHECK(outcome(w) == (EC_P | EC_RSVD));
	CHECK(w.level == 3);

	SECTION("QEMU's quirk: RSVD without P") {
		s.quirks = VK_WALK_QUIRK_RSVD_NO_P;
		CHECK(run(s, g, la, WR) == (EC_RSVD | EC_W));
		s.cpl = 3;
		CHECK(run(s, g, la, FE) == (EC_RSVD | EC_U | EC_ID));
		/* Other faults keep their P. */
		g.entry(la, 3) &= ~(1ull << 50);
		g.entry(la, 1) |= P;
		g.entry(la, 2) &= ~W;
		CHECK(run(s, g, la, WR) == (EC_P | EC_W | EC_U));
	}
}

TEST_CASE("page walk: R/W and CR0.WP", "[page_walk]")
{
	int ro_level = GENERATE(1, 2, 3, 4);
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 la = 0x0000008040201000ull;

	INFO("R/W=0 at level " << ro_level);
	g.map(la, 0x9000, 1, P | W | U);
	g.entry(la, ro_level) &= ~W;

	CHECK(run(s, g, la, RD) == OK);
	CHECK(run(s, g, la, WR) == (EC_P | EC_W));
	CHECK(run(s, g, la, WR | IMPL) == (EC_P | EC_W));
	s.cpl = 3;
	CHECK(run(s, g, la, WR) == (EC_P | EC_W | EC_U));
	CHECK(run(s, g, la, WR | IMPL) == (EC_P | EC_W));
	CHECK(run(s, g, la, RD) == OK);

	s.cr0 &= ~VK_WALK_CR0_WP;
	CHECK(run(s, g, la, WR) == (EC_P | EC_W | EC_U));
	CHECK(run(s, g, la, WR | IMPL) == OK);
	s.cpl = 0;
	vk_walk w = walk(s, g, la, WR);
	CHECK(outcome(w) == OK);
	CHECK(w.rights == (VK_WALK_RIGHT_U | VK_WALK_RIGHT_X));
	CHECK((w.allowed & VK_WALK_ALLOW_WRITE) != 0);
}

TEST_CASE("page walk: U/S: a user-mode address has U/S=1 at every level", "[page_walk]")
{
	int s_level = GENERATE(0, 1, 2, 3, 4);
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 la = 0x0000008040201000ull;

	INFO("U/S=0 at level " << s_level);
	g.map(la, 0x9000, 1, P | W | U);
	if (s_level)
		g.entry(la, s_level) &= ~U;
	bool user_addr = s_level == 0;

	s.cpl = 3;
	for (unsigned acc : {RD, WR, FE}) {
		INFO("access " << acc);
		u32 ec = EC_P | EC_U | (acc == WR ? EC_W : 0) |
			 (acc == FE ? EC_ID : 0);
		vk_walk w = walk(s, g, la, acc);

		CHECK(outcome(w) == (user_addr ? OK : static_cast<long>(ec)));
		CHECK(w.gpa == 0x9000);
		CHECK(!!(w.rights & VK_WALK_RIGHT_U) == user_addr);
		if (!user_addr)
			CHECK(w.allowed == 0);
	}
	/* Supervisor-mode accesses, explicit or implicit, may use both. */
	CHECK(run(s, g, la, RD | IMPL) == OK);
	CHECK(run(s, g, la, WR | IMPL) == OK);
	s.cpl = 0;
	CHECK(run(s, g, la, RD) == OK);
	CHECK(run(s, g, la, WR) == OK);
	CHECK(run(s, g, la, FE) == OK);
}

TEST_CASE("page walk: NX", "[page_walk]")
{
	int nx_level = GENERATE(1, 2, 3, 4);
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 la = 0x0000008040201000ull;

	INFO("XD=1 at level " << nx_level);
	g.map(la, 0x9000, 1, P | W | U);
	g.entry(la, nx_level) |= NX;
	CHECK(run(s, g, la, RD) == OK);
	CHECK(run(s, g, la, WR) == OK);
	CHECK(run(s, g, la, FE) == (EC_P | EC_ID));
	s.cpl = 3;
	CHECK(run(s, g, la, FE) == (EC_P | EC_ID | EC_U));
	vk_walk w = walk(s, g, la, RD);
	CHECK(w.rights == (VK_WALK_RIGHT_W | VK_WALK_RIGHT_U));
	CHECK(w.allowed == (VK_WALK_ALLOW_READ | VK_WALK_ALLOW_WRITE));
}

TEST_CASE("page walk: SMEP", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 user = 0x1000, sup = 0x40000000, sup_nl = 0x80001000;

	g.map(user, 0x9000, 1, P | W | U);
	g.map(sup, 0xa000, 1, P | W);
	/* Leaf U/S=1 under a PDPTE with U/S=0: a supervisor-mode address. */
	g.map(sup_nl, 0xb000, 1, P | W | U);
	g.entry(sup_nl, 3) &= ~U;

	for (u64 la : {user, sup, sup_nl})
		CHECK(run(s, g, la, FE) == OK);
	s.cr4 |= VK_WALK_CR4_SMEP;
	CHECK(run(s, g, user, FE) == (EC_P | EC_ID));
	CHECK(run(s, g, sup, FE) == OK);
	CHECK(run(s, g, sup_nl, FE) == OK);
	/* Data accesses are not SMEP's business. */
	CHECK(run(s, g, user, RD) == OK);
	CHECK(run(s, g, user, WR) == OK);
	/* Nor are user-mode fetches. */
	s.cpl = 3;
	CHECK(run(s, g, user, FE) == OK);
	/* I/D from SMEP alone. */
	s.cpl = 0;
	s.efer &= ~VK_WALK_EFER_NXE;
	CHECK(run(s, g, user, FE) == (EC_P | EC_ID));
}

TEST_CASE("page walk: SMAP, EFLAGS.AC and implicit accesses", "[page_walk]")
{
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 user = 0x1000, sup = 0x40000000;

	g.map(user, 0x9000, 1, P | W | U);
	g.map(sup, 0xa000, 1, P | W);

	/* SMAP off: supervisor-mode accesses reach user pages. */
	for (unsigned cpl : {0u, 3u}) {
		s.cpl = cpl;
		CHECK(run(s, g, user, RD | IMPL) == OK);
		CHECK(run(s, g, user, WR | IMPL) == OK);
	}
	s.cpl = 0;
	CHECK(run(s, g, user, RD) == OK);

	s.cr4 |= VK_WALK_CR4_SMAP;
	SECTION("explicit supervisor-mode accesses honour AC") {
		CHECK(run(s, g, user, RD) == EC_P);
		CHECK(run(s, g, user, WR) == (EC_P | EC_W));
		vk_walk w = walk(s, g, user, RD);
		CHECK(w.allowed == VK_WALK_ALLOW_FETCH);
		s.rflags |= VK_WALK_RFLAGS_AC;
		CHECK(run(s, g, user, RD) == OK);
		CHECK(run(s, g, user, WR) == OK);
		/* Supervisor pages are not affected. */
		s.rflags &= ~VK_WALK_RFLAGS_AC;
		CHECK(run(s, g, sup, RD) == OK);
		CHECK(run(s, g, sup, WR) == OK);
	}
	SECTION("implicit accesses at CPL 3 are blocked whatever AC is") {
		s.cpl = 3;
		for (u64 ac : {0ull, VK_WALK_RFLAGS_AC}) {
			INFO("AC " << ac);
			s.rflags = 2 | ac;
			/* Error code U=0: a supervisor-mode access. */
			CHECK(run(s, g, user, RD | IMPL) == EC_P);
			CHECK(run(s, g, user, WR | IMPL) == (EC_P | EC_W));
			CHECK(run(s, g, sup, RD | IMPL) == OK);
			/* Explicit user-mode accesses: no SMAP. */
			CHECK(run(s, g, user, RD) == OK);
			CHECK(run(s, g, user, WR) == OK);
		}
	}
	SECTION("implicit accesses at CPL 0 are blocked whatever AC is (SDM, KVM, hardware)") {
		CHECK(run(s, g, user, RD | IMPL) == EC_P);
		s.rflags |= VK_WALK_RFLAGS_AC;
		CHECK(run(s, g, user, RD | IMPL) == EC_P);
		CHECK(run(s, g, user, WR | IMPL) == (EC_P | EC_W));
		CHECK(walk(s, g, user, RD | IMPL).allowed == VK_WALK_ALLOW_FETCH);
		/* Explicit ones honour AC. */
		CHECK(run(s, g, user, RD) == OK);
	}
	SECTION("implicit accesses at CPL 0 honour AC on QEMU's TCG (its quirk)") {
		s.quirks = VK_WALK_QUIRK_IMPLICIT_SMAP_AC;
		CHECK(run(s, g, user, RD | IMPL) == EC_P);
		s.rflags |= VK_WALK_RFLAGS_AC;
		CHECK(run(s, g, user, RD | IMPL) == OK);
		CHECK(run(s, g, user, WR | IMPL) == OK);
		/* At CPL 3 the quirk changes nothing. */
		s.cpl = 3;
		CHECK(run(s, g, user, RD | IMPL) == EC_P);
	}
	SECTION("fetches are not subject to SMAP") {
		CHECK(run(s, g, user, FE) == OK);
	}
}

/*
 * Protection keys: the rules as the brief and the SDM state them, written
 * out per case for one page whose only restriction is its key (present,
 * writable, executable, U/S per `user_addr`), with both CR4.PKE and CR4.PKS
 * set. A user-mode access to a supervisor-mode address is refused before
 * keys are looked at.
 */
static long pk_expected(bool ad, bool wd, bool wp, bool user_addr,
			unsigned cpl, unsigned acc)
{
	bool user_access = cpl == 3;
	u32 ec = (user_access ? EC_U : 0) | (acc == WR ? EC_W : 0) |
		 (acc == FE ? EC_ID : 0);

	if (user_access && !user_addr)
		return EC_P | ec;
	if (acc == FE)
		return OK;
	if (ad)
		return EC_P | EC_PK | ec;
	if (acc == WR && wd && (user_access || wp))
		return EC_P | EC_PK | ec;
	return OK;
}

TEST_CASE("page walk: protection keys, every AD/WD x WP x address x CPL x access", "[page_walk][pks]")
{
	int levels = GENERATE(4, 5);
	Guest g(levels);
	vk_walk_state s = long_mode(g);
	s.cr4 |= VK_WALK_CR4_PKE | VK_WALK_CR4_PKS;
	int cases = 0;

	for (u32 key = 0; key < 16; key++) {
		const u64 user_la = 0x1000 + key * 0x1000;
		const u64 sup_la = 0x40000000 + key * 0x1000;
		/* Supervisor-mode through U/S=0 in the PDE, leaf U/S=1. */
		const u64 sup_nl_la = 0x80200000 + key * 0x1000;

		g.map(user_la, 0x100000000ull + key * 0x1000, 1,
		      P | W | U | key_bits(key));
		g.map(sup_la, 0x200000000ull + key * 0x1000, 1,
		      P | W | key_bits(key));
		g.map(sup_nl_la, 0x300000000ull + key * 0x1000, 1,
		      P | W | U | key_bits(key));
		g.entry(sup_nl_la, 2) &= ~U;

		for (u32 adwd = 0; adwd < 4; adwd++) {
			bool ad = adwd & 1, wd = adwd & 2;
			/*
			 * The key's bits; every other key gets AD|WD when
			 * this one has neither, and nothing otherwise, so a
			 * wrong index shows.
			 */
			u32 mine = adwd << (2 * key);
			u32 others = ~(3u << (2 * key)) &
				     (adwd == 0 ? 0xffffffffu : 0);
			u32 pkr = mine | others;

			for (bool wp : {false, true})
			for (int addr = 0; addr < 3; addr++)
			for (unsigned cpl : {0u, 3u})
			for (unsigned acc : {RD, WR, FE}) {
				bool user_addr = addr == 0;
				u64 la = addr == 0 ? user_la :
					 addr == 1 ? sup_la : sup_nl_la;

				s.cr0 = (s.cr0 & ~VK_WALK_CR0_WP) |
					(wp ? VK_WALK_CR0_WP : 0);
				s.cpl = cpl;
				/*
				 * The register of the other kind of address
				 * denies everything: it must not be read.
				 */
				s.pkru = user_addr ? pkr : 0x55555555u;
				s.pkrs = user_addr ? 0x55555555u : pkr;
				INFO("key " << key << " AD " << ad << " WD " << wd
				     << " WP " << wp << " address " << addr
				     << " CPL " << cpl << " access " << acc);
				vk_walk w = walk(s, g, la, acc);
				CHECK(outcome(w) ==
				      pk_expected(ad, wd, wp, user_addr, cpl, acc));
				CHECK(w.key == key);
				cases++;
			}
		}
	}
	CHECK(cases == 16 * 4 * 2 * 3 * 2 * 3);
}

TEST_CASE("page walk: keys are checked only with CR4.PKE / CR4.PKS", "[page_walk][pks]")
{
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 user = 0x1000, sup = 0x40000000;

	g.map(user, 0x9000, 1, P | W | U | key_bits(1));
	g.map(sup, 0xa000, 1, P | W | key_bits(1));
	s.pkru = s.pkrs = 0xffffffffu;

	CHECK(run(s, g, user, RD) == OK);
	CHECK(run(s, g, sup, RD) == OK);
	s.cr4 |= VK_WALK_CR4_PKE;
	CHECK(run(s, g, user, RD) == (EC_P | EC_PK));
	CHECK(run(s, g, sup, RD) == OK);
	s.cr4 ^= VK_WALK_CR4_PKE | VK_WALK_CR4_PKS;
	CHECK(run(s, g, user, RD) == OK);
	CHECK(run(s, g, sup, RD) == (EC_P | EC_PK));
	/* Implicit supervisor-mode accesses are data accesses: checked. */
	s.cpl = 3;
	CHECK(run(s, g, sup, RD | IMPL) == (EC_P | EC_PK));
	CHECK(run(s, g, sup, WR | IMPL) == (EC_P | EC_PK | EC_W));
	/* The allowed set includes the key's verdict. */
	s.cpl = 0;
	s.pkrs = 2u << 2;	/* key 1: WD */
	vk_walk w = walk(s, g, sup, RD);
	CHECK(outcome(w) == OK);
	CHECK(w.allowed == (VK_WALK_ALLOW_READ | VK_WALK_ALLOW_FETCH));
	s.cr0 &= ~VK_WALK_CR0_WP;
	CHECK(walk(s, g, sup, RD).allowed ==
	      (VK_WALK_ALLOW_READ | VK_WALK_ALLOW_WRITE | VK_WALK_ALLOW_FETCH));
}

TEST_CASE("page walk: key faults against other faults (QEMU's order)", "[page_walk][pks]")
{
	Guest g;
	vk_walk_state s = long_mode(g);
	const u64 user = 0x1000, sup = 0x40000000, sup_ro = 0x40001000;

	g.map(user, 0x9000, 1, P | W | U | key_bits(7));
	g.map(sup, 0xa000, 1, P | W | key_bits(7));
	g.map(sup_ro, 0xb000, 1, P | key_bits(7));
	s.cr4 |= VK_WALK_CR4_PKE | VK_WALK_CR4_PKS;

	/* A read-only page and WD: the key is reported. */
	s.pkrs = 2u << 14;
	CHECK(run(s, g, sup_ro, WR) == (EC_P | EC_W | EC_PK));
	/* WP=0: neither forbids the write. */
	s.cr0 &= ~VK_WALK_CR0_WP;
	CHECK(run(s, g, sup_ro, WR) == OK);
	s.cr0 |= VK_WALK_CR0_WP;

	/* A user-mode access to a supervisor page: no key report. */
	s.pkrs = 1u << 14;
	s.cpl = 3;
	CHECK(run(s, g, sup, RD) == (EC_P | EC_U));
	CHECK(run(s, g, sup, WR) == (EC_P | EC_U | EC_W));

	/* SMAP and AD on the same access: the key is reported. */
	s.cpl = 0;
	s.cr4 |= VK_WALK_CR4_SMAP;
	s.pkru = 1u << 14;
	CHECK(run(s, g, user, RD) == (EC_P | EC_PK));
	s.pkru = 0;
	CHECK(run(s, g, user, RD) == EC_P);

	/* A fetch from an XD page with AD: XD, never the key. */
	s.pkrs = 1u << 14;
	g.entry(sup, 1) |= NX;
	CHECK(run(s, g, sup, FE) == (EC_P | EC_ID));
	g.entry(sup, 1) &= ~NX;
	CHECK(run(s, g, sup, FE) == OK);

	/* Not present / reserved come first. */
	g.entry(sup, 1) |= 1ull << 50;
	CHECK(run(s, g, sup, RD) == (EC_P | EC_RSVD));
	g.entry(sup, 1) &= ~P;
	CHECK(run(s, g, sup, RD) == 0);
}

TEST_CASE("page walk: a failing reader is not a guest fault", "[page_walk]")
{
	int levels = GENERATE(4, 5);
	Guest g(levels);
	vk_walk_state s = long_mode(g);
	const u64 la = 0x0000008040201000ull;

	g.map(la, 0x9000, 1, P | W | U);
	vk_walk ok = walk(s, g, la, RD);
	REQUIRE(outcome(ok) == OK);
	for (int l = levels; l >= 1; l--) {
		INFO("level " << l);
		g.mem.bad = {ok.entry_gpa[l]};
		vk_walk w = walk(s, g, la, WR);
		CHECK(outcome(w) == READ_FAIL);
		CHECK(w.read_gpa == ok.entry_gpa[l]);
		CHECK(w.level == l);
		CHECK(w.entry[l] == 0);
		CHECK(w.error_code == 0);
		CHECK(w.gpa == 0);
		if (l < levels)
			CHECK(w.entry[l + 1] == ok.entry[l + 1]);
	}
	g.mem.bad.clear();
	CHECK(run(s, g, la, WR) == OK);
}

namespace {

/* Pages for x86::PageTables, readable by the engine. */
class PageMem : public virtkit::x86::PhysicalMemory {
public:
	std::byte *page(std::uint64_t gpa) override { return pages_.at(gpa).data(); }
	std::uint64_t alloc_table_page() override
	{
		std::uint64_t gpa = next_;

		next_ += 0x1000;
		pages_[gpa].fill(std::byte{0});
		return gpa;
	}

	static int read(void *ctx, u64 gpa, u64 *val)
	{
		auto *m = static_cast<PageMem *>(ctx);
		auto it = m->pages_.find(gpa & ~0xfffull);

		if (it == m->pages_.end())
			return -1;
		std::memcpy(val, it->second.data() + (gpa & 0xfff), 8);
		return 0;
	}

private:
	std::map<u64, std::array<std::byte, 4096>> pages_;
	u64 next_ = 0x10000;
};

} // namespace

TEST_CASE("page walk: agrees with x86::PageTables, the guest table builder", "[page_walk]")
{
	namespace x86 = virtkit::x86;
	int levels = GENERATE(4, 5);
	PageMem mem;
	x86::PageTables pt(mem, levels);
	vk_walk_mem m{PageMem::read, &mem};
	Guest dummy(levels);
	vk_walk_state s = long_mode(dummy);

	s.cr3 = pt.root();
	struct Map {
		u64 gva, gpa, size;
		x86::PageFlags flags;
		x86::PageSize page;
	};
	const Map maps[] = {
		{0x400000, 0x800000, 0x3000, {true, true, true, false, 3},
		 x86::PageSize::k4},
		{0xffff800000000000ull, 0x40000000, 0x400000,
		 {false, false, true, true, 0}, x86::PageSize::m2},
		{0x0000004000000000ull, 0x80000000, 0x40000000,
		 {true, false, false, false, 15}, x86::PageSize::g1},
	};
	for (const Map &mp : maps)
		pt.map(mp.gva, mp.gpa, mp.size, mp.flags, mp.page);

	for (const Map &mp : maps) {
		for (u64 off : {u64{0}, mp.size / 2 + 0x123, mp.size - 1}) {
			u64 gva = mp.gva + off;
			auto t = pt.translate(gva);
			vk_walk w;

			INFO("gva " << std::hex << gva);
			REQUIRE(t);
			REQUIRE(vk_walk_translate(&s, &m, gva, RD, &w) == VK_WALK_OK);
			CHECK(w.gpa == t->gpa);
			CHECK(w.page_size == static_cast<u64>(t->size));
			CHECK(w.entry[w.level] == t->leaf);
			CHECK(w.key == mp.flags.pkey);
			CHECK(!!(w.rights & VK_WALK_RIGHT_W) == mp.flags.writable);
			CHECK(!!(w.rights & VK_WALK_RIGHT_U) == mp.flags.user);
			CHECK(!!(w.rights & VK_WALK_RIGHT_X) == mp.flags.executable);
		}
	}
	/* Unmapped: not present in both. */
	vk_walk w;
	CHECK(!pt.translate(0x7000000));
	CHECK(vk_walk_translate(&s, &m, 0x7000000, RD, &w) == VK_WALK_PF);
	CHECK(w.error_code == 0);
}
