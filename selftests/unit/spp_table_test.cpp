// SPDX-License-Identifier: MIT
/* common/spp_table.c: the sub-page protection table, on heap pages. */
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "spp_table.h"

namespace {

using u32 = __u32;
using u64 = __u64;	/* unsigned long long, like VK_SPPT_GFN_LIMIT */
/* The struct, not the function vk_sppt_lookup() that hides its name. */
using Walk = vk_sppt_walk;

constexpr u32 all_w = VK_SPP_ALL_WRITABLE;
constexpr u64 l1e_default = VK_SPPT_L1E_DEFAULT;
constexpr unsigned phys_bits = 48;
/* GFNs covered by one table at each level. */
constexpr u64 span_l1 = 1ull << 9;	/* 2 MiB */
constexpr u64 span_l2 = 1ull << 18;	/* 1 GiB */
constexpr u64 span_l3 = 1ull << 27;	/* 512 GiB */

/*
 * Table pages from the heap: address = pointer. Counts live pages and map()
 * calls, and fails the allocation armed by fail_nth(). Misuse (a free or
 * map of a page it did not hand out) is counted in errors rather than
 * thrown: the callbacks run under C frames.
 */
struct Pool {
	long live = 0;
	u64 allocs = 0;		/* alloc() calls so far */
	u64 fail_at = 0;	/* the alloc() call that fails; 0: none */
	u64 maps = 0;		/* map() calls so far */
	int errors = 0;
	std::set<u64> owned;

	Pool() = default;
	Pool(const Pool &) = delete;
	Pool &operator=(const Pool &) = delete;
	~Pool()
	{
		for (u64 a : owned)
			std::free(reinterpret_cast<void *>(static_cast<std::uintptr_t>(a)));
	}

	/* Fail the n-th allocation from now on (1: the next one). */
	void fail_nth(u64 n) { fail_at = allocs + n; }
	void disarm() { fail_at = 0; }

	static u64 alloc(void *ctx)
	{
		auto *p = static_cast<Pool *>(ctx);
		if (++p->allocs == p->fail_at)
			return 0;
		void *page = std::aligned_alloc(4096, 4096);
		if (!page)
			return 0;
		std::memset(page, 0, 4096);
		u64 a = reinterpret_cast<std::uintptr_t>(page);
		if (a >> phys_bits || a & 0xfff)
			p->errors++;
		p->owned.insert(a);
		p->live++;
		return a;
	}
	static void free(void *ctx, u64 addr)
	{
		auto *p = static_cast<Pool *>(ctx);
		if (!p->owned.erase(addr)) {
			p->errors++;
			return;
		}
		std::free(reinterpret_cast<void *>(static_cast<std::uintptr_t>(addr)));
		p->live--;
	}
	static u64 *map(void *ctx, u64 addr)
	{
		auto *p = static_cast<Pool *>(ctx);
		p->maps++;
		if (!p->owned.count(addr))
			p->errors++;
		return reinterpret_cast<u64 *>(static_cast<std::uintptr_t>(addr));
	}
};

const vk_sppt_ops pool_ops = {Pool::alloc, Pool::free, Pool::map, nullptr};

struct Table {
	Pool pool;
	vk_sppt t;

	Table() { vk_sppt_init(&t, &pool_ops, &pool, phys_bits); }
	~Table() { vk_sppt_destroy(&t); }

	std::vector<u32> get(u64 gfn, u64 n) const
	{
		std::vector<u32> v(n, 0x12345678);
		REQUIRE(vk_sppt_get(&t, gfn, n, v.data()) == VK_SPPT_OK);
		return v;
	}
	int set(u64 gfn, const std::vector<u32> &maps)
	{
		return vk_sppt_set(&t, gfn, maps.size(), maps.data());
	}
	Walk walk_gfn(u64 gfn) const
	{
		Walk w;
		std::memset(&w, 0xa5, sizeof(w));
		vk_sppt_lookup(&t, gfn << 12, &w);
		return w;
	}
	/* The table's pages agree with the pool's. */
	void check_pool() const
	{
		CHECK(pool.errors == 0);
		CHECK(t.pages == static_cast<u64>(pool.live));
		CHECK(t.pages == pool.owned.size());
		CHECK((t.root == 0) == (t.pages == 0));
	}
};

unsigned idx(u64 gfn, int level)
{
	return (gfn >> (9 * (level - 1))) & 511;
}

/* The level-`level` entry of gfn's path (which must exist down to it). */
u64 *entry_ptr(const Table &tb, u64 gfn, int level)
{
	const u64 addr_mask = ((1ull << phys_bits) - 1) & ~0xfffull;
	u64 *tbl = reinterpret_cast<u64 *>(static_cast<std::uintptr_t>(tb.t.root));
	for (int l = 4; l > level; l--) {
		u64 e = tbl[idx(gfn, l)];
		REQUIRE((e & 1) == 1);
		tbl = reinterpret_cast<u64 *>(static_cast<std::uintptr_t>(e & addr_mask));
	}
	return &tbl[idx(gfn, level)];
}

/* Everything a lookup can see of gfn..gfn+n-1. */
struct Snapshot {
	std::vector<u32> maps;
	std::vector<u64> walks;	/* result, level, entry, map of each page */
	u64 root, pages;
	long live;

	bool operator==(const Snapshot &) const = default;
};

Snapshot snapshot(const Table &tb, u64 gfn, u64 n)
{
	Snapshot s;
	s.maps.assign(n, 0);
	/* A misconfigured table has no maps to compare: leave them 0. */
	if (vk_sppt_get(&tb.t, gfn, n, s.maps.data()) != VK_SPPT_OK)
		s.maps.assign(n, 0);
	for (u64 g = gfn; g < gfn + n; g++) {
		auto w = tb.walk_gfn(g);
		s.walks.push_back(w.result);
		s.walks.push_back(static_cast<u64>(w.level));
		s.walks.push_back(w.entry);
		s.walks.push_back(w.result == VK_SPPT_WALK_OK ? w.map : 0);
	}
	s.root = tb.t.root;
	s.pages = tb.t.pages;
	s.live = tb.pool.live;
	return s;
}

/* Maps that are never all-writable, and differ page to page. */
std::vector<u32> protected_maps(u64 n, u32 seed)
{
	std::vector<u32> v(n);
	for (u64 i = 0; i < n; i++)
		v[i] = (seed + static_cast<u32>(i) * 0x9e3779b9u) & ~(1u << (i % 32));
	return v;
}

/* The table pages a set of protected pages needs: one per distinct table. */
u64 tables_for(const std::set<u64> &gfns)
{
	std::set<u64> l1, l2, l3;
	for (u64 g : gfns) {
		l1.insert(g / span_l1);
		l2.insert(g / span_l2);
		l3.insert(g / span_l3);
	}
	return l1.size() + l2.size() + l3.size() + (gfns.empty() ? 0 : 1);
}

std::string hex(u64 v)
{
	std::ostringstream os;
	os << "0x" << std::hex << v;
	return os.str();
}

} // namespace

TEST_CASE("sppt: access map <-> L1E spreads bit i to bit 2i", "[spp_table]")
{
	CHECK(vk_spp_map_to_l1e(0) == 0);
	CHECK(vk_spp_map_to_l1e(~0u) == l1e_default);
	CHECK(vk_spp_l1e_to_map(l1e_default) == all_w);
	CHECK(vk_spp_l1e_to_map(0) == 0);
	CHECK(vk_spp_l1e_to_map(~0ull) == all_w);
	/* The odd (reserved) bits do not read as sub-pages. */
	CHECK(vk_spp_l1e_to_map(0xaaaaaaaaaaaaaaaaull) == 0);
	for (int i = 0; i < 32; i++) {
		INFO("bit " << i);
		CHECK(vk_spp_map_to_l1e(1u << i) == 1ull << (2 * i));
		CHECK(vk_spp_l1e_to_map(1ull << (2 * i)) == 1u << i);
		CHECK(vk_spp_l1e_to_map(1ull << (2 * i + 1)) == 0);
		CHECK(vk_spp_map_to_l1e(~(1u << i)) == (l1e_default & ~(1ull << (2 * i))));
	}
	std::mt19937 rng(1);
	for (int n = 0; n < 20000; n++) {
		u32 m = rng();
		u64 e = vk_spp_map_to_l1e(m);
		INFO("map " << hex(m));
		CHECK((e & 0xaaaaaaaaaaaaaaaaull) == 0);
		CHECK(vk_spp_l1e_to_map(e) == m);
		CHECK(vk_spp_l1e_to_map(e | 0xaaaaaaaaaaaaaaaaull) == m);
		for (int i = 0; i < 32; i += 7)
			CHECK(((e >> (2 * i)) & 1) == ((m >> i) & 1));
	}
}

TEST_CASE("sppt: an empty table reads all-writable and walks miss at level 4", "[spp_table]")
{
	Table tb;
	CHECK(tb.t.root == 0);
	CHECK(tb.t.pages == 0);
	for (u64 gfn : {0ull, 0x12345ull, VK_SPPT_GFN_LIMIT - 2000}) {
		auto v = tb.get(gfn, 2000);
		CHECK(v == std::vector<u32>(2000, all_w));
	}
	auto w = tb.walk_gfn(0x1234);
	CHECK(w.result == VK_SPPT_WALK_MISS);
	CHECK(w.level == 4);
	CHECK(w.entry == 0);
	/* Clearing an empty table allocates nothing. */
	tb.pool.fail_nth(1);
	CHECK(vk_sppt_fill(&tb.t, 0x1000, 5000, all_w) == VK_SPPT_OK);
	CHECK(tb.set(0x1000, std::vector<u32>(700, all_w)) == VK_SPPT_OK);
	CHECK(tb.pool.allocs == 0);
	CHECK(tb.t.root == 0);
	tb.check_pool();
}

TEST_CASE("sppt: set/get round trip at unaligned GFNs and across table boundaries", "[spp_table]")
{
	const u64 sizes[] = {1, 2, 511, 512, 513, 1025};
	const u64 starts[] = {
		0x12345,		/* unaligned */
		0x3fffe,		/* crosses 1 GiB (L3E) */
		span_l3 - 3,		/* crosses 512 GiB (L4E) */
		0x1ff,			/* ends or crosses a 2 MiB boundary */
		VK_SPPT_GFN_LIMIT - 1025, /* up to the last page */
	};
	for (u64 gfn : starts) {
		for (u64 n : sizes) {
			if (gfn + n > VK_SPPT_GFN_LIMIT)
				continue;
			INFO("gfn " << hex(gfn) << " npages " << n);
			Table tb;
			auto maps = protected_maps(n, static_cast<u32>(gfn + n));
			/* Some pages stay all-writable. */
			for (u64 i = 3; i < n; i += 5)
				maps[i] = all_w;
			REQUIRE(tb.set(gfn, maps) == VK_SPPT_OK);

			std::set<u64> prot;
			for (u64 i = 0; i < n; i++)
				if (maps[i] != all_w)
					prot.insert(gfn + i);
			CHECK(tb.t.pages == tables_for(prot));
			tb.check_pool();

			/* A window around the range: all-writable outside. */
			u64 lo = gfn >= 700 ? gfn - 700 : 0;
			u64 hi = std::min(gfn + n + 700, VK_SPPT_GFN_LIMIT);
			auto got = tb.get(lo, hi - lo);
			for (u64 g = lo; g < hi; g++) {
				u32 want = g >= gfn && g < gfn + n ? maps[g - gfn] : all_w;
				if (got[g - lo] != want) {
					FAIL_CHECK("gfn " << hex(g) << " reads " << hex(got[g - lo])
						   << " want " << hex(want));
					break;
				}
			}
			CHECK(tb.get(gfn, n) == maps);
			for (u64 i = 0; i < n; i++) {
				auto w = tb.walk_gfn(gfn + i);
				if (maps[i] != all_w &&
				    (w.result != VK_SPPT_WALK_OK || w.level != 1 || w.map != maps[i] ||
				     w.entry != vk_spp_map_to_l1e(maps[i]))) {
					FAIL_CHECK("walk of gfn " << hex(gfn + i));
					break;
				}
			}

			/* Setting all-writable again frees every table. */
			REQUIRE(tb.set(gfn, std::vector<u32>(n, all_w)) == VK_SPPT_OK);
			CHECK(tb.t.pages == 0);
			CHECK(tb.t.root == 0);
			CHECK(tb.pool.live == 0);
			tb.check_pool();
			CHECK(tb.get(lo, hi - lo) == std::vector<u32>(hi - lo, all_w));

			/* So does fill. */
			REQUIRE(tb.set(gfn, maps) == VK_SPPT_OK);
			CHECK(tb.t.pages == tables_for(prot));
			REQUIRE(vk_sppt_fill(&tb.t, gfn, n, all_w) == VK_SPPT_OK);
			CHECK(tb.t.root == 0);
			CHECK(tb.pool.live == 0);
			tb.check_pool();
		}
	}
}

TEST_CASE("sppt: a span crossing 1 GiB uses one table per level and region", "[spp_table]")
{
	Table tb;
	/* 0x3fffe..0x40002: two L1 and two L2 tables under one L3 and L4. */
	auto maps = protected_maps(5, 7);
	REQUIRE(tb.set(0x3fffe, maps) == VK_SPPT_OK);
	CHECK(tb.t.pages == 6);
	CHECK(tb.get(0x3fffe, 5) == maps);
	tb.check_pool();

	/* Clearing one side frees only that side's L1 and L2 tables. */
	REQUIRE(vk_sppt_fill(&tb.t, 0x40000, 3, all_w) == VK_SPPT_OK);
	CHECK(tb.t.pages == 4);
	CHECK(tb.get(0x3fffe, 2) == std::vector<u32>(maps.begin(), maps.begin() + 2));
	auto w = tb.walk_gfn(0x40000);
	CHECK(w.result == VK_SPPT_WALK_MISS);
	CHECK(w.level == 3);
	CHECK(w.entry == 0);
	tb.check_pool();

	REQUIRE(vk_sppt_fill(&tb.t, 0x3fffe, 1, all_w) == VK_SPPT_OK);
	CHECK(tb.t.pages == 4); /* 0x3ffff still protected */
	REQUIRE(vk_sppt_fill(&tb.t, 0x3ffff, 1, all_w) == VK_SPPT_OK);
	CHECK(tb.t.pages == 0);
	CHECK(tb.t.root == 0);
	tb.check_pool();
}

TEST_CASE("sppt: fill sets one map everywhere and overwrites", "[spp_table]")
{
	Table tb;
	REQUIRE(vk_sppt_fill(&tb.t, 0x1f0, 0x220, 0) == VK_SPPT_OK);
	CHECK(tb.get(0x1f0, 0x220) == std::vector<u32>(0x220, 0));
	CHECK(tb.t.pages == 1 + 1 + 1 + 3);
	REQUIRE(vk_sppt_fill(&tb.t, 0x200, 0x10, 0xf0f0f0f0) == VK_SPPT_OK);
	auto v = tb.get(0x1f0, 0x220);
	for (u64 i = 0; i < 0x220; i++) {
		u64 g = 0x1f0 + i;
		u32 want = g >= 0x200 && g < 0x210 ? 0xf0f0f0f0 : 0;
		if (v[i] != want) {
			FAIL_CHECK("gfn " << hex(g));
			break;
		}
	}
	/* Zero means every sub-page protected, not "unset". */
	auto w = tb.walk_gfn(0x1f0);
	CHECK(w.result == VK_SPPT_WALK_OK);
	CHECK(w.entry == 0);
	CHECK(w.map == 0);
	tb.check_pool();
}

TEST_CASE("sppt: walk reports where the lookup stopped", "[spp_table]")
{
	Table tb;
	const u64 gfn = 5 * span_l2 + 7 * span_l1 + 100;
	const u32 map = 0x0ff000f1;
	REQUIRE(vk_sppt_fill(&tb.t, gfn, 1, map) == VK_SPPT_OK);
	REQUIRE(tb.t.pages == 4);

	Walk w;
	vk_sppt_lookup(&tb.t, (gfn << 12) | 0xabc, &w);
	CHECK(w.result == VK_SPPT_WALK_OK);
	CHECK(w.level == 1);
	CHECK(w.map == map);
	CHECK(w.entry == vk_spp_map_to_l1e(map));

	SECTION("an untouched neighbour in the same L1 table is default") {
		for (u64 g : {gfn - 1, gfn + 1, gfn - 100, gfn + 411}) {
			w = tb.walk_gfn(g);
			CHECK(w.result == VK_SPPT_WALK_OK);
			CHECK(w.level == 1);
			CHECK(w.entry == l1e_default);
			CHECK(w.map == all_w);
		}
	}
	SECTION("the neighbouring 2 MiB region misses at level 2") {
		for (u64 g : {gfn + span_l1, gfn - span_l1}) {
			w = tb.walk_gfn(g);
			CHECK(w.result == VK_SPPT_WALK_MISS);
			CHECK(w.level == 2);
			CHECK(w.entry == 0);
		}
	}
	SECTION("the neighbouring 1 GiB region misses at level 3") {
		w = tb.walk_gfn(gfn + span_l2);
		CHECK(w.result == VK_SPPT_WALK_MISS);
		CHECK(w.level == 3);
		CHECK(w.entry == 0);
	}
	SECTION("another 512 GiB region misses at level 4") {
		w = tb.walk_gfn(gfn + span_l3);
		CHECK(w.result == VK_SPPT_WALK_MISS);
		CHECK(w.level == 4);
		CHECK(w.entry == 0);
	}
	SECTION("a GPA beyond 48 bits misses at level 4") {
		/* Bits 47:12 alias gfn: must not read its entry. */
		for (u64 gpa : {(1ull << 48) | (gfn << 12), ~0ull, 1ull << 63}) {
			vk_sppt_lookup(&tb.t, gpa, &w);
			CHECK(w.result == VK_SPPT_WALK_MISS);
			CHECK(w.level == 4);
			CHECK(w.entry == 0);
		}
	}
	SECTION("the entries on the path are valid table pointers") {
		for (int l = 4; l >= 2; l--) {
			u64 e = *entry_ptr(tb, gfn, l);
			CHECK((e & 0xfff) == 1);
			CHECK(e >> phys_bits == 0);
			CHECK(tb.pool.owned.count(e & ~0xfffull) == 1);
		}
	}
	tb.check_pool();
}

TEST_CASE("sppt: reserved bits in a non-leaf entry are a misconfiguration", "[spp_table]")
{
	Table tb;
	const u64 gfn = 3 * span_l3 + 9 * span_l2 + 17 * span_l1 + 5;
	REQUIRE(vk_sppt_fill(&tb.t, gfn, 1, 0x1234) == VK_SPPT_OK);
	/* A second L1 table elsewhere in the range an update will cover. */
	REQUIRE(vk_sppt_fill(&tb.t, gfn - span_l1, 1, 0) == VK_SPPT_OK);
	const u64 pages = tb.t.pages;

	std::vector<int> bits;
	for (int b = 1; b <= 11; b++)
		bits.push_back(b);
	for (int b : {static_cast<int>(phys_bits), 51, 52, 62, 63})
		bits.push_back(b);

	for (int level = 4; level >= 2; level--) {
		for (int b : bits) {
			INFO("level " << level << " bit " << b);
			u64 *e = entry_ptr(tb, gfn, level);
			const u64 good = *e;
			*e = good | (1ull << b);

			auto w = tb.walk_gfn(gfn);
			CHECK(w.result == VK_SPPT_WALK_MISCONFIG);
			CHECK(w.level == level);
			CHECK(w.entry == (good | (1ull << b)));

			std::vector<u32> v(4);
			CHECK(vk_sppt_get(&tb.t, gfn - 2, 4, v.data()) == VK_SPPT_EMISCONFIG);

			/* An update over it refuses and changes nothing. */
			const u64 lo = gfn - 3 * span_l1, n = 6 * span_l1;
			auto before = snapshot(tb, lo, n);
			CHECK(tb.set(lo, protected_maps(n, 3)) == VK_SPPT_EMISCONFIG);
			CHECK(vk_sppt_fill(&tb.t, lo, n, all_w) == VK_SPPT_EMISCONFIG);
			CHECK(snapshot(tb, lo, n) == before);
			CHECK(tb.t.pages == pages);

			*e = good;
			w = tb.walk_gfn(gfn);
			CHECK(w.result == VK_SPPT_WALK_OK);
			CHECK(w.map == 0x1234);
			tb.check_pool();
		}
	}

	SECTION("a cleared valid bit is a miss at that level") {
		u64 *e = entry_ptr(tb, gfn, 2);
		const u64 good = *e;
		*e = good & ~1ull;
		auto w = tb.walk_gfn(gfn);
		CHECK(w.result == VK_SPPT_WALK_MISS);
		CHECK(w.level == 2);
		CHECK(w.entry == (good & ~1ull));
		*e = good;
	}
	SECTION("destroy frees through a misconfigured entry") {
		*entry_ptr(tb, gfn, 3) |= 1ull << 60;
		vk_sppt_destroy(&tb.t);
		CHECK(tb.pool.live == 0);
		tb.check_pool();
	}
}

TEST_CASE("sppt: an odd bit in an L1E is a misconfiguration", "[spp_table]")
{
	Table tb;
	const u64 gfn = 0x40123;
	REQUIRE(vk_sppt_fill(&tb.t, gfn, 3, 0xaaaa5555) == VK_SPPT_OK);
	for (int i = 0; i < 32; i++) {
		INFO("bit " << 2 * i + 1);
		u64 *e = entry_ptr(tb, gfn + 1, 1);
		const u64 good = *e;
		*e = good | (1ull << (2 * i + 1));
		auto w = tb.walk_gfn(gfn + 1);
		CHECK(w.result == VK_SPPT_WALK_MISCONFIG);
		CHECK(w.level == 1);
		CHECK(w.entry == (good | (1ull << (2 * i + 1))));
		std::vector<u32> v(3);
		CHECK(vk_sppt_get(&tb.t, gfn, 3, v.data()) == VK_SPPT_EMISCONFIG);
		/* Neighbours still walk. */
		CHECK(tb.walk_gfn(gfn).result == VK_SPPT_WALK_OK);
		*e = good;
	}
	SECTION("setting the page rewrites the entry") {
		*entry_ptr(tb, gfn + 1, 1) |= 2;
		REQUIRE(vk_sppt_fill(&tb.t, gfn + 1, 1, 7) == VK_SPPT_OK);
		auto w = tb.walk_gfn(gfn + 1);
		CHECK(w.result == VK_SPPT_WALK_OK);
		CHECK(w.map == 7);
	}
	SECTION("a misconfigured default entry keeps its table") {
		/* gfn+10 is default; with its odd bit set the table is not. */
		*entry_ptr(tb, gfn + 10, 1) |= 1ull << 63;
		REQUIRE(vk_sppt_fill(&tb.t, gfn, 3, all_w) == VK_SPPT_OK);
		CHECK(tb.t.pages == 4);
		CHECK(tb.walk_gfn(gfn + 10).result == VK_SPPT_WALK_MISCONFIG);
		CHECK(tb.walk_gfn(gfn).entry == l1e_default);
	}
	tb.check_pool();
}

TEST_CASE("sppt: ENOMEM at any allocation leaves the table as it was", "[spp_table]")
{
	/*
	 * The update crosses 512 GiB (so 1 GiB and 2 MiB too), over existing
	 * L1 tables (one to extend, one to keep) and new tables at every
	 * level: a new root, a new L3 under the root, a new L2 under an
	 * existing L3, new L1 tables.
	 */
	const u64 lo = span_l3 - 4 * span_l1 - 10;
	const u64 n = 9 * span_l1 + 20;
	const u64 win_lo = lo - 600, win_n = n + 1200;

	enum Prefill { none, low, both };
	struct Op {
		const char *name;
		Prefill prefill;
		bool fill;
	};
	for (Op op : {Op{"set on an empty table", none, false},
		      Op{"fill on an empty table", none, true},
		      Op{"set below 512 GiB populated", low, false},
		      Op{"fill below 512 GiB populated", low, true},
		      Op{"set with an L3 table above 512 GiB", both, false},
		      Op{"fill with an L3 table above 512 GiB", both, true}}) {
		INFO(op.name);
		/* Protected pages in some spans only: the others stay missing. */
		std::vector<u32> maps(n, all_w);
		for (u64 i = 0; i < n; i += 997)
			maps[i] = static_cast<u32>(i);
		maps[n - 1] = 0;

		u64 fails = 0;
		for (u64 nth = 1;; nth++) {
			INFO("fail allocation " << nth);
			Table tb;
			if (op.prefill != none) {
				REQUIRE(vk_sppt_fill(&tb.t, lo + 5, 3, 0x11) == VK_SPPT_OK);
				REQUIRE(vk_sppt_fill(&tb.t, lo + 2 * span_l1 + 7, 1, 0x22) ==
					VK_SPPT_OK);
				REQUIRE(vk_sppt_fill(&tb.t, win_lo, 1, 0x33) == VK_SPPT_OK);
			}
			if (op.prefill == both)
				REQUIRE(vk_sppt_fill(&tb.t, span_l3 + 50 * span_l2, 1, 0x44) ==
					VK_SPPT_OK);
			auto before = snapshot(tb, win_lo, win_n);
			const u64 allocs = tb.pool.allocs;
			tb.pool.fail_nth(nth);
			int rc = op.fill ? vk_sppt_fill(&tb.t, lo, n, 0x5) : tb.set(lo, maps);
			tb.pool.disarm();
			tb.check_pool();
			if (rc == VK_SPPT_OK) {
				/* Every allocation succeeded: nth is past the last. */
				CHECK(fails > 0);
				CHECK(tb.pool.allocs - allocs == fails);
				if (op.fill) {
					CHECK(tb.get(lo, n) == std::vector<u32>(n, 0x5));
				} else {
					CHECK(tb.get(lo, n) == maps);
				}
				break;
			}
			REQUIRE(rc == VK_SPPT_ENOMEM);
			fails++;
			CHECK(snapshot(tb, win_lo, win_n) == before);
			REQUIRE(fails < 100);
		}
	}
}

TEST_CASE("sppt: out-of-range GFNs are refused and change nothing", "[spp_table]")
{
	Table tb;
	REQUIRE(vk_sppt_fill(&tb.t, VK_SPPT_GFN_LIMIT - 3, 3, 0x77) == VK_SPPT_OK);
	const u64 lim = VK_SPPT_GFN_LIMIT;
	auto before = snapshot(tb, lim - 1000, 1000);
	std::vector<u32> maps(4, 0);

	struct Range {
		u64 gfn, npages;
	};
	for (Range r : {Range{lim, 1}, Range{lim + 5, 1}, Range{lim - 1, 2}, Range{~0ull, 2},
			Range{~0ull, 1}, Range{0, lim + 1}, Range{1, ~0ull}, Range{lim - 3, ~0ull - 1},
			Range{1ull << 63, 1}}) {
		INFO("gfn " << hex(r.gfn) << " npages " << hex(r.npages));
		CHECK(vk_sppt_set(&tb.t, r.gfn, r.npages, maps.data()) == VK_SPPT_ERANGE);
		CHECK(vk_sppt_fill(&tb.t, r.gfn, r.npages, 0) == VK_SPPT_ERANGE);
		CHECK(vk_sppt_get(&tb.t, r.gfn, r.npages, maps.data()) == VK_SPPT_ERANGE);
	}
	CHECK(snapshot(tb, lim - 1000, 1000) == before);

	SECTION("npages == 0 is a no-op, whatever the GFN") {
		for (u64 gfn : {0ull, lim - 1, lim, ~0ull}) {
			CHECK(vk_sppt_set(&tb.t, gfn, 0, nullptr) == VK_SPPT_OK);
			CHECK(vk_sppt_fill(&tb.t, gfn, 0, 0) == VK_SPPT_OK);
			CHECK(vk_sppt_get(&tb.t, gfn, 0, nullptr) == VK_SPPT_OK);
		}
		CHECK(snapshot(tb, lim - 1000, 1000) == before);
	}
	SECTION("the last page is in range") {
		CHECK(vk_sppt_fill(&tb.t, lim - 1, 1, 0x99) == VK_SPPT_OK);
		CHECK(tb.get(lim - 4, 4) == std::vector<u32>{all_w, 0x77, 0x77, 0x99});
		auto w = tb.walk_gfn(lim - 1);
		CHECK(w.result == VK_SPPT_WALK_OK);
		CHECK(w.map == 0x99);
	}
	tb.check_pool();
}

TEST_CASE("sppt: 1 GiB of alternating maps uses one L1 table per 2 MiB", "[spp_table]")
{
	Table tb;
	const u64 gfn = 7 * span_l2;
	const u64 n = span_l2;	/* 262144 pages */
	std::vector<u32> maps(n);
	for (u64 i = 0; i < n; i++)
		maps[i] = i % 2 ? all_w : static_cast<u32>(i * 2654435761u) & ~1u;
	REQUIRE(tb.set(gfn, maps) == VK_SPPT_OK);
	CHECK(tb.t.pages == 1 + 1 + 1 + 512);
	CHECK(tb.pool.live == 1 + 1 + 1 + 512);
	tb.check_pool();

	const u64 maps_before = tb.pool.maps;
	CHECK(tb.get(gfn, n) == maps);
	/* O(npages): one walk (four table maps) per L1 table, not per page. */
	CHECK(tb.pool.maps - maps_before <= 4 * 512);
	CHECK(tb.get(gfn - 10, 20) ==
	      [&] {
		      std::vector<u32> v(10, all_w);
		      v.insert(v.end(), maps.begin(), maps.begin() + 10);
		      return v;
	      }());

	SECTION("clearing the odd half changes nothing; the even half frees all") {
		std::vector<u32> odd(n, all_w);
		REQUIRE(tb.set(gfn, odd) == VK_SPPT_OK);
		CHECK(tb.t.pages == 0);
		CHECK(tb.pool.live == 0);
	}
	SECTION("destroy leaves no page") {
		vk_sppt_destroy(&tb.t);
		CHECK(tb.t.root == 0);
		CHECK(tb.t.pages == 0);
		CHECK(tb.pool.live == 0);
		/* And the table is usable again. */
		REQUIRE(vk_sppt_fill(&tb.t, gfn, 1, 0) == VK_SPPT_OK);
		CHECK(tb.t.pages == 4);
	}
	tb.check_pool();
}

TEST_CASE("sppt: destroy frees every table page", "[spp_table]")
{
	Table tb;
	for (u64 gfn : {0ull, 0x3fffeull, span_l3 + 12345, 17 * span_l3 + 3 * span_l2,
			VK_SPPT_GFN_LIMIT - 700})
		REQUIRE(vk_sppt_fill(&tb.t, gfn, 700, 0) == VK_SPPT_OK);
	CHECK(tb.pool.live > 10);
	tb.check_pool();
	vk_sppt_destroy(&tb.t);
	CHECK(tb.t.root == 0);
	CHECK(tb.t.pages == 0);
	CHECK(tb.pool.live == 0);
	CHECK(tb.pool.errors == 0);
	auto w = tb.walk_gfn(0);
	CHECK(w.result == VK_SPPT_WALK_MISS);
	CHECK(w.level == 4);
}

TEST_CASE("sppt: random updates match a model, table for table", "[spp_table]")
{
	/* Windows across 1 GiB and 512 GiB boundaries (which are 2 MiB ones). */
	const u64 wins[] = {span_l2 - 1500, span_l3 - 1500, 5 * span_l3 + 2 * span_l1 - 1500};
	const u64 win_n = 3000;
	std::mt19937_64 rng(42);
	Table tb;
	std::vector<std::vector<u32>> model(3, std::vector<u32>(win_n, all_w));

	auto random_map = [&]() -> u32 {
		switch (rng() % 4) {
		case 0:
		case 1:
			return all_w;
		case 2:
			return 0;
		default:
			return static_cast<u32>(rng());
		}
	};

	for (int step = 0; step < 1500; step++) {
		INFO("step " << step);
		const unsigned wi = rng() % 3;
		const u64 off = rng() % win_n;
		u64 n = rng() % 4 ? rng() % 40 : rng() % 1200;
		n = std::min(n, win_n - off);
		const u64 gfn = wins[wi] + off;

		int rc;
		std::vector<u32> maps(n);
		const bool fill = rng() % 2;
		const u32 fmap = random_map();
		for (auto &m : maps)
			m = fill ? fmap : random_map();
		const bool inject = rng() % 5 == 0;
		if (inject)
			tb.pool.fail_nth(1 + rng() % 4);
		rc = fill ? vk_sppt_fill(&tb.t, gfn, n, fmap) : tb.set(gfn, maps);
		tb.pool.disarm();
		if (rc == VK_SPPT_ENOMEM) {
			REQUIRE(inject);
		} else {
			REQUIRE(rc == VK_SPPT_OK);
			std::copy(maps.begin(), maps.end(), model[wi].begin() + static_cast<long>(off));
		}

		std::set<u64> prot;
		for (unsigned w = 0; w < 3; w++)
			for (u64 i = 0; i < win_n; i++)
				if (model[w][i] != all_w)
					prot.insert(wins[w] + i);
		REQUIRE(tb.t.pages == tables_for(prot));
		tb.check_pool();
		for (unsigned w = 0; w < 3; w++)
			REQUIRE(tb.get(wins[w], win_n) == model[w]);

		/* Walks: an L1 table exists exactly where a page is protected. */
		for (int k = 0; k < 8; k++) {
			const u64 g = wins[wi] + rng() % win_n;
			auto w = tb.walk_gfn(g);
			const auto near = [&](u64 span) {
				auto it = prot.lower_bound(g / span * span);
				return it != prot.end() && *it / span == g / span;
			};
			if (near(span_l1)) {
				REQUIRE(w.result == VK_SPPT_WALK_OK);
				REQUIRE(w.map == model[wi][g - wins[wi]]);
			} else {
				REQUIRE(w.result == VK_SPPT_WALK_MISS);
				REQUIRE(w.level == (near(span_l2) ? 2 : near(span_l3) ? 3 : 4));
			}
		}
	}
}
