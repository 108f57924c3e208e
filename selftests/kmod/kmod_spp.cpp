// SPDX-License-Identifier: MIT
/*
 * The SPP ioctls of the per-VM file: ENOENT before SPP_ENABLE, enable
 * idempotent, SET/GET round trips of every kind of map, the range and size
 * limits, bad pointers and non-zero reserved fields (each refused with
 * nothing changed), the statistics, and the per-VM table budget
 * (spp_max_table_pages: ENOSPC, nothing changed).
 */
#include "kmod_util.hpp"

#include <fstream>

using namespace kmt;
using virtkit::FileDesc;

static constexpr u64 LIMIT = VIRTKIT_SPP_GFN_LIMIT;

/* An attached, SPP-enabled VM without vCPUs. */
struct SppVm {
	FileDesc dev = open_dev();
	RawVm vm{0};
	FileDesc vk = attach_ok(dev.get(), vm.vm.get());

	explicit SppVm(bool enable = true)
	{
		if (enable)
			EXPECT_OK(spp_enable(vk.get()));
	}
	int fd() const { return vk.get(); }
};

static long max_pages(int fd)
{
	return sys_ioctl(fd, VIRTKIT_CHECK_EXTENSION, (unsigned long)VIRTKIT_CAP_SPP_MAX_PAGES);
}

VK_TEST(enoent_before_enable)
{
	require_module();
	SppVm t(false);
	u32 map = 0;
	virtkit_spp_stats s;
	EXPECT_ERRNO(spp_set(t.fd(), 1, 1, &map), ENOENT);
	EXPECT_ERRNO(spp_get(t.fd(), 1, 1, &map), ENOENT);
	EXPECT_ERRNO(spp_stats(t.fd(), &s), ENOENT);
	/* Argument errors are still reported as such. */
	EXPECT_ERRNO(spp_set(t.fd(), LIMIT, 1, &map), EINVAL);
	EXPECT_OK(spp_enable(t.fd()));
	TEST_ASSERT_EQ(get_maps(t.fd(), 1, 1)[0], ALL);
	auto st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 0u);
	TEST_ASSERT_EQ(st.table_pages, 0u);
	TEST_ASSERT_EQ(st.fast_writes, 0u);
	TEST_ASSERT_EQ(st.user_exits, 0u);
}

VK_TEST(enable_idempotent_and_checked)
{
	require_module();
	SppVm t(false);
	virtkit_spp_enable e{};
	for (u32 flags : {1u, 0x80000000u}) {
		e.flags = flags;
		EXPECT_ERRNO(sys_ioctl(t.fd(), VIRTKIT_SPP_ENABLE, &e), EINVAL);
	}
	e.flags = 0;
	for (int i = 0; i < 7; i++) {
		e.reserved[i] = 1u << i;
		EXPECT_ERRNO(sys_ioctl(t.fd(), VIRTKIT_SPP_ENABLE, &e), EINVAL);
		e.reserved[i] = 0;
	}
	for (unsigned long p : {0ul, 1ul, 0xffff888000000000ul})
		EXPECT_ERRNO(sys_ioctl(t.fd(), VIRTKIT_SPP_ENABLE, p), EFAULT);
	/* None of them enabled anything. */
	virtkit_spp_stats s;
	EXPECT_ERRNO(spp_stats(t.fd(), &s), ENOENT);

	EXPECT_OK(spp_enable(t.fd()));
	u32 map = 0x0f0f0f0fu;
	EXPECT_OK(spp_set(t.fd(), 9, 1, &map));
	/* Enabling again keeps the table. */
	for (int i = 0; i < 3; i++)
		EXPECT_OK(spp_enable(t.fd()));
	TEST_ASSERT_EQ(get_maps(t.fd(), 9, 1)[0], map);
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, 1u);
}

/* Maps of every shape: 0, all ones, each single bit set and cleared, stripes, random. */
static std::vector<u32> patterns()
{
	std::vector<u32> p = {0u, ALL, 0x55555555u, 0xaaaaaaaau, 0x0000ffffu, 0xffff0000u,
			      0x00ff00ffu, 0x80000001u, 0x7ffffffeu};
	for (int i = 0; i < 32; i++) {
		p.push_back(1u << i);
		p.push_back(~(1u << i));
		p.push_back((1u << i) - 1);
	}
	Rng r(0x5eed);
	for (int i = 0; i < 400; i++)
		p.push_back(static_cast<u32>(r.next()));
	return p;
}

static u64 count_protected(const std::vector<u32> &m)
{
	u64 n = 0;
	for (auto x : m)
		n += x != ALL;
	return n;
}

VK_TEST(set_get_round_trip)
{
	require_module();
	SppVm t;
	auto p = patterns();
	const u64 base = 0x12345;
	EXPECT_OK(spp_set(t.fd(), base, p));
	TEST_ASSERT(get_maps(t.fd(), base, p.size()) == p);
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, count_protected(p));
	/* Sub-ranges, and ranges reaching past the set pages. */
	auto mid = get_maps(t.fd(), base + 100, 50);
	TEST_ASSERT(mid == std::vector<u32>(p.begin() + 100, p.begin() + 150));
	auto around = get_maps(t.fd(), base - 3, p.size() + 6);
	for (u64 i = 0; i < around.size(); i++)
		TEST_ASSERT_EQ(around[i], i < 3 || i >= p.size() + 3 ? ALL : p[i - 3]);
	/* Page by page, each pattern on its own. */
	for (u64 i = 0; i < p.size(); i += 13) {
		u32 m;
		EXPECT_OK(spp_get(t.fd(), base + i, 1, &m));
		TEST_ASSERT_EQ(m, p[i]);
	}
	/* Overwriting part of the range replaces exactly that part. */
	std::vector<u32> over(40, 0x11111111u);
	EXPECT_OK(spp_set(t.fd(), base + 20, over));
	std::copy(over.begin(), over.end(), p.begin() + 20);
	TEST_ASSERT(get_maps(t.fd(), base, p.size()) == p);
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, count_protected(p));
	/* All ones again removes every protection and every table page. */
	EXPECT_OK(spp_set(t.fd(), base, std::vector<u32>(p.size(), ALL)));
	auto st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 0u);
	TEST_ASSERT_EQ(st.table_pages, 0u);
	for (auto m : get_maps(t.fd(), base - 3, p.size() + 6))
		TEST_ASSERT_EQ(m, ALL);
}

VK_TEST(gfn_limits)
{
	require_module();
	SppVm t;
	u32 two[2] = {0, 0};
	const u64 last = LIMIT - 1;
	/* The last describable page works; anything past it does not. */
	u32 m = 0x00000001u;
	EXPECT_OK(spp_set(t.fd(), last, 1, &m));
	TEST_ASSERT_EQ(get_maps(t.fd(), last, 1)[0], m);
	EXPECT_OK(spp_set(t.fd(), 0, 1, &m));
	TEST_ASSERT_EQ(get_maps(t.fd(), 0, 1)[0], m);
	auto st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 2u);
	TEST_ASSERT_EQ(st.table_pages, 7u); /* one L4, two of every other level */

	const std::pair<u64, u64> bad[] = {
		{LIMIT, 1}, {last, 2}, {LIMIT + 5, 1}, {~0ull, 1}, {~0ull, 2},
		{1ull << 63, 1}, {LIMIT - 10, 11}, {0xfffffffffffffff0ull, 0x20},
	};
	for (auto [gfn, n] : bad) {
		long r = spp_set(t.fd(), gfn, n, two);
		TEST_ASSERT(r == -EINVAL, "SET gfn 0x%llx npages %llu: %s", (unsigned long long)gfn,
			    (unsigned long long)n, result_name(r).c_str());
		r = spp_get(t.fd(), gfn, n, two);
		TEST_ASSERT(r == -EINVAL, "GET gfn 0x%llx npages %llu: %s", (unsigned long long)gfn,
			    (unsigned long long)n, result_name(r).c_str());
	}
	/* npages == 0 is a no-op wherever it points, with any pointer. */
	for (u64 gfn : {u64(0), last, LIMIT, ~u64(0)}) {
		EXPECT_OK(spp_set(t.fd(), gfn, 0, nullptr));
		EXPECT_OK(spp_get(t.fd(), gfn, 0, nullptr));
		EXPECT_OK(spp_set(t.fd(), gfn, 0, reinterpret_cast<u32 *>(1)));
	}
	TEST_ASSERT_EQ(get_maps(t.fd(), last, 1)[0], m);
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, 2u);
	TEST_ASSERT_EQ(stats(t.fd()).table_pages, 7u);
}

VK_TEST(max_pages)
{
	require_module();
	SppVm t;
	const long max = max_pages(t.fd());
	TEST_ASSERT(max > 0);
	/* Over the limit: E2BIG before the pointer is looked at. */
	for (u64 n : {u64(max) + 1, u64(max) * 2, u64(1) << 40, ~u64(0)}) {
		EXPECT_ERRNO(spp_set(t.fd(), 0, n, nullptr), E2BIG);
		EXPECT_ERRNO(spp_get(t.fd(), 0, n, nullptr), E2BIG);
	}
	/* Exactly the limit works: read all, protect all, unprotect all. */
	std::vector<u32> maps(max, ALL);
	EXPECT_OK(spp_get(t.fd(), 0, max, maps.data()));
	for (auto m : maps)
		TEST_ASSERT_EQ(m, ALL);
	for (u64 i = 0; i < maps.size(); i++)
		maps[i] = static_cast<u32>(i) & ~1u;
	EXPECT_OK(spp_set(t.fd(), 0, maps));
	auto st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, u64(max));
	/* max pages from gfn 0: L1 tables of 512 pages, L2 of 512 * 512, one L3, one L4. */
	u64 l1 = (max + 511) / 512, l2 = (l1 + 511) / 512;
	TEST_ASSERT_EQ(st.table_pages, l1 + l2 + 2);
	std::vector<u32> back(max);
	EXPECT_OK(spp_get(t.fd(), 0, max, back.data()));
	TEST_ASSERT(back == maps);
	EXPECT_OK(spp_set(t.fd(), 0, std::vector<u32>(max, ALL)));
	st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 0u);
	TEST_ASSERT_EQ(st.table_pages, 0u);
}

VK_TEST(bad_pointers_change_nothing)
{
	require_module();
	SppVm t;
	std::vector<u32> init(64);
	for (u32 i = 0; i < init.size(); i++)
		init[i] = i % 5 ? 0x3c3c0000u | i : ALL;
	const u64 base = 0x777;
	EXPECT_OK(spp_set(t.fd(), base, init));
	const auto before = stats(t.fd());

	/* A buffer whose second page is PROT_NONE, and a read-only one. */
	auto pages = virtkit::Mapping::anonymous(3 * 4096, "maps");
	TEST_ASSERT(mprotect(pages.data() + 4096, 4096, PROT_NONE) == 0);
	auto *tail = reinterpret_cast<u32 *>(pages.data() + 4096) - 8; /* 8 maps readable */
	for (int i = 0; i < 8; i++)
		tail[i] = 0;
	auto ro = virtkit::Mapping::anonymous(4096, "ro maps");
	TEST_ASSERT(mprotect(ro.data(), 4096, PROT_READ) == 0);
	auto *ro_maps = reinterpret_cast<u32 *>(ro.data());

	const u32 *bad_src[] = {nullptr, reinterpret_cast<u32 *>(4),
				reinterpret_cast<u32 *>(pages.data() + 4096), tail,
				reinterpret_cast<u32 *>(0xffff888000000000ull),
				reinterpret_cast<u32 *>(0x7ffffffffffcull)};
	for (auto *src : bad_src) {
		long r = spp_set(t.fd(), base, 16, src);
		TEST_ASSERT(r == -EFAULT, "SET from %p: %s", (const void *)src, result_name(r).c_str());
	}
	/* GET into unwritable memory: the read-only mapping too. */
	u32 *bad_dst[] = {nullptr, reinterpret_cast<u32 *>(pages.data() + 4096), tail, ro_maps,
			  reinterpret_cast<u32 *>(0xffff888000000000ull)};
	for (auto *dst : bad_dst) {
		long r = spp_get(t.fd(), base, 16, dst);
		TEST_ASSERT(r == -EFAULT, "GET into %p: %s", (void *)dst, result_name(r).c_str());
	}
	/* Read-only memory is a fine source for SET. */
	EXPECT_OK(spp_set(t.fd(), base + 100, 4, ro_maps));
	EXPECT_OK(spp_set(t.fd(), base + 100, std::vector<u32>(4, ALL)));
	/* A bad struct pointer. */
	for (unsigned long p : {0ul, 1ul, 0xffff888000000000ul,
				reinterpret_cast<unsigned long>(pages.data() + 4096 - 32)}) {
		EXPECT_ERRNO(sys_ioctl(t.fd(), VIRTKIT_SPP_SET_ACCESS, p), EFAULT);
		EXPECT_ERRNO(sys_ioctl(t.fd(), VIRTKIT_SPP_GET_ACCESS, p), EFAULT);
		EXPECT_ERRNO(sys_ioctl(t.fd(), VIRTKIT_SPP_GET_STATS, p), EFAULT);
	}
	EXPECT_ERRNO(sys_ioctl(t.fd(), VIRTKIT_SPP_GET_STATS, ro.data()), EFAULT);

	TEST_ASSERT(get_maps(t.fd(), base, init.size()) == init);
	auto after = stats(t.fd());
	TEST_ASSERT_EQ(after.protected_pages, before.protected_pages);
	TEST_ASSERT_EQ(after.table_pages, before.table_pages);
}

VK_TEST(reserved_fields_change_nothing)
{
	require_module();
	SppVm t;
	std::vector<u32> maps(8, 0u);
	const u64 base = 0x4242;
	for (unsigned long cmd : {VIRTKIT_SPP_SET_ACCESS, VIRTKIT_SPP_GET_ACCESS}) {
		auto a = access_arg(base, maps.size(), maps.data());
		for (u32 f : {1u, 0x80000000u, ~0u}) {
			a.flags = f;
			EXPECT_ERRNO(sys_ioctl(t.fd(), cmd, &a), EINVAL);
		}
		a.flags = 0;
		a.pad = 1;
		EXPECT_ERRNO(sys_ioctl(t.fd(), cmd, &a), EINVAL);
		a.pad = 0;
		for (int i = 0; i < 4; i++) {
			a.reserved[i] = 1ull << (i * 16);
			EXPECT_ERRNO(sys_ioctl(t.fd(), cmd, &a), EINVAL);
			a.reserved[i] = 0;
		}
		/* With everything else wrong too, still EINVAL. */
		a.flags = 1;
		a.npages = ~0ull;
		a.maps = 0;
		EXPECT_ERRNO(sys_ioctl(t.fd(), cmd, &a), EINVAL);
	}
	for (auto m : get_maps(t.fd(), base, maps.size()))
		TEST_ASSERT_EQ(m, ALL);
	auto st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 0u);
	TEST_ASSERT_EQ(st.table_pages, 0u);
}

VK_TEST(stats_table_pages)
{
	require_module();
	SppVm t;
	u32 m = 0xfffffff0u;
	/* One page: one table per level. */
	EXPECT_OK(spp_set(t.fd(), 0x40000, 1, &m));
	auto st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 1u);
	TEST_ASSERT_EQ(st.table_pages, 4u);
	/* Another page of the same L1 table: nothing new. */
	EXPECT_OK(spp_set(t.fd(), 0x40000 + 511, 1, &m));
	TEST_ASSERT_EQ(stats(t.fd()).table_pages, 4u);
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, 2u);
	/* 512 consecutive pages of that table: still 4. */
	EXPECT_OK(spp_set(t.fd(), 0x40000, std::vector<u32>(512, 0u)));
	st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 512u);
	TEST_ASSERT_EQ(st.table_pages, 4u);
	/* The next 2 MiB: one more L1; the next 1 GiB: one more L2 and L1. */
	EXPECT_OK(spp_set(t.fd(), 0x40000 + 512, 1, &m));
	TEST_ASSERT_EQ(stats(t.fd()).table_pages, 5u);
	EXPECT_OK(spp_set(t.fd(), 0x40000 + (1u << 18), 1, &m));
	TEST_ASSERT_EQ(stats(t.fd()).table_pages, 7u);
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, 514u);
	/* Setting a page to what it is changes nothing. */
	EXPECT_OK(spp_set(t.fd(), 0x40000 + 512, 1, &m));
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, 514u);
	/* Unprotecting frees the tables left empty. */
	u32 all = ALL;
	EXPECT_OK(spp_set(t.fd(), 0x40000 + (1u << 18), 1, &all));
	TEST_ASSERT_EQ(stats(t.fd()).table_pages, 5u);
	EXPECT_OK(spp_set(t.fd(), 0x40000, std::vector<u32>(513, ALL)));
	st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 0u);
	TEST_ASSERT_EQ(st.table_pages, 0u);
	/* Unprotecting what was never protected allocates nothing. */
	EXPECT_OK(spp_set(t.fd(), 0x90000, std::vector<u32>(1000, ALL)));
	st = stats(t.fd());
	TEST_ASSERT_EQ(st.protected_pages, 0u);
	TEST_ASSERT_EQ(st.table_pages, 0u);
	TEST_ASSERT_EQ(st.fast_writes, 0u);
	TEST_ASSERT_EQ(st.user_exits, 0u);
}

/* Sets the module parameter and puts the old value back in any case. */
struct BudgetParam {
	static constexpr const char *path = "/sys/module/virtkit/parameters/spp_max_table_pages";
	std::string old;

	BudgetParam()
	{
		std::ifstream f(path);
		TEST_ASSERT(std::getline(f, old), "cannot read %s", path);
	}
	void set(unsigned long v) const
	{
		std::ofstream f(path);
		f << v << "\n";
		f.flush();
		TEST_ASSERT(f.good(), "cannot write %s", path);
	}
	~BudgetParam()
	{
		std::ofstream f(path);
		f << old << "\n";
	}
};

VK_TEST(table_budget_enospc)
{
	require_module();
	TEST_REQUIRE(access(BudgetParam::path, W_OK) == 0, "write access to " +
			     std::string(BudgetParam::path));
	BudgetParam param;
	SppVm t;
	u32 m = 0x0000ffffu;
	param.set(5);
	EXPECT_OK(spp_set(t.fd(), 0x40000, 1, &m));	    /* 4 pages */
	EXPECT_OK(spp_set(t.fd(), 0x40000 + 512, 1, &m)); /* + 1 L1: 5 */
	auto before = stats(t.fd());
	TEST_ASSERT_EQ(before.table_pages, 5u);
	/* A page in the next GiB needs an L2 and an L1. */
	EXPECT_ERRNO(spp_set(t.fd(), 0x40000 + (1u << 18), 1, &m), ENOSPC);
	/* All or nothing: a range whose first pages fit and whose last do not. */
	std::vector<u32> big(1024 + 1, 0u);
	EXPECT_ERRNO(spp_set(t.fd(), 0x40000, big), ENOSPC);
	auto maps = get_maps(t.fd(), 0x40000, 1025);
	for (u64 i = 0; i < maps.size(); i++)
		TEST_ASSERT_EQ(maps[i], i == 0 || i == 512 ? m : ALL);
	auto after = stats(t.fd());
	TEST_ASSERT_EQ(after.table_pages, before.table_pages);
	TEST_ASSERT_EQ(after.protected_pages, before.protected_pages);
	/* Changing and removing protection within the tables still works. */
	u32 m2 = 0x12345678u, all = ALL;
	EXPECT_OK(spp_set(t.fd(), 0x40000 + 1, 1, &m2));
	EXPECT_OK(spp_set(t.fd(), 0x40000, 1, &all));
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, 2u);
	/* The budget is per VM: another VM gets its own 5 pages. */
	SppVm other;
	EXPECT_OK(spp_set(other.fd(), 0x80000, 1, &m));
	EXPECT_ERRNO(spp_set(other.fd(), 0x80000 + (1u << 18), 1, &m), ENOSPC);
	/* Budget 0: no protection at all; unprotecting still works. */
	param.set(0);
	SppVm none;
	EXPECT_ERRNO(spp_set(none.fd(), 1, 1, &m), ENOSPC);
	EXPECT_OK(spp_set(none.fd(), 1, 1, &all));
	TEST_ASSERT_EQ(stats(none.fd()).table_pages, 0u);
	/* Raising it again lets the refused SET through. */
	param.set(1000);
	EXPECT_OK(spp_set(t.fd(), 0x40000, big));
	TEST_ASSERT_EQ(stats(t.fd()).protected_pages, 1025u);
	TEST_ASSERT_EQ(stats(t.fd()).table_pages, 6u);
}
