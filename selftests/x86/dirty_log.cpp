// SPDX-License-Identifier: MIT
/*
 * Dirty logging on real KVM: the per-region bitmap (harvested and cleared
 * per call, switched on and off) and the per-vCPU dirty ring.
 */
#include "test.hpp"

#include <virtkit/x86/guest_vm.hpp>

#include <algorithm>
#include <set>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t log_gpa = 0x40000000; /* 1 GiB */
static constexpr std::uint64_t log_pages = 64;

/* Write one byte into each listed page of the logged region, then sync. */
static void guest_touch(std::uint64_t base, std::uint64_t mask)
{
	for (;;) {
		for (std::uint64_t p = 0; p < 64; p++)
			if (mask >> p & 1)
				*(volatile std::uint8_t *)(base + p * 4096 + 7) = (std::uint8_t)p;
		/* The host answers with the next mask (0: done). */
		GUEST_SYNC(mask);
		mask = guest_percpu()->ucall.args[0];
		if (!mask)
			return;
	}
}

/* Let the guest continue with the next mask as its new argument. */
static void next_mask(GuestVm &g, Vcpu &v, std::uint64_t mask)
{
	std::uint64_t gpa = g.percpu_gpa(v.id()) + offsetof(virtkit_percpu, ucall) +
			    offsetof(virtkit_ucall, args);
	g.memory().write_obj(gpa, mask);
}

static std::set<std::uint64_t> dirty_pages(const DirtyBitmap &bm)
{
	std::set<std::uint64_t> s;
	for (std::uint64_t p = 0; p < bm.pages; p++)
		if (bm.test(p))
			s.insert(p);
	return s;
}

static std::set<std::uint64_t> mask_pages(std::uint64_t mask)
{
	std::set<std::uint64_t> s;
	for (std::uint64_t p = 0; p < 64; p++)
		if (mask >> p & 1)
			s.insert(p);
	return s;
}

VK_TEST(dirty_bitmap_exact_and_cleared)
{
	GuestVm g(vkt::kvm());
	RegionId r = g.memory().add(log_gpa, log_pages * 4096, {.dirty_log = true, .name = "log"});
	g.identity_map(log_gpa, log_pages * 4096);
	const std::uint64_t m1 = 1ull << 1 | 1ull << 3 | 1ull << 7 | 1ull << 63;
	const std::uint64_t m2 = 1ull << 2;
	Vcpu &v = g.add_vcpu(guest_touch, log_gpa, m1);

	TEST_ASSERT_EQ(g.run(v).args[0], m1);
	DirtyBitmap bm = g.memory().dirty_log(r);
	TEST_ASSERT_EQ(bm.gpa, log_gpa);
	TEST_ASSERT_EQ(bm.pages, log_pages);
	TEST_ASSERT(dirty_pages(bm) == mask_pages(m1), "%llu pages dirty",
		    (unsigned long long)bm.count());
	/* Harvesting cleared the log. */
	TEST_ASSERT_EQ(g.memory().dirty_log(r).count(), 0);

	next_mask(g, v, m2);
	TEST_ASSERT_EQ(g.run(v).args[0], m2);
	TEST_ASSERT(dirty_pages(g.memory().dirty_log(r)) == mask_pages(m2));

	/* The VMM's own writes are not guest writes. */
	g.memory().write_obj<std::uint64_t>(log_gpa + 5 * 4096, 1);
	TEST_ASSERT_EQ(g.memory().dirty_log(r).count(), 0);

	next_mask(g, v, 0);
	g.run_to_done(v);
}

VK_TEST(dirty_log_switched_on_and_off)
{
	GuestVm g(vkt::kvm());
	RegionId r = g.memory().add(log_gpa, log_pages * 4096, {.name = "log"});
	g.identity_map(log_gpa, log_pages * 4096);
	TEST_EXPECT_ERROR(g.memory().dirty_log(r), EINVAL);
	Vcpu &v = g.add_vcpu(guest_touch, log_gpa, 1ull << 4);
	TEST_ASSERT_EQ(g.run(v).args[0], 1ull << 4);

	/* Writes before logging was on are not reported. */
	g.memory().set_dirty_log(r, true);
	TEST_ASSERT_EQ(g.memory().dirty_log(r).count(), 0);
	next_mask(g, v, 1ull << 9);
	g.run(v);
	TEST_ASSERT(dirty_pages(g.memory().dirty_log(r)) == mask_pages(1ull << 9));

	g.memory().set_dirty_log(r, false);
	TEST_ASSERT(!g.memory().info(r).options.dirty_log);
	TEST_EXPECT_ERROR(g.memory().dirty_log(r), EINVAL);
	/* The guest keeps writing normally with logging off. */
	next_mask(g, v, 1ull << 10);
	g.run(v);
	TEST_ASSERT_EQ(g.memory().read_obj<std::uint8_t>(log_gpa + 10 * 4096 + 7), 10);
	next_mask(g, v, 0);
	g.run_to_done(v);
}

VK_TEST(dirty_log_survives_region_move)
{
	GuestVm g(vkt::kvm());
	RegionId r = g.memory().add(log_gpa, log_pages * 4096, {.dirty_log = true, .name = "log"});
	g.identity_map(log_gpa, log_pages * 4096);
	Vcpu &v = g.add_vcpu(guest_touch, log_gpa, 1ull << 6);
	g.run(v);
	/* Pages dirtied before a move are still reported after it. */
	const std::uint64_t new_gpa = 2 * log_gpa;
	g.memory().move(r, new_gpa);
	DirtyBitmap bm = g.memory().dirty_log(r);
	TEST_ASSERT_EQ(bm.gpa, new_gpa);
	TEST_ASSERT(dirty_pages(bm) == mask_pages(1ull << 6));
	TEST_ASSERT_EQ(g.memory().read_obj<std::uint8_t>(new_gpa + 6 * 4096 + 7), 6);
}

VK_TEST(dirty_ring_reports_written_pages)
{
	TEST_REQUIRE(vkt::kvm().has(KVM_CAP_DIRTY_LOG_RING), "KVM_CAP_DIRTY_LOG_RING");
	GuestOptions o;
	o.vm.dirty_ring_bytes = 4096 * 16;
	GuestVm g(vkt::kvm(), o);
	TEST_ASSERT_EQ(g.vm().dirty_ring_bytes(), 4096 * 16);
	g.memory().add(log_gpa, log_pages * 4096, {.dirty_log = true, .name = "log"});
	g.identity_map(log_gpa, log_pages * 4096);
	const std::uint64_t m1 = 1ull << 0 | 1ull << 5 | 1ull << 40;
	Vcpu &v = g.add_vcpu(guest_touch, log_gpa, m1);

	TEST_ASSERT_EQ(g.run(v).args[0], m1);
	std::set<std::uint64_t> got;
	for (auto gpa : v.harvest_dirty_ring())
		got.insert((gpa - log_gpa) / 4096);
	TEST_ASSERT(got == mask_pages(m1), "%zu pages in the ring", got.size());
	g.vm().reset_dirty_rings();
	/* Harvested entries are not reported again. */
	TEST_ASSERT(v.harvest_dirty_ring().empty());

	/* The bitmap interface is refused on a ring VM. */
	TEST_EXPECT_ERROR(g.memory().dirty_log(g.memory().region_at(log_gpa).id), EINVAL);

	/* After a reset, written pages are logged again. */
	next_mask(g, v, m1);
	g.run(v);
	got.clear();
	for (auto gpa : v.harvest_dirty_ring())
		got.insert((gpa - log_gpa) / 4096);
	TEST_ASSERT(got == mask_pages(m1), "%zu pages in the ring after reset", got.size());
	g.vm().reset_dirty_rings();
	next_mask(g, v, 0);
	g.run_to_done(v);
}
