// SPDX-License-Identifier: MIT
/*
 * Stores that straddle a protected page's edge into the VMM's MMIO: the
 * write is decided whole. Allowed, its RAM part lands and its MMIO part
 * reaches the VMM as without protection; blocked, neither happens and the
 * violation is reported.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <array>
#include <cstring>
#include <span>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t page = 4096;
/* RAM [ram, ram + 2 pages); MMIO pages of the VMM on both sides. */
static constexpr std::uint64_t ram = 0x40001000;
static constexpr std::uint64_t mmio_below = ram - page;
static constexpr std::uint64_t mmio_above = ram + 2 * page;

static void guest_store8(std::uint64_t addr, std::uint64_t value)
{
	*(volatile std::uint64_t *)addr = value;
	GUEST_SYNC(0);
}

struct StraddleGuest {
	GuestVm g{vkt::kvm()};
	SubpageProtection &spp;
	std::vector<SppViolation> seen;
	struct Mmio {
		std::uint64_t gpa;
		std::vector<std::uint8_t> data;
	};
	std::vector<Mmio> device;
	ExitHandlerRegistration reg;

	StraddleGuest(std::uint64_t protected_gpa, std::uint32_t map)
		: spp(SubpageProtection::enable(g.vm()))
	{
		g.memory().add(ram, 2 * page, {.name = "spp-straddle"});
		g.identity_map(mmio_below, 4 * page);
		spp.set_access(protected_gpa / page, {map});
		spp.on_violation([this](Vcpu &, const SppViolation &v) {
			seen.push_back(v);
			return SppDecision::drop;
		});
		/* The VMM's device on the pages around the RAM. */
		reg = g.vm().add_exit_handler([this](Vcpu &, Exit &e) {
			auto *m = std::get_if<MmioExit>(&e);
			if (!m || !m->is_write() ||
			    (m->gpa / page != mmio_below / page && m->gpa / page != mmio_above / page))
				return ExitAction::pass;
			Mmio w{m->gpa, std::vector<std::uint8_t>(m->data.size())};
			std::memcpy(w.data.data(), m->data.data(), m->data.size());
			device.push_back(std::move(w));
			return ExitAction::resume;
		});
	}

	void store(std::uint64_t addr, std::uint64_t value)
	{
		Vcpu &v = g.add_vcpu(guest_store8, addr, value);
		Ucall uc = g.run(v);
		TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
		g.run_to_done(v);
	}

	std::uint32_t read32(std::uint64_t gpa) { return g.memory().read_obj<std::uint32_t>(gpa); }
};

static constexpr std::uint64_t value = 0x1122334455667788ull;

VK_TEST(spp_allowed_store_into_mmio_reaches_vmm)
{
	/* Last RAM page: sub-page 31 writable, sub-page 0 protected. */
	StraddleGuest t(ram + page, 0x80000000u);
	t.store(mmio_above - 4, value);
	TEST_ASSERT_EQ(t.read32(mmio_above - 4), 0x55667788u);
	TEST_ASSERT_EQ(t.seen.size(), 0u);
	TEST_ASSERT(t.device.size() == 1, "the VMM saw %zu MMIO writes, want 1", t.device.size());
	TEST_ASSERT(t.device[0].gpa == mmio_above && t.device[0].data.size() == 4,
		    "the VMM saw gpa 0x%llx, %zu bytes; want 0x%llx, 4",
		    (unsigned long long)t.device[0].gpa, t.device[0].data.size(),
		    (unsigned long long)mmio_above);
	std::uint32_t got;
	std::memcpy(&got, t.device[0].data.data(), 4);
	TEST_ASSERT_EQ(got, 0x11223344u);
}

VK_TEST(spp_blocked_store_into_mmio_is_blocked_whole)
{
	/* Sub-page 31 of the last RAM page protected. */
	StraddleGuest t(ram + page, 0x7fffffffu);
	const std::uint32_t before = t.read32(mmio_above - 4);
	t.store(mmio_above - 4, value);
	TEST_ASSERT_EQ(t.read32(mmio_above - 4), before);
	TEST_ASSERT(t.device.empty(), "the VMM saw the MMIO part of a blocked store");
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	TEST_ASSERT(t.seen[0].gpa == mmio_above - 4 && t.seen[0].write_gpa == mmio_above - 4,
		    "violation gpa 0x%llx write 0x%llx", (unsigned long long)t.seen[0].gpa,
		    (unsigned long long)t.seen[0].write_gpa);
	TEST_ASSERT_EQ(t.seen[0].size, 8u);
	TEST_ASSERT(!std::memcmp(t.seen[0].data().data(), &value, 8), "violation data differ");
}

VK_TEST(spp_store_from_mmio_into_protected_sub_page_is_blocked_whole)
{
	/* First RAM page: sub-page 0 protected. */
	StraddleGuest t(ram, 0xfffffffeu);
	const std::uint32_t before = t.read32(ram);
	t.store(ram - 4, value);
	TEST_ASSERT_EQ(t.read32(ram), before);
	TEST_ASSERT(t.device.empty(), "the VMM saw the MMIO part of a blocked store (%zu writes)",
		    t.device.size());
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	TEST_ASSERT(t.seen[0].gpa == ram && t.seen[0].write_gpa == ram - 4 && t.seen[0].size == 8,
		    "violation gpa 0x%llx write 0x%llx size %u", (unsigned long long)t.seen[0].gpa,
		    (unsigned long long)t.seen[0].write_gpa, t.seen[0].size);
	TEST_ASSERT(!std::memcmp(t.seen[0].data().data(), &value, 8), "violation data differ");
}

VK_TEST(spp_allowed_store_from_mmio_reaches_vmm)
{
	/* First RAM page: sub-page 0 writable, sub-page 1 protected. */
	StraddleGuest t(ram, 0xfffffffdu);
	t.store(ram - 4, value);
	TEST_ASSERT_EQ(t.read32(ram), 0x11223344u);
	TEST_ASSERT_EQ(t.seen.size(), 0u);
	TEST_ASSERT(t.device.size() == 1 && t.device[0].gpa == ram - 4 && t.device[0].data.size() == 4,
		    "the VMM saw %zu MMIO writes", t.device.size());
	std::uint32_t got;
	std::memcpy(&got, t.device[0].data.data(), 4);
	TEST_ASSERT_EQ(got, 0x55667788u);
}

/*
 * A region added below a page whose sub-page 0 is protected needs its last
 * page to trap (a store straddling up into that sub-page is decided whole),
 * so a memslot of its own. With one memslot left, the region fits but its
 * guard does not: add() must refuse it, or - where it is added - the guard
 * must be there.
 */
VK_TEST(spp_region_without_room_for_its_guard_is_refused)
{
	GuestVm g(vkt::kvm());
	SubpageProtection &spp = SubpageProtection::enable(g.vm());
	GuestMemory &mem = g.memory();
	const std::uint64_t max = vkt::kvm().check_extension(KVM_CAP_NR_MEMSLOTS);
	TEST_REQUIRE(max > 0 && max <= 65536, "KVM_CAP_NR_MEMSLOTS = " + std::to_string(max));

	/* Region A: its first page has sub-page 0 protected; isolated protected pages fill the slots. */
	const std::uint64_t a = 0x100000000ull;
	const std::uint64_t pages = 2 * max + 8;
	mem.add(a, pages * page, {.name = "spp-fill"});
	std::uint64_t free = max - mem.slot_count();
	std::vector<std::uint32_t> maps(pages, SubpageProtection::all_writable);
	maps[0] = 0xfffffffeu;
	for (std::uint64_t k = 1; k < free / 2; k++)
		maps[2 * k + 8] = 0xfffffffdu; /* sub-pages 0 and 31 writable: traps alone */
	spp.set_access(a / page, maps);
	/* Then single-slot regions far away, until none is left; then free one. */
	std::vector<RegionId> plain;
	for (std::uint64_t gpa = 0x800000000ull;; gpa += 2 * page) {
		try {
			plain.push_back(mem.add(gpa, page, {.name = "spp-plain"}));
		} catch (const Error &e) {
			TEST_ASSERT(e.err() == ENOSPC, "%s", e.what());
			break;
		}
		TEST_ASSERT(plain.size() < 64, "memslots do not run out");
	}
	TEST_ASSERT(!plain.empty(), "no single-slot region fitted");
	mem.remove(plain.back());
	vkt::diag("%zu memslots in use of %llu", mem.slot_count(), (unsigned long long)max);

	const std::uint64_t b = a - 4 * page;
	try {
		mem.add(b, 4 * page, {.name = "spp-below"});
	} catch (const Error &e) {
		TEST_ASSERT(e.err() == ENOSPC, "%s", e.what());
		TEST_ASSERT(!mem.contains(b, 1), "a refused region stayed");
		vkt::diag("refused: %s", e.what());
		/* The layout is as before: the freed slot is still free. */
		mem.add(0x900000000ull, page, {.name = "spp-plain"});
		return;
	}
	/* Added: then its last page must trap, and a straddling store is blocked whole. */
	g.identity_map(b, 5 * page);
	int violations = 0;
	spp.on_violation([&](Vcpu &, const SppViolation &) {
		violations++;
		return SppDecision::drop;
	});
	const std::uint32_t before = mem.read_obj<std::uint32_t>(a - 4);
	Vcpu &v = g.add_vcpu(guest_store8, a - 4, value);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT(mem.read_obj<std::uint32_t>(a - 4) == before,
		    "the unprotected half of a blocked straddling store landed");
	TEST_ASSERT_EQ(violations, 1);
}

static void guest_push8(std::uint64_t top, std::uint64_t v)
{
	std::uint64_t saved;
	asm volatile("mov %%rsp, %0\n\tmov %1, %%rsp\n\tpush %2\n\tmov %0, %%rsp"
		     : "=&r"(saved)
		     : "r"(top), "r"(v)
		     : "memory");
	GUEST_SYNC(0);
}

/*
 * A store across two guest-virtual pages whose guest-physical pages are
 * not adjacent, the second with sub-page 0 protected: KVM stores the part
 * in the first page (which does not trap) before the rest reaches
 * sub-page protection. The violation must say so exactly: the store's gva,
 * its first byte's gpa, the bytes already performed, all of its data; the
 * protected page stays unchanged.
 */
VK_TEST(spp_store_split_across_unadjacent_pages_is_reported_exactly)
{
	const std::uint64_t other = 0x50000000, va = 0x60000000;
	for (bool push : {false, true}) {
		StraddleGuest t(ram + page, 0xfffffffeu);
		t.g.memory().add(other, page, {.name = "spp-other"});
		t.g.map(va, other, page);
		t.g.map(va + page, ram + page, page);
		const std::uint32_t before = t.read32(ram + page);
		Vcpu &v = push ? t.g.add_vcpu(guest_push8, va + page + 4, value)
			       : t.g.add_vcpu(guest_store8, va + page - 4, value);
		Ucall uc = t.g.run(v);
		TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
		t.g.run_to_done(v);
		const char *what = push ? "push" : "mov";
		TEST_ASSERT(t.read32(ram + page) == before, "%s: the protected sub-page changed", what);
		TEST_ASSERT_EQ(t.seen.size(), 1u);
		const SppViolation &x = t.seen[0];
		TEST_ASSERT(x.gpa == ram + page && x.write_gpa == other + page - 4 &&
				    x.gva == va + page - 4 && x.performed == 4 && x.size == 8,
			    "%s: violation gpa 0x%llx write_gpa 0x%llx gva 0x%llx performed %u size %u",
			    what, (unsigned long long)x.gpa, (unsigned long long)x.write_gpa,
			    (unsigned long long)x.gva, x.performed, x.size);
		TEST_ASSERT(!std::memcmp(x.data().data(), &value, 8), "%s: violation data differ", what);
		/* What KVM performed, as the violation says. */
		TEST_ASSERT_EQ(t.read32(other + page - 4), 0x55667788u);
	}
}

/*
 * Writes pte_value to the paging-structure entry at pte (unless pte is 0),
 * then calls the code at fn with rdi = addr, rax = value. The guest edits
 * its own table: under shadow paging KVM sees that write (an edit by the
 * host would not reach KVM's shadow tables, and the guest would go on
 * running the old page).
 */
static void guest_remap_and_call(std::uint64_t pte, std::uint64_t pte_value, std::uint64_t fn,
				 std::uint64_t addr, std::uint64_t value)
{
	if (pte)
		*(volatile std::uint64_t *)pte = pte_value;
	guest_invlpg(fn);
	asm volatile("call *%2" : : "D"(addr), "a"(value), "r"(fn) : "memory");
	GUEST_SYNC(0);
}

/*
 * The engine decides a write by the instruction that ended at RIP, read
 * from the guest's code through a cache of the code page's translation
 * (Documentation/spp.rst, "How the user backend works"). Between two stores
 * from the same RIP the guest remaps its code page to another physical
 * page holding another instruction: the second store must be decided by
 * the new bytes. First `nop; mov [rdi], eax` writes 4 bytes at the end of a
 * page whose neighbour has sub-page 0 protected (allowed); then
 * `mov [rdi], rax` from the same RIP stores 8 bytes across into that
 * sub-page, and is blocked whole. Decoded from the stale page, as a 4-byte
 * store, its first half would be performed on its own.
 */
VK_TEST(spp_store_decoded_from_remapped_code_page)
{
	static constexpr std::uint64_t code_gva = 0x520000000000ull, off = 0x100;
	static constexpr std::uint64_t table_gva = 0x530000000000ull;
	StraddleGuest t(ram + page, 0xfffffffeu);
	GuestVm &g = t.g;
	const std::uint64_t narrow = g.alloc_pages(1), wide = g.alloc_pages(1);
	auto code_page = [&](std::uint64_t gpa, std::uint8_t first) {
		std::array<std::uint8_t, off + 4> b;
		b.fill(0x90); /* nops up to the instruction */
		b[off] = first;
		b[off + 1] = 0x89;
		b[off + 2] = 0x07;
		b[off + 3] = 0xc3; /* ret */
		g.memory().write(gpa, std::as_bytes(std::span(b)));
	};
	code_page(narrow, 0x90);	/* nop; mov [rdi], eax */
	code_page(wide, 0x48);		/* mov [rdi], rax */
	g.map(code_gva, narrow, page);

	const std::uint64_t at = ram + page - 4;
	Vcpu &v = g.add_vcpu(guest_remap_and_call, 0, 0, code_gva + off, at, 0x99aabbccull);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT_EQ(t.read32(at), 0x99aabbccu);
	TEST_ASSERT_EQ(t.seen.size(), 0u);

	/* The code page's PTE, for the guest to point at the other page. */
	const Walk w = v.translate(code_gva, Access::fetch);
	TEST_ASSERT(w.ok() && w.level == 1 && w.gpa == narrow, "code page walk: level %d gpa 0x%llx",
		    w.level, (unsigned long long)w.gpa);
	const std::uint64_t pte_gpa = w.entry_gpa[1];
	const std::uint64_t pte_value = (w.entry[1] & ~0x000ffffffffff000ull) | wide;
	g.map(table_gva, pte_gpa & ~(page - 1), page);
	g.set_entry(v, guest_remap_and_call, table_gva + pte_gpa % page, pte_value, code_gva + off, at,
		    value);
	uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT_EQ(*g.gva_to_gpa(code_gva), wide);
	TEST_ASSERT(t.read32(at) == 0x99aabbccu,
		    "the allowed half of a blocked 8-byte store landed (decoded from the old code "
		    "page?): 0x%x there, %zu violations",
		    t.read32(at), t.seen.size());
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	TEST_ASSERT(t.seen[0].gpa == ram + page && t.seen[0].write_gpa == at && t.seen[0].size == 8,
		    "violation gpa 0x%llx write_gpa 0x%llx size %u", (unsigned long long)t.seen[0].gpa,
		    (unsigned long long)t.seen[0].write_gpa, t.seen[0].size);
	TEST_ASSERT(!std::memcmp(t.seen[0].data().data(), &value, 8), "violation data differ");
}
