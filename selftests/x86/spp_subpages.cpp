// SPDX-License-Identifier: MIT
/*
 * Sub-page protection at byte precision: every one of the 32 sub-pages of a
 * page is protected alone in turn, and guest stores of 1, 2, 4, 8 and 16
 * bytes at its first and last bytes are blocked and reported with the exact
 * GPA, while the same stores into the neighbouring sub-pages complete.
 * Stores that straddle two sub-pages, or two pages, are blocked whole when
 * either part is protected: none of their bytes land.
 *
 * The guest runs a loop over a table of (store routine, address, data) that
 * the host fills; each batch ends with one GUEST_SYNC. After every batch the
 * host compares the whole region with the image it expects and the reported
 * violations with the ones it expects, in order.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <cstring>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t spp_gpa = 0x40000000; /* 1 GiB */
static constexpr std::uint64_t spp_pages = 4;
static constexpr std::uint64_t spp_gfn = spp_gpa / 4096;
static constexpr std::uint64_t region_bytes = spp_pages * 4096;
/* The page whose sub-pages are protected one by one. */
static constexpr std::uint64_t page_p = 1;

/*
 * Store routines: store(addr = %rdi, data = %rsi). Each does exactly one
 * store instruction; the label after it is where the guest continues (the
 * RIP a violation reports).
 */
extern "C" {
void spp_store1(std::uint64_t, std::uint64_t);
void spp_store2(std::uint64_t, std::uint64_t);
void spp_store4(std::uint64_t, std::uint64_t);
void spp_store8(std::uint64_t, std::uint64_t);
void spp_store16(std::uint64_t, std::uint64_t);
extern const char spp_store1_end[], spp_store2_end[], spp_store4_end[];
extern const char spp_store8_end[], spp_store16_end[];
}

asm(".pushsection .text\n"
    ".globl spp_store1, spp_store1_end\n"
    "spp_store1:\n"
    "	movb (%rsi), %al\n"
    "	movb %al, (%rdi)\n"
    "spp_store1_end:\n"
    "	ret\n"
    ".globl spp_store2, spp_store2_end\n"
    "spp_store2:\n"
    "	movw (%rsi), %ax\n"
    "	movw %ax, (%rdi)\n"
    "spp_store2_end:\n"
    "	ret\n"
    ".globl spp_store4, spp_store4_end\n"
    "spp_store4:\n"
    "	movl (%rsi), %eax\n"
    "	movl %eax, (%rdi)\n"
    "spp_store4_end:\n"
    "	ret\n"
    ".globl spp_store8, spp_store8_end\n"
    "spp_store8:\n"
    "	movq (%rsi), %rax\n"
    "	movq %rax, (%rdi)\n"
    "spp_store8_end:\n"
    "	ret\n"
    /* SSE: a single 16-byte store, aligned or not. */
    ".globl spp_store16, spp_store16_end\n"
    "spp_store16:\n"
    "	movups (%rsi), %xmm0\n"
    "	movups %xmm0, (%rdi)\n"
    "spp_store16_end:\n"
    "	ret\n"
    ".popsection\n");

struct StoreCase {
	std::uint64_t fn;	/* one of spp_storeN */
	std::uint64_t addr;
	std::uint8_t data[16];
};

static constexpr std::uint64_t max_cases = 120;

struct Batch {
	std::uint64_t n;
	StoreCase cases[max_cases];
};

/* Run every store of the batch, sync, and wait for the next batch (n == 0: done). */
static void guest_store_loop(std::uint64_t batch_gva)
{
	auto *b = (volatile Batch *)batch_gva;

	for (;;) {
		std::uint64_t n = b->n;
		if (!n)
			return;
		for (std::uint64_t k = 0; k < n; k++) {
			auto fn = (void (*)(std::uint64_t, std::uint64_t))b->cases[k].fn;
			fn(b->cases[k].addr, (std::uint64_t)&b->cases[k].data[0]);
		}
		GUEST_SYNC(n);
	}
}

static std::uint64_t store_fn(std::uint32_t size)
{
	switch (size) {
	case 1: return (std::uint64_t)spp_store1;
	case 2: return (std::uint64_t)spp_store2;
	case 4: return (std::uint64_t)spp_store4;
	case 8: return (std::uint64_t)spp_store8;
	case 16: return (std::uint64_t)spp_store16;
	}
	vkt::fail(__FILE__, __LINE__, "bad store size " + std::to_string(size));
}

static std::uint64_t store_end(std::uint32_t size)
{
	switch (size) {
	case 1: return (std::uint64_t)spp_store1_end;
	case 2: return (std::uint64_t)spp_store2_end;
	case 4: return (std::uint64_t)spp_store4_end;
	case 8: return (std::uint64_t)spp_store8_end;
	case 16: return (std::uint64_t)spp_store16_end;
	}
	vkt::fail(__FILE__, __LINE__, "bad store size " + std::to_string(size));
}

/* What the region holds before any guest store: bytes 0x00..0x3f. */
static std::uint8_t background(std::uint64_t off)
{
	return static_cast<std::uint8_t>((off * 7 + off / 4096) & 0x3f);
}

/* One guest store and what must become of it. */
struct Store {
	std::uint64_t addr;
	std::uint32_t size;
};

struct SubpageGuest {
	GuestVm g{vkt::kvm()};
	RegionId region = g.memory().add(spp_gpa, region_bytes, {.name = "spp"});
	SubpageProtection &spp = SubpageProtection::enable(g.vm());
	std::uint64_t batch_gva = g.alloc_vaddr(sizeof(Batch));
	Vcpu *vcpu = nullptr;
	std::vector<SppViolation> seen;
	/* The access maps this test set, page by page of the region. */
	std::uint32_t maps[spp_pages];
	/* What the region must hold. */
	std::vector<std::uint8_t> image = std::vector<std::uint8_t>(region_bytes);

	SubpageGuest()
	{
		g.identity_map(spp_gpa, region_bytes);
		for (std::uint64_t off = 0; off < region_bytes; off++)
			image[off] = background(off);
		g.memory().write(spp_gpa, std::as_bytes(std::span(image)));
		for (auto &m : maps)
			m = SubpageProtection::all_writable;
		spp.on_violation([this](Vcpu &, const SppViolation &v) {
			seen.push_back(v);
			return SppDecision::drop;
		});
		vcpu = &g.add_vcpu(guest_store_loop, batch_gva);
	}

	void protect(std::uint64_t page, std::uint32_t map)
	{
		spp.set_access(spp_gfn + page, {map});
		maps[page] = map;
	}

	bool byte_protected(std::uint64_t gpa) const
	{
		std::uint64_t off = gpa - spp_gpa;
		return !(maps[off / 4096] >> (off % 4096 / 128) & 1);
	}

	/*
	 * Run the stores in order as one batch and check: the blocked ones
	 * (touching any protected byte) changed nothing and were each reported
	 * once, in order, with the first protected byte; all others landed.
	 */
	void run(const std::vector<Store> &stores, const char *what)
	{
		TEST_ASSERT(!stores.empty() && stores.size() <= max_cases);
		static Batch batch;
		std::memset(&batch, 0, sizeof(batch));
		batch.n = stores.size();

		struct Expect {
			bool blocked;
			std::uint64_t first_protected;
		};
		std::vector<Expect> expect;
		std::vector<std::uint8_t> want = image;
		for (std::size_t k = 0; k < stores.size(); k++) {
			const Store &s = stores[k];
			TEST_ASSERT(s.addr >= spp_gpa && s.addr + s.size <= spp_gpa + region_bytes);
			Expect e{false, 0};
			for (std::uint64_t a = s.addr; a < s.addr + s.size; a++) {
				if (byte_protected(a)) {
					e = {true, a};
					break;
				}
			}
			/*
			 * An allowed store over the bytes of an earlier blocked
			 * one would hide them if they (wrongly) landed.
			 */
			for (std::size_t b = 0; b < k && !e.blocked; b++)
				TEST_ASSERT(!expect[b].blocked || stores[b].addr >= s.addr + s.size ||
						    s.addr >= stores[b].addr + stores[b].size,
					    "%s: test bug: store %zu overwrites blocked store %zu",
					    what, k, b);
			StoreCase &c = batch.cases[k];
			c.fn = store_fn(s.size);
			c.addr = s.addr;
			/* Blocked data is 0x80..0xff, allowed 0x40..0x7f: never background. */
			for (std::uint32_t j = 0; j < s.size; j++)
				c.data[j] = static_cast<std::uint8_t>((e.blocked ? 0x80 : 0x40) |
								      ((k * 5 + j * 3) & 0x3f));
			if (!e.blocked)
				std::memcpy(&want[s.addr - spp_gpa], c.data, s.size);
			expect.push_back(e);
		}
		g.write_gva(batch_gva, &batch, sizeof(batch));

		seen.clear();
		SppStats before = spp.stats();
		Ucall uc = g.run(*vcpu);
		TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.size() == 1 &&
				    uc.args[0] == stores.size(),
			    "%s: guest did not finish its batch", what);

		/* Violations, one per blocked store, in order. */
		std::size_t vi = 0, blocked = 0;
		for (std::size_t k = 0; k < stores.size(); k++) {
			const Store &s = stores[k];
			if (!expect[k].blocked)
				continue;
			blocked++;
			TEST_ASSERT(vi < seen.size(),
				    "%s: %u-byte store at 0x%llx not reported (%zu violations)",
				    what, s.size, (unsigned long long)s.addr, seen.size());
			const SppViolation &v = seen[vi++];
			TEST_ASSERT(v.write_gpa == s.addr && v.size == s.size &&
					    v.gpa == expect[k].first_protected,
				    "%s: %u-byte store at 0x%llx: reported gpa=0x%llx "
				    "write_gpa=0x%llx size=%u, want gpa=0x%llx",
				    what, s.size, (unsigned long long)s.addr,
				    (unsigned long long)v.gpa, (unsigned long long)v.write_gpa,
				    v.size, (unsigned long long)expect[k].first_protected);
			TEST_ASSERT(std::memcmp(v.data().data(), batch.cases[k].data, s.size) == 0,
				    "%s: %u-byte store at 0x%llx: wrong data reported", what,
				    s.size, (unsigned long long)s.addr);
			TEST_ASSERT_EQ(v.rip, store_end(s.size));
			TEST_ASSERT_EQ(v.vcpu, 0u);
		}
		TEST_ASSERT(vi == seen.size(), "%s: %zu violations, %zu blocked stores", what,
			    seen.size(), blocked);
		SppStats after = spp.stats();
		TEST_ASSERT_EQ(after.violations - before.violations, blocked);

		/* The whole region, byte by byte. */
		std::vector<std::uint8_t> got(region_bytes);
		g.memory().read(spp_gpa, std::as_writable_bytes(std::span(got)));
		for (std::uint64_t off = 0; off < region_bytes; off++) {
			if (got[off] == want[off])
				continue;
			std::string who = "?";
			for (std::size_t k = 0; k < stores.size(); k++)
				if (spp_gpa + off >= stores[k].addr &&
				    spp_gpa + off < stores[k].addr + stores[k].size)
					who = vkt::format("the %u-byte store at 0x%llx (%s)",
							  stores[k].size,
							  (unsigned long long)stores[k].addr,
							  expect[k].blocked ? "blocked" : "allowed");
			vkt::fail(__FILE__, __LINE__,
				  vkt::format("%s: byte at gpa 0x%llx is 0x%02x, want 0x%02x; "
					      "last store covering it: %s",
					      what, (unsigned long long)(spp_gpa + off), got[off],
					      want[off], who.c_str()));
		}
		image = want;
	}

	/* Let the guest loop return. */
	void finish()
	{
		static Batch batch;
		batch.n = 0;
		g.write_gva(batch_gva, &batch, sizeof(batch.n));
		g.run_to_done(*vcpu);
	}
};

static const std::uint32_t sizes[] = {1, 2, 4, 8, 16};

/* The first byte of sub-page s of the region (s counts from page 0). */
static std::uint64_t subpage(std::uint64_t s)
{
	return spp_gpa + s * 128;
}

VK_TEST(spp_each_subpage_blocks_exactly_its_bytes)
{
	SubpageGuest t;
	for (std::uint32_t i = 0; i < 32; i++) {
		t.protect(page_p, ~(1u << i));
		const std::uint64_t s = page_p * 32 + i;
		std::vector<Store> stores;
		/* Neighbours first: the bytes right next to sub-page i. */
		for (std::uint32_t size : sizes) {
			stores.push_back({subpage(s) - size, size});	/* end of i - 1 */
			stores.push_back({subpage(s + 1), size});	/* start of i + 1 */
			stores.push_back({subpage(s - 1), size});	/* start of i - 1 */
			stores.push_back({subpage(s + 2) - size, size}); /* end of i + 1 */
		}
		/* Then the protected sub-page's first and last bytes. */
		for (std::uint32_t size : sizes) {
			stores.push_back({subpage(s), size});
			stores.push_back({subpage(s + 1) - size, size});
		}
		/* Unaligned stores inside it. */
		stores.push_back({subpage(s) + 61, 8});
		stores.push_back({subpage(s) + 99, 16});
		stores.push_back({subpage(s) + 127 - 2, 2});
		t.run(stores, vkt::format("sub-page %u", i).c_str());
		TEST_ASSERT(t.spp.get_access(spp_gfn + page_p, 1) ==
			    std::vector<std::uint32_t>{~(1u << i)});
	}
	t.finish();
}

VK_TEST(spp_subpage_straddles_are_blocked_whole)
{
	SubpageGuest t;
	for (std::uint32_t i = 0; i < 32; i++) {
		t.protect(page_p, ~(1u << i));
		const std::uint64_t s = page_p * 32 + i;
		const std::uint64_t lo = subpage(s), hi = subpage(s + 1);
		std::vector<Store> stores = {
			/* Stores that touch i - 1 and i + 1 only, to the byte. */
			{lo - 8, 8},
			{lo - 16, 16},
			{hi, 8},
			{hi, 16},
			/* From i - 1 into i: half and half, and one byte in i. */
			{lo - 4, 8},
			{lo - 8, 16},
			{lo - 7, 8},
			{lo - 15, 16},
			/* From i into i + 1: half and half, and one byte in i. */
			{hi - 4, 8},
			{hi - 8, 16},
			{hi - 1, 8},
			{hi - 1, 16},
		};
		t.run(stores, vkt::format("straddles around sub-page %u", i).c_str());
	}
	t.finish();
}

/*
 * Sub-page 0 of page P + 1 protected: a store that starts in the last bytes
 * of page P (not protected itself) and runs into P + 1 is blocked whole - its
 * bytes in page P do not land either.
 */
VK_TEST(spp_page_straddle_into_protected_first_subpage)
{
	SubpageGuest t;
	const std::uint64_t p1 = spp_gpa + (page_p + 1) * 4096;
	t.protect(page_p + 1, ~1u);
	t.run({
		      /* Inside page P and P + 1's second sub-page: allowed. */
		      {p1 - 8, 8},
		      {p1 - 16, 16},
		      {p1 + 128, 16},
		      /* Blocked. */
		      {p1 - 4, 8},	/* 4 bytes in P, 4 in P + 1 */
		      {p1 - 8, 16},	/* 8 and 8 */
		      {p1 - 1, 2},	/* 1 and 1 */
		      {p1 - 3, 4},	/* 3 and 1 */
		      {p1 - 15, 16},	/* 15 and 1 */
	      },
	      "into sub-page 0 of P + 1");
	/* Sub-page 1 protected instead: the straddles all land. */
	t.protect(page_p + 1, ~2u);
	t.run({{p1 - 4, 8}, {p1 - 8, 16}, {p1 - 1, 2}, {p1 + 120, 16}},
	      "into a writable sub-page 0");
	t.finish();
}

/*
 * Sub-page 31 of page P protected: a store from its end into page P + 1 (not
 * protected) is blocked whole - its bytes in page P + 1 do not land either.
 */
VK_TEST(spp_page_straddle_from_protected_last_subpage)
{
	SubpageGuest t;
	const std::uint64_t p1 = spp_gpa + (page_p + 1) * 4096;
	t.protect(page_p, ~(1u << 31));
	t.run({
		      /* Inside page P + 1, and P's sub-page 30: allowed. */
		      {p1, 16},
		      {p1 + 8, 8},
		      {p1 - 128 - 16, 16},
		      /* Blocked. */
		      {p1 - 4, 8},	/* 4 bytes in P, 4 in P + 1 */
		      {p1 - 8, 16},	/* 8 and 8 */
		      {p1 - 1, 2},	/* 1 and 1 */
		      {p1 - 1, 8},	/* 1 byte in P, 7 in P + 1 */
		      {p1 - 1, 16},	/* 1 and 15 */
	      },
	      "from sub-page 31 of P");
	/* With both sides protected, the first protected byte is in P. */
	t.protect(page_p + 1, ~1u);
	t.run({{p1 - 4, 8}, {p1 - 8, 16}}, "both sides protected");
	/* Only P + 1's side: the first protected byte is in P + 1. */
	t.protect(page_p, SubpageProtection::all_writable);
	t.run({{p1 - 4, 8}, {p1 - 8, 16}}, "only P + 1 protected");
	t.finish();
}
