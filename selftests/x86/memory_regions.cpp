// SPDX-License-Identifier: MIT
/*
 * Guest memory regions on real KVM: adding, querying, moving and removing
 * regions, and what the guest and the host each see through them.
 *
 * Extra regions live at 1 GiB and above (GuestVm's RAM is at GPA 0) and are
 * mapped into the guest at EXTRA_GVA, a lower-half address the executable
 * does not use. Guest code is entered afresh for every access with
 * GuestVm::set_entry(); accesses that must leave guest RAM are run with
 * Vcpu::run() so the test sees the MMIO exit itself.
 */
#include "test.hpp"

#include <cstdlib>
#include <cstring>
#include <variant>
#include <vector>

#include <virtkit/x86/guest_vm.hpp>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t KiB = 1ull << 10;
static constexpr std::uint64_t MiB = 1ull << 20;
static constexpr std::uint64_t GiB = 1ull << 30;
static constexpr std::uint64_t EXTRA_GVA = 0x500000000000ull;
static constexpr std::uint64_t EXTRA_GVA2 = 0x510000000000ull;

/* Word i of the test pattern with this seed (host and guest code). */
static inline std::uint64_t pattern(std::uint64_t seed, std::uint64_t i)
{
	return seed ^ ((i + 1) * 0x9e3779b97f4a7c15ull);
}

/* ---- guest code ---- */

static void guest_nop(void) {}

static void guest_load(uint64_t gva)
{
	GUEST_SYNC(*(volatile uint64_t *)gva);
}

/* After the host changed the gva's PTE: drop the stale TLB entry first. */
static void guest_load_invlpg(uint64_t gva)
{
	guest_invlpg(gva);
	GUEST_SYNC(*(volatile uint64_t *)gva);
}

static void guest_store(uint64_t gva, uint64_t value)
{
	*(volatile uint64_t *)gva = value;
	GUEST_SYNC(value);
}

static void guest_check_pattern(uint64_t gva, uint64_t words, uint64_t seed)
{
	volatile uint64_t *p = (volatile uint64_t *)gva;

	for (uint64_t i = 0; i < words; i++)
		GUEST_ASSERT_EQ(p[i], pattern(seed, i));
	GUEST_SYNC(words);
}

static void guest_write_pattern(uint64_t gva, uint64_t words, uint64_t seed)
{
	volatile uint64_t *p = (volatile uint64_t *)gva;

	for (uint64_t i = 0; i < words; i++)
		p[i] = pattern(seed, i);
	GUEST_SYNC(words);
}

/* ---- host helpers ---- */

/* Run fn(args...) on v until its GUEST_SYNC; return the sync's first argument. */
template <class Fn, class... Args>
static std::uint64_t guest_call(GuestVm &g, Vcpu &v, Fn *fn, Args... args)
{
	g.set_entry(v, fn, args...);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "expected GUEST_SYNC, got %s",
		    uc.describe().c_str());
	TEST_ASSERT(!uc.args.empty());
	return uc.args[0];
}

/* Run v until an exit; it must be an MMIO access to gpa. */
static MmioExit expect_mmio(Vcpu &v, std::uint64_t gpa, bool write)
{
	Exit e = v.run();
	auto *m = std::get_if<MmioExit>(&e);
	TEST_ASSERT(m, "expected an MMIO %s at 0x%llx, got: %s", write ? "write" : "read",
		    (unsigned long long)gpa, describe(e).c_str());
	TEST_ASSERT_EQ(m->gpa, gpa);
	TEST_ASSERT_EQ(m->is_write(), write);
	return *m;
}

/*
 * Start fn(args...) on v and expect its load from gpa to exit as an MMIO
 * read (no RAM there); answer it with `value` and expect the guest to
 * GUEST_SYNC the value it read.
 */
template <class Fn, class... Args>
static void expect_unbacked_load(GuestVm &g, Vcpu &v, std::uint64_t gpa, Fn *fn, Args... args)
{
	const std::uint64_t value = 0x5eed0000dead0000ull ^ gpa;
	g.set_entry(v, fn, args...);
	MmioExit m = expect_mmio(v, gpa, false);
	TEST_ASSERT_EQ(m.data.size(), 8u);
	m.set(value);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT_EQ(uc.args[0], value);
}

static std::vector<std::uint64_t> pattern_words(std::uint64_t seed, std::uint64_t words)
{
	std::vector<std::uint64_t> v(words);
	for (std::uint64_t i = 0; i < words; i++)
		v[i] = pattern(seed, i);
	return v;
}

static void host_write_pattern(GuestMemory &mem, std::uint64_t gpa, std::uint64_t words,
			       std::uint64_t seed)
{
	auto v = pattern_words(seed, words);
	mem.write(gpa, std::as_bytes(std::span(v)));
}

static void host_check_pattern(const GuestMemory &mem, std::uint64_t gpa, std::uint64_t words,
			       std::uint64_t seed)
{
	std::vector<std::uint64_t> v(words);
	mem.read(gpa, std::as_writable_bytes(std::span(v)));
	for (std::uint64_t i = 0; i < words; i++)
		TEST_ASSERT(v[i] == pattern(seed, i), "word %llu at gpa 0x%llx: 0x%llx != 0x%llx",
			    (unsigned long long)i, (unsigned long long)(gpa + 8 * i),
			    (unsigned long long)v[i], (unsigned long long)pattern(seed, i));
}

/* ---- tests ---- */

VK_TEST(regions_add_and_query)
{
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	TEST_ASSERT_EQ(mem.slot_count(), 0u);
	TEST_ASSERT(mem.regions().empty());

	RegionId b = mem.add(GiB, 2 * MiB, {.name = "b"});
	RegionId a = mem.add(MiB, 64 * KiB, {.name = "a"});
	RegionId c = mem.add(MiB + 64 * KiB, 16 * KiB, {.name = "c"});
	TEST_ASSERT(a != b && b != c && a != c);
	TEST_ASSERT_EQ(mem.slot_count(), 3u);

	auto rs = mem.regions();
	TEST_ASSERT_EQ(rs.size(), 3u);
	/* Sorted by guest-physical address. */
	TEST_ASSERT_EQ(rs[0].id, a);
	TEST_ASSERT_EQ(rs[0].gpa, MiB);
	TEST_ASSERT_EQ(rs[0].size, 64 * KiB);
	TEST_ASSERT(rs[0].options.name == "a");
	TEST_ASSERT(!rs[0].options.readonly && !rs[0].options.dirty_log);
	TEST_ASSERT_EQ(rs[1].id, c);
	TEST_ASSERT_EQ(rs[1].gpa, MiB + 64 * KiB);
	TEST_ASSERT_EQ(rs[1].size, 16 * KiB);
	TEST_ASSERT_EQ(rs[2].id, b);
	TEST_ASSERT_EQ(rs[2].gpa, GiB);
	TEST_ASSERT_EQ(rs[2].size, 2 * MiB);
	TEST_ASSERT(rs[2].options.name == "b");
	for (auto &r : rs) {
		TEST_ASSERT(r.host != nullptr);
		TEST_ASSERT(vkt::same_region(mem.info(r.id), r));
		/* First, middle and last byte belong to the region. */
		TEST_ASSERT(vkt::same_region(mem.region_at(r.gpa), r));
		TEST_ASSERT(vkt::same_region(mem.region_at(r.gpa + r.size / 2 + 3), r));
		TEST_ASSERT(vkt::same_region(mem.region_at(r.gpa + r.size - 1), r));
		TEST_ASSERT(mem.host_ptr(r.gpa, r.size) == r.host);
		TEST_ASSERT(mem.host_ptr(r.gpa + 4096 + 5, 10) == r.host + 4096 + 5);
	}
	TEST_ASSERT(rs[0].host != rs[1].host && rs[1].host != rs[2].host);

	/* New regions are zeroed. */
	for (auto &r : rs)
		for (std::uint64_t off = 0; off < r.size; off += 4096 - 8)
			TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(r.gpa + off), 0u);

	TEST_ASSERT(mem.contains(MiB, 80 * KiB));		/* a + c, adjacent */
	TEST_ASSERT(!mem.contains(MiB, 80 * KiB + 1));	/* one byte past c */
	TEST_ASSERT(!mem.contains(MiB - 1, 2));		/* one byte before a */
	TEST_ASSERT(!mem.contains(MiB, GiB));		/* the gap between c and b */
	TEST_ASSERT(mem.contains(GiB + MiB, MiB));
	TEST_EXPECT_ERROR(mem.region_at(MiB + 80 * KiB), ENOENT);
	TEST_EXPECT_ERROR(mem.region_at(MiB - 1), ENOENT);
	TEST_EXPECT_ERROR(mem.region_at(GiB + 2 * MiB), ENOENT);
}

VK_TEST(host_writes_seen_by_guest)
{
	GuestVm g(vkt::kvm());
	const std::uint64_t gpa = GiB, size = 64 * KiB, words = size / 8;
	RegionId id = g.memory().add(gpa, size, {.name = "extra"});
	g.map(EXTRA_GVA, gpa, size);
	Vcpu &v = g.add_vcpu(guest_nop);

	/* Through GuestMemory::write... */
	host_write_pattern(g.memory(), gpa, words, 0x1111);
	TEST_ASSERT_EQ(guest_call(g, v, guest_check_pattern, EXTRA_GVA, words, 0x1111), words);

	/* ...and straight through the host mapping, at odd offsets too. */
	std::byte *host = g.memory().info(id).host;
	auto v2 = pattern_words(0x2222, words);
	std::memcpy(host, v2.data(), size);
	TEST_ASSERT_EQ(guest_call(g, v, guest_check_pattern, EXTRA_GVA, words, 0x2222), words);
	const std::uint64_t odd = 0x0102030405060708ull;
	std::memcpy(host + 4096 * 3 + 8 * 5, &odd, 8);
	TEST_ASSERT_EQ(guest_call(g, v, guest_load, EXTRA_GVA + 4096 * 3 + 8 * 5), odd);
	std::memcpy(g.memory().host_ptr(gpa + size - 8, 8), &odd, 8);
	TEST_ASSERT_EQ(guest_call(g, v, guest_load, EXTRA_GVA + size - 8), odd);
}

VK_TEST(guest_writes_reach_host_mapping)
{
	GuestVm g(vkt::kvm());
	const std::uint64_t gpa = GiB + 2 * MiB, size = 32 * KiB, words = size / 8;
	RegionId id = g.memory().add(gpa, size, {.name = "extra"});
	g.map(EXTRA_GVA, gpa, size);
	Vcpu &v = g.add_vcpu(guest_nop);
	std::byte *host = g.memory().info(id).host;

	TEST_ASSERT_EQ(guest_call(g, v, guest_write_pattern, EXTRA_GVA, words, 0x3333), words);
	host_check_pattern(g.memory(), gpa, words, 0x3333);
	for (std::uint64_t i = 0; i < words; i += 97) {
		std::uint64_t w;
		std::memcpy(&w, host + 8 * i, 8);
		TEST_ASSERT_EQ(w, pattern(0x3333, i));
	}

	/* One store, then the host changes the word and the guest reads it back. */
	const std::uint64_t gva = EXTRA_GVA + 5 * 4096 + 24;
	TEST_ASSERT_EQ(guest_call(g, v, guest_store, gva, 0xfeedfacecafebeefull),
		       0xfeedfacecafebeefull);
	TEST_ASSERT_EQ(g.memory().read_obj<std::uint64_t>(gpa + 5 * 4096 + 24),
		       0xfeedfacecafebeefull);
	std::uint64_t *hp = reinterpret_cast<std::uint64_t *>(g.memory().host_ptr(gpa + 5 * 4096 + 24, 8));
	TEST_ASSERT_EQ(*hp, 0xfeedfacecafebeefull);
	*hp = 0x0badc0de0badc0deull;
	TEST_ASSERT_EQ(guest_call(g, v, guest_load, gva), 0x0badc0de0badc0deull);
	/* The neighbours were not touched. */
	TEST_ASSERT_EQ(hp[-1], pattern(0x3333, (5 * 4096 + 16) / 8));
	TEST_ASSERT_EQ(hp[1], pattern(0x3333, (5 * 4096 + 32) / 8));
}

VK_TEST(move_keeps_contents)
{
	GuestVm g(vkt::kvm());
	const std::uint64_t old_gpa = GiB, new_gpa = 2 * GiB + 64 * KiB;
	const std::uint64_t size = 16 * KiB, words = size / 8;
	GuestMemory &mem = g.memory();
	RegionId id = mem.add(old_gpa, size, {.name = "moving"});
	g.map(EXTRA_GVA, old_gpa, size);
	g.map(EXTRA_GVA2, new_gpa, size);
	Vcpu &v = g.add_vcpu(guest_nop);

	host_write_pattern(mem, old_gpa, words, 0x4444);
	TEST_ASSERT_EQ(guest_call(g, v, guest_check_pattern, EXTRA_GVA, words, 0x4444), words);
	std::size_t slots = mem.slot_count();
	std::size_t nregions = mem.regions().size();

	mem.move(id, new_gpa);

	RegionInfo r = mem.info(id);
	TEST_ASSERT_EQ(r.gpa, new_gpa);
	TEST_ASSERT_EQ(r.size, size);
	TEST_ASSERT(r.options.name == "moving");
	TEST_ASSERT_EQ(mem.region_at(new_gpa + size - 1).id, id);
	TEST_EXPECT_ERROR(mem.region_at(old_gpa), ENOENT);
	TEST_ASSERT(!mem.contains(old_gpa, 1));
	TEST_EXPECT_ERROR(mem.read_obj<std::uint64_t>(old_gpa), EFAULT);
	TEST_ASSERT_EQ(mem.slot_count(), slots);
	TEST_ASSERT_EQ(mem.regions().size(), nregions);

	/* Same bytes at the new address, for the host and for the guest. */
	host_check_pattern(mem, new_gpa, words, 0x4444);
	TEST_ASSERT_EQ(guest_call(g, v, guest_check_pattern, EXTRA_GVA2, words, 0x4444), words);

	/* The old address is no longer RAM: the guest's load exits as MMIO. */
	expect_unbacked_load(g, v, old_gpa + 8 * 7, guest_load, EXTRA_GVA + 8 * 7);

	/* Guest writes at the new address land in the region. */
	TEST_ASSERT_EQ(guest_call(g, v, guest_store, EXTRA_GVA2 + 64, 0x77ull), 0x77u);
	TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(new_gpa + 64), 0x77u);
}

VK_TEST(move_and_remap_same_gva)
{
	GuestVm g(vkt::kvm());
	const std::uint64_t old_gpa = 3 * GiB, new_gpa = 3 * GiB + 8 * MiB;
	const std::uint64_t size = 8 * KiB, words = size / 8;
	GuestMemory &mem = g.memory();
	RegionId id = mem.add(old_gpa, size);
	host_write_pattern(mem, old_gpa, words, 0x5555);
	g.map(EXTRA_GVA, old_gpa, size);
	Vcpu &v = g.add_vcpu(guest_nop);
	TEST_ASSERT_EQ(guest_call(g, v, guest_check_pattern, EXTRA_GVA, words, 0x5555), words);

	mem.move(id, new_gpa);
	g.page_tables().unmap(EXTRA_GVA, size);
	TEST_ASSERT(!g.gva_to_gpa(EXTRA_GVA));
	g.map(EXTRA_GVA, new_gpa, size);
	TEST_ASSERT_EQ(*g.gva_to_gpa(EXTRA_GVA + 4096), new_gpa + 4096);

	TEST_ASSERT_EQ(guest_call(g, v, guest_load_invlpg, EXTRA_GVA + 4096 + 16),
		       pattern(0x5555, (4096 + 16) / 8));
	TEST_ASSERT_EQ(guest_call(g, v, guest_load_invlpg, EXTRA_GVA), pattern(0x5555, 0));
	TEST_ASSERT_EQ(guest_call(g, v, guest_check_pattern, EXTRA_GVA, words, 0x5555), words);

	/* Moving back by one page, overlapping its own old range, is fine too. */
	mem.move(id, new_gpa + 4096);
	TEST_ASSERT_EQ(mem.info(id).gpa, new_gpa + 4096);
	host_check_pattern(mem, new_gpa + 4096, words, 0x5555);
	TEST_EXPECT_ERROR(mem.region_at(new_gpa), ENOENT);
}

VK_TEST(remove_region)
{
	GuestVm g(vkt::kvm());
	const std::uint64_t gpa = GiB, size = 16 * KiB;
	GuestMemory &mem = g.memory();
	RegionId keep = mem.add(gpa + size, size, {.name = "keep"});
	RegionId id = mem.add(gpa, size, {.name = "doomed"});
	g.map(EXTRA_GVA, gpa, 2 * size);
	Vcpu &v = g.add_vcpu(guest_nop);
	TEST_ASSERT_EQ(guest_call(g, v, guest_store, EXTRA_GVA + 8, 0x1234ull), 0x1234u);
	TEST_ASSERT_EQ(guest_call(g, v, guest_store, EXTRA_GVA + size, 0x5678ull), 0x5678u);
	TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(gpa + 8), 0x1234u);

	std::size_t slots = mem.slot_count();
	std::size_t nregions = mem.regions().size();
	int maps = vkt::mapping_count();
	int fds = vkt::open_fd_count();

	mem.remove(id);

	TEST_ASSERT_EQ(mem.slot_count(), slots - 1);
	TEST_ASSERT_EQ(mem.regions().size(), nregions - 1);
	TEST_ASSERT_EQ(vkt::mapping_count(), maps - 1);	/* the region's mapping */
	TEST_ASSERT_EQ(vkt::open_fd_count(), fds - 1);	/* and its memfd */
	for (auto &r : mem.regions())
		TEST_ASSERT(r.id != id);
	TEST_EXPECT_ERROR(mem.info(id), ENOENT);
	TEST_EXPECT_ERROR(mem.region_at(gpa + 8), ENOENT);
	TEST_EXPECT_ERROR(mem.read_obj<std::uint64_t>(gpa + 8), EFAULT);
	TEST_EXPECT_ERROR(mem.host_ptr(gpa, 8), EFAULT);
	TEST_EXPECT_ERROR(mem.remove(id), ENOENT);

	/* The guest's load from the removed range exits as MMIO... */
	expect_unbacked_load(g, v, gpa + 8, guest_load, EXTRA_GVA + 8);
	/* ...so does a store, with the stored value... */
	g.set_entry(v, guest_store, EXTRA_GVA + 16, 0xabcdefull);
	MmioExit m = expect_mmio(v, gpa + 16, true);
	TEST_ASSERT_EQ(m.data.size(), 8u);
	TEST_ASSERT_EQ(m.value(), 0xabcdefu);
	TEST_ASSERT_EQ(g.run(v).args[0], 0xabcdefu);
	/* ...and the region next to it is untouched. */
	TEST_ASSERT_EQ(mem.info(keep).gpa, gpa + size);
	TEST_ASSERT_EQ(guest_call(g, v, guest_load, EXTRA_GVA + size), 0x5678u);

	/* The range can be used again. */
	RegionId again = mem.add(gpa, size);
	TEST_ASSERT(again != id);
	TEST_ASSERT_EQ(mem.slot_count(), slots);
	TEST_ASSERT_EQ(guest_call(g, v, guest_load, EXTRA_GVA + 8), 0u);
}

VK_TEST(overlapping_add_rejected)
{
	Vm vm = vkt::kvm().create_vm();
	GuestMemory &mem = vm.memory();
	const std::uint64_t gpa = GiB, size = 64 * KiB;
	RegionId id = mem.add(gpa, size, {.name = "base"});
	mem.write_obj<std::uint64_t>(gpa, 0x600dull);
	auto before = mem.regions();
	std::size_t slots = mem.slot_count();
	int fds = vkt::open_fd_count(), maps = vkt::mapping_count();

	struct {
		std::uint64_t gpa, size;
	} overlaps[] = {
		{gpa, size},			/* the same range */
		{gpa - 4096, 8192},		/* its first page */
		{gpa + size - 4096, 8192},	/* its last page */
		{gpa + 4096, 4096},		/* inside */
		{gpa - MiB, 2 * MiB},		/* around it */
		{gpa - 4096, size + 8192},	/* just around it */
		{gpa, 4096},			/* same start */
		{gpa + size - 4096, 4096},	/* same end */
	};
	for (auto &o : overlaps) {
		std::string msg = TEST_EXPECT_ERROR(mem.add(o.gpa, o.size, {.name = "overlap"}), EEXIST);
		TEST_ASSERT(msg.find("GuestMemory::add") != std::string::npos, "%s", msg.c_str());
		TEST_ASSERT(vkt::same_layout(mem.regions(), before));
		TEST_ASSERT_EQ(mem.slot_count(), slots);
	}
	TEST_ASSERT_EQ(vkt::open_fd_count(), fds);
	TEST_ASSERT_EQ(vkt::mapping_count(), maps);
	TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(gpa), 0x600du);
	TEST_ASSERT_EQ(mem.info(id).gpa, gpa);

	/* Adjacent on both sides is fine. */
	RegionId below = mem.add(gpa - 4096, 4096);
	RegionId above = mem.add(gpa + size, 8192);
	TEST_ASSERT_EQ(mem.slot_count(), slots + 2);
	TEST_ASSERT_EQ(mem.region_at(gpa - 1).id, below);
	TEST_ASSERT_EQ(mem.region_at(gpa).id, id);
	TEST_ASSERT_EQ(mem.region_at(gpa + size).id, above);
	TEST_ASSERT(mem.contains(gpa - 4096, size + 4096 + 8192));
}

static void guest_load_unaligned(uint64_t gva)
{
	uint64_t v;
	/* An 8-byte load that straddles the page (and region) boundary. */
	__asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(gva) : "memory");
	GUEST_SYNC(v);
}

VK_TEST(access_across_adjacent_regions)
{
	GuestVm g(vkt::kvm());
	GuestMemory &mem = g.memory();
	const std::uint64_t a_gpa = GiB, a_size = 8 * KiB;
	const std::uint64_t b_gpa = a_gpa + a_size, b_size = 4 * KiB;
	RegionId a = mem.add(a_gpa, a_size, {.name = "a"});
	RegionId b = mem.add(b_gpa, b_size, {.name = "b"});
	std::byte *ha = mem.info(a).host, *hb = mem.info(b).host;

	/* write: 100 bytes, 40 in a and 60 in b. */
	std::vector<std::byte> in(100);
	for (std::size_t i = 0; i < in.size(); i++)
		in[i] = std::byte(i + 1);
	mem.write(b_gpa - 40, in);
	TEST_ASSERT(std::memcmp(ha + a_size - 40, in.data(), 40) == 0);
	TEST_ASSERT(std::memcmp(hb, in.data() + 40, 60) == 0);

	/* read back across the boundary. */
	std::vector<std::byte> out(100);
	mem.read(b_gpa - 40, out);
	TEST_ASSERT(out == in);

	/* copy: from [b-40, b+60) to [b-20, b+80) - overlapping and across. */
	mem.copy(b_gpa - 20, b_gpa - 40, 100);
	mem.read(b_gpa - 20, out);
	TEST_ASSERT(out == in);
	TEST_ASSERT(std::memcmp(ha + a_size - 20, in.data(), 20) == 0);
	TEST_ASSERT(std::memcmp(hb, in.data() + 20, 80) == 0);
	/* ...and back down: [b-20, b+80) to [b-40, b+60), front to back. */
	mem.copy(b_gpa - 40, b_gpa - 20, 100);
	mem.read(b_gpa - 40, out);
	TEST_ASSERT(out == in);
	TEST_ASSERT(std::memcmp(ha + a_size - 40, in.data(), 40) == 0);
	TEST_ASSERT(std::memcmp(hb, in.data() + 40, 60) == 0);

	/* fill across. */
	mem.fill(b_gpa - 8, std::byte(0xa5), 16);
	for (int i = 0; i < 8; i++) {
		TEST_ASSERT_EQ(std::to_integer<int>(ha[a_size - 8 + i]), 0xa5);
		TEST_ASSERT_EQ(std::to_integer<int>(hb[i]), 0xa5);
	}
	/* ...and not a byte more: the copied data is still around it. */
	TEST_ASSERT_EQ(std::to_integer<int>(ha[a_size - 9]), 32); /* in[31] */
	TEST_ASSERT_EQ(std::to_integer<int>(hb[8]), 49);	      /* in[48] */

	/* host_ptr must lie inside one region. */
	TEST_ASSERT(mem.host_ptr(b_gpa - 8, 8) == ha + a_size - 8);
	TEST_EXPECT_ERROR(mem.host_ptr(b_gpa - 8, 16), EFAULT);

	/* The guest sees one contiguous range, including an access that straddles it. */
	g.map(EXTRA_GVA, a_gpa, a_size + b_size);
	Vcpu &v = g.add_vcpu(guest_nop);
	const std::uint64_t word = 0x8877665544332211ull;
	mem.write_obj(b_gpa - 3, word);
	TEST_ASSERT_EQ(guest_call(g, v, guest_load_unaligned, EXTRA_GVA + a_size - 3), word);
	TEST_ASSERT_EQ(guest_call(g, v, guest_store, EXTRA_GVA + a_size + 16, 0x99ull), 0x99u);
	TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(b_gpa + 16), 0x99u);
}

VK_TEST(move_onto_overlap_rejected)
{
	GuestVm g(vkt::kvm());
	GuestMemory &mem = g.memory();
	const std::uint64_t size = 16 * KiB;
	RegionId a = mem.add(GiB, size, {.name = "a"});
	RegionId b = mem.add(GiB + MiB, size, {.name = "b"});
	host_write_pattern(mem, GiB, size / 8, 0x6666);
	g.map(EXTRA_GVA, GiB, size);
	Vcpu &v = g.add_vcpu(guest_nop);

	auto before = mem.regions();
	std::size_t slots = mem.slot_count();
	const std::uint64_t targets[] = {
		GiB + MiB, GiB + MiB - 4096, GiB + MiB + size - 4096, GiB + MiB - size + 4096,
		0 /* GuestVm's RAM */, 4 * MiB,
	};
	for (std::uint64_t t : targets) {
		std::string msg = TEST_EXPECT_ERROR(mem.move(a, t), EEXIST);
		TEST_ASSERT(msg.find("GuestMemory::move") != std::string::npos, "%s", msg.c_str());
		TEST_ASSERT(vkt::same_layout(mem.regions(), before));
		TEST_ASSERT_EQ(mem.slot_count(), slots);
	}
	TEST_ASSERT_EQ(mem.info(a).gpa, GiB);
	TEST_ASSERT_EQ(mem.info(b).gpa, GiB + MiB);
	host_check_pattern(mem, GiB, size / 8, 0x6666);
	/* Still where it was for the guest, too. */
	TEST_ASSERT_EQ(guest_call(g, v, guest_check_pattern, EXTRA_GVA, size / 8, 0x6666), size / 8);

	/* Right next to b is fine. */
	mem.move(a, GiB + MiB + size);
	TEST_ASSERT_EQ(mem.info(a).gpa, GiB + MiB + size);
	host_check_pattern(mem, GiB + MiB + size, size / 8, 0x6666);
}

static void guest_readonly(uint64_t gva, uint64_t words, uint64_t seed)
{
	volatile uint64_t *p = (volatile uint64_t *)gva;

	for (uint64_t i = 0; i < words; i++)
		GUEST_ASSERT_EQ(p[i], pattern(seed, i));
	/* Exits as an MMIO write; the host does not complete it. */
	p[3] = 0xdeadbeefcafef00dull;
	/* Reads still see the host's data. */
	GUEST_SYNC(p[3]);
}

VK_TEST(readonly_region)
{
	TEST_REQUIRE(vkt::kvm().has(KVM_CAP_READONLY_MEM), "KVM_CAP_READONLY_MEM");
	GuestVm g(vkt::kvm());
	GuestMemory &mem = g.memory();
	const std::uint64_t gpa = 2 * GiB, size = 8 * KiB, words = size / 8;
	RegionId id = mem.add(gpa, size, {.readonly = true, .name = "rom"});
	TEST_ASSERT(mem.info(id).options.readonly);
	/* The host's own mapping is writable. */
	host_write_pattern(mem, gpa, words, 0x7777);
	g.map(EXTRA_GVA, gpa, size);
	Vcpu &v = g.add_vcpu(guest_nop);

	g.set_entry(v, guest_readonly, EXTRA_GVA, words, 0x7777);
	MmioExit m = expect_mmio(v, gpa + 3 * 8, true);
	TEST_ASSERT_EQ(m.data.size(), 8u);
	TEST_ASSERT_EQ(m.value(), 0xdeadbeefcafef00dull);
	/* Not written: the guest's next read and the host see the old data. */
	host_check_pattern(mem, gpa, words, 0x7777);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT_EQ(uc.args[0], pattern(0x7777, 3));

	/* A plain store elsewhere in the region, same story. */
	g.set_entry(v, guest_store, EXTRA_GVA + size - 8, 0x42ull);
	m = expect_mmio(v, gpa + size - 8, true);
	TEST_ASSERT_EQ(m.value(), 0x42u);
	TEST_ASSERT_EQ(g.run(v).args[0], 0x42u);
	TEST_ASSERT_EQ(mem.read_obj<std::uint64_t>(gpa + size - 8), pattern(0x7777, words - 1));
	TEST_ASSERT_EQ(guest_call(g, v, guest_load, EXTRA_GVA + size - 8), pattern(0x7777, words - 1));

	/* Host updates are visible to guest reads. */
	mem.write_obj<std::uint64_t>(gpa + 16, 0x1020304050607080ull);
	TEST_ASSERT_EQ(guest_call(g, v, guest_load, EXTRA_GVA + 16), 0x1020304050607080ull);
}
