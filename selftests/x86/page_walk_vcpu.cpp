// SPDX-License-Identifier: MIT
/*
 * Vcpu::translate(gva, access) and Vcpu::paging_state() against the real
 * thing: KVM_TRANSLATE's answers for the same addresses, and the faults a
 * guest takes when it performs the accesses the engine was asked about
 * (CR0.WP, NX, U/S, SMEP, SMAP with EFLAGS.AC, PKRU; CPL 0, which is where
 * the guest environment runs).
 */
#include "test.hpp"

#include <cpuid.h>

#include <cerrno>
#include <optional>
#include <string>
#include <vector>

#include <virtkit/x86/guest_vm.hpp>

#include "paging_util.hpp"

using namespace virtkit;
using namespace virtkit::x86;
using namespace paging;

static constexpr std::uint64_t MiB = 1ull << 20;
static constexpr std::uint64_t GiB = 1ull << 30;
/* Guest-virtual areas GuestVm does not use. */
static constexpr std::uint64_t LARGE_GVA = 0x500000000000ull;	/* 2 MiB and 1 GiB pages */
static constexpr std::uint64_t UNMAPPED_GVA = 0x510000000000ull;
static constexpr std::uint64_t NONCANONICAL = 0x8000000000001000ull;

static const char *outcome_name(const Walk &w)
{
	return w.ok() ? "ok" : w.page_fault() ? "#PF" : "#GP";
}

static void guest_sync_once(void) { GUEST_SYNC(0); }

/* A 2 MiB-aligned run of guest RAM, for a 2 MiB page. */
static std::uint64_t alloc_2m(GuestVm &g)
{
	std::uint64_t gpa = g.alloc_pages(2 * MiB / 4096 * 2);
	return (gpa + 2 * MiB - 1) & ~(2 * MiB - 1);
}

/*
 * For every kind of address the test library maps (the guest's own code
 * and data, pages with each right, 2 MiB and 1 GiB pages, a leaf with a
 * reserved bit, nothing at all), translate(gva, read) agrees with
 * KVM_TRANSLATE and with the library's own page tables.
 */
VK_TEST(translate_read_matches_kvm_translate)
{
	GuestVm g(vkt::kvm());
	std::vector<std::uint64_t> gvas = {
		reinterpret_cast<std::uint64_t>(&guest_sync_once),
		reinterpret_cast<std::uint64_t>(&vkt::kvm) + 17,
		g.alloc_vaddr(3 * 4096) + 4096 + 0x123,
		g.alloc_vaddr(4096, {.writable = false}) + 8,
		g.alloc_vaddr(4096, {.user = true}) + 0xff8,
		g.alloc_vaddr(4096, {.executable = false}),
		g.alloc_vaddr(4096, {.user = true, .pkey = 5}) + 1,
		UNMAPPED_GVA,
		UNMAPPED_GVA + 0x10000000,
	};
	const std::uint64_t gpa2m = alloc_2m(g);
	g.map(LARGE_GVA, gpa2m, 2 * MiB, {}, PageSize::m2);
	gvas.push_back(LARGE_GVA + 0x12345);
	g.map(LARGE_GVA + GiB, 0, GiB, {.writable = false}, PageSize::g1);
	gvas.push_back(LARGE_GVA + GiB + 0x2345678);
	/* A reserved bit (51, above any MAXPHYADDR below 52) in a leaf. */
	const std::uint64_t rsvd = g.alloc_vaddr(4096);
	*g.page_tables().leaf(rsvd) |= 1ull << 51;
	gvas.push_back(rsvd);

	Vcpu &v = g.add_vcpu(guest_sync_once);
	TEST_ASSERT(g.run(v).kind == Ucall::Kind::sync);
	const PagingState ps = v.paging_state();
	TEST_ASSERT(ps.maxphyaddr < 52, "MAXPHYADDR %u: bit 51 is not reserved", ps.maxphyaddr);
	/*
	 * Without Page1GB in the vCPU's CPUID, PS in a PDPTE is a reserved
	 * bit: KVM_TRANSLATE and the walk both fail the 1 GiB page.
	 */
	const bool page1gb = ps.features & paging_feature::page1gb;
	vkt::diag("guest CPUID: Page1GB %s", page1gb ? "yes" : "no");

	int mapped = 0;
	for (std::uint64_t gva : gvas) {
		kvm_translation k = v.translate(gva);
		Walk w = v.translate(gva, Access::read);
		auto want = g.gva_to_gpa(gva);
		vkt::diag("gva %#llx: KVM_TRANSLATE valid=%u gpa=%#llx; walk %s gpa=%#llx error_code=%#x level %d",
			  (unsigned long long)gva, k.valid,
			  (unsigned long long)k.physical_address, outcome_name(w),
			  (unsigned long long)w.gpa, w.error_code, w.level);
		TEST_ASSERT(!w.general_protection(), "gva %#llx is canonical", (unsigned long long)gva);
		TEST_ASSERT_EQ(w.ok(), k.valid != 0);
		if (w.ok()) {
			mapped++;
			TEST_ASSERT_EQ(w.gpa, k.physical_address);
			TEST_ASSERT(want.has_value());
			TEST_ASSERT_EQ(w.gpa, *want);
		}
		/* The same walk, from a snapshot, without the vCPU. */
		Walk o = translate(g.memory(), ps, gva, Access::read);
		TEST_ASSERT(o.outcome == w.outcome && o.gpa == w.gpa &&
				    o.error_code == w.error_code && o.level == w.level,
			    "gva %#llx: translate(memory, state) differs from Vcpu::translate",
			    (unsigned long long)gva);
	}
	TEST_ASSERT_EQ(mapped, page1gb ? 9 : 8);

	/* What the walks reached. */
	Walk w = v.translate(LARGE_GVA + 0x12345, Access::read);
	TEST_ASSERT_EQ(w.page_size, 2 * MiB);
	TEST_ASSERT_EQ(w.level, 2);
	TEST_ASSERT_EQ(w.gpa, gpa2m + 0x12345);
	w = v.translate(LARGE_GVA + GiB + 0x2345678, Access::write);
	if (page1gb) {
		TEST_ASSERT_EQ(w.page_size, GiB);
		TEST_ASSERT(w.page_fault() && w.error_code == (pfec::present | pfec::write),
			    "write to a read-only 1 GiB page: %s error_code %#x", outcome_name(w),
			    w.error_code);
		TEST_ASSERT(w.mapped() && w.gpa == 0x2345678 && !w.writable() &&
				    w.allows(Access::read) && !w.allows(Access::write),
			    "gpa %#llx rights %#x allowed %#x", (unsigned long long)w.gpa,
			    w.rights, w.allowed);
	} else {
		TEST_ASSERT(w.page_fault() &&
				    w.error_code == (pfec::present | pfec::write | pfec::rsvd) &&
				    w.level == 3 && !w.mapped(),
			    "write to a 1 GiB page without Page1GB: %s error_code %#x level %d",
			    outcome_name(w), w.error_code, w.level);
		/* The same tables on a CPU with Page1GB: the page is there. */
		PagingState with = ps;
		with.features |= paging_feature::page1gb;
		w = translate(g.memory(), with, LARGE_GVA + GiB + 0x2345678, Access::read);
		TEST_ASSERT(w.ok() && w.page_size == GiB && w.gpa == 0x2345678,
			    "read of a 1 GiB page with Page1GB: %s", outcome_name(w));
	}
	w = v.translate(gvas[6], Access::read);
	TEST_ASSERT(w.ok() && w.user() && w.key == 5, "user page with key 5: %s key %u rights %#x",
		    outcome_name(w), w.key, w.rights);
	w = v.translate(rsvd, Access::read);
	TEST_ASSERT(w.page_fault() && w.error_code == (pfec::present | pfec::rsvd) && !w.mapped(),
		    "reserved bit: %s error_code %#x", outcome_name(w), w.error_code);
	w = v.translate(NONCANONICAL, Access::read);
	TEST_ASSERT(w.general_protection(), "non-canonical: %s", outcome_name(w));
	g.run_to_done(v);
}

/*
 * PS in a PDPTE is a reserved bit unless the processor has Page1GB: the
 * vCPU's CPUID where KVM shadows the guest's tables, the host processor's
 * with NPT/EPT (KVM's guest_can_use_gbpages()). KVM_TRANSLATE and the walk
 * agree with the vCPU's Page1GB cleared and, where KVM offers it, set.
 */
VK_TEST(translate_1g_page_follows_vcpu_page1gb)
{
	const bool kvm_1g = cpuid_bit(vkt::kvm().supported_cpuid(), 0x80000001, 0, 'd', 26);
	vkt::diag("KVM_GET_SUPPORTED_CPUID: Page1GB %s; NPT/EPT: %s", kvm_1g ? "yes" : "no",
		  platform::tdp_enabled() ? "yes" : "no");
	int rsvd_seen = 0;
	for (bool page1gb : {false, true}) {
		if (page1gb && !kvm_1g)
			continue;
		GuestVm g(vkt::kvm());
		g.map(LARGE_GVA + GiB, 0, GiB, {}, PageSize::g1);
		const std::uint64_t gva = LARGE_GVA + GiB + 0x1234567;
		Vcpu &v = g.add_vcpu(guest_sync_once);
		auto cpuid = v.cpuid();
		for (auto &e : cpuid)
			if (e.function == 0x80000001)
				e.edx = page1gb ? e.edx | 1u << 26 : e.edx & ~(1u << 26);
		v.set_cpuid(cpuid);
		TEST_ASSERT(g.run(v).kind == Ucall::Kind::sync);
		const bool mapped = v.paging_state().features & paging_feature::page1gb;
		if (!platform::tdp_enabled())
			TEST_ASSERT_EQ(mapped, page1gb);
		const kvm_translation k = v.translate(gva);
		for (Access a : {Access::read, Access::write, Access::fetch}) {
			const Walk w = v.translate(gva, a);
			vkt::diag("vCPU Page1GB %d, access %d: KVM_TRANSLATE valid=%u gpa=%#llx; walk %s "
				  "error_code %#x level %d",
				  page1gb, (int)a, k.valid, (unsigned long long)k.physical_address,
				  outcome_name(w), w.error_code, w.level);
			if (mapped) {
				TEST_ASSERT(k.valid && k.physical_address == 0x1234567);
				TEST_ASSERT(w.ok() && w.gpa == 0x1234567 && w.page_size == GiB);
			} else {
				TEST_ASSERT(!k.valid);
				TEST_ASSERT(w.page_fault() && (w.error_code & pfec::rsvd) &&
						    (w.error_code & pfec::present) && w.level == 3,
					    "a 1 GiB page without Page1GB: %s error_code %#x",
					    outcome_name(w), w.error_code);
				rsvd_seen++;
			}
		}
		g.run_to_done(v);
	}
	vkt::diag("%d walks gave the reserved-bit #PF of a 1 GiB page without Page1GB", rsvd_seen);
}

/*
 * paging_state() is the vCPU's: registers, CPL from SS.DPL, MAXPHYADDR from
 * its CPUID. Errors name the page walk and keep the errno.
 */
VK_TEST(paging_state_and_errors)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_sync_once);
	const std::uint64_t code = reinterpret_cast<std::uint64_t>(&guest_sync_once);
	kvm_sregs s = v.sregs();
	PagingState ps = v.paging_state();
	TEST_ASSERT_EQ(ps.cr0, s.cr0);
	TEST_ASSERT_EQ(ps.cr3, s.cr3);
	TEST_ASSERT_EQ(ps.cr4, s.cr4);
	TEST_ASSERT_EQ(ps.efer, s.efer);
	TEST_ASSERT_EQ(ps.rflags, v.regs().rflags);
	TEST_ASSERT_EQ(ps.cpl, 0);
	TEST_ASSERT_EQ(ps.pkru, 0);
	TEST_ASSERT_EQ(ps.pkrs, 0);

	std::uint32_t want_maxphy = 36;
	for (auto &e : v.cpuid())
		if (e.function == 0x80000008)
			want_maxphy = e.eax & 0xff;
	TEST_ASSERT_EQ(ps.maxphyaddr, want_maxphy);
	/*
	 * The paging features are those of the vCPU's CPUID that KVM has
	 * (KVM_GET_SUPPORTED_CPUID), as KVM's own walk takes them.
	 */
	auto paging_bits = [](const std::vector<kvm_cpuid_entry2> &c) {
		const auto f = features(c);
		return (f.nx ? paging_feature::nx : 0) |
		       (cpuid_bit(c, 0x80000001, 0, 'd', 26) ? paging_feature::page1gb : 0) |
		       (f.smep ? paging_feature::smep : 0) | (f.smap ? paging_feature::smap : 0) |
		       (f.pku ? paging_feature::pku : 0) | (f.la57 ? paging_feature::la57 : 0) |
		       (f.pks ? paging_feature::pks : 0);
	};
	const std::uint32_t kvm_has = paging_bits(vkt::kvm().supported_cpuid());
	/* With NPT/EPT, 1 GiB pages are the host processor's (KVM's guest_can_use_gbpages()). */
	std::optional<bool> tdp_1g;
	if (platform::tdp_enabled()) {
		unsigned int a, b, c, d;
		tdp_1g = __get_cpuid(0x80000001, &a, &b, &c, &d) && (d >> 26 & 1);
	}
	auto effective = [&](const std::vector<kvm_cpuid_entry2> &c) {
		std::uint32_t f = paging_bits(c) & kvm_has;
		if (tdp_1g)
			f = *tdp_1g ? f | paging_feature::page1gb : f & ~paging_feature::page1gb;
		return f;
	};
	TEST_ASSERT_EQ(ps.features, effective(v.cpuid()));
	/* The CPUID facts follow set_cpuid() (the vCPU has not run yet). */
	const auto orig = v.cpuid();
	auto cpuid = orig;
	for (auto &e : cpuid) {
		if (e.function == 0x80000008)
			e.eax = (e.eax & ~0xffu) | (want_maxphy == 39 ? 40 : 39);
		if (e.function == 0x80000001)
			e.edx ^= 1u << 26;	/* Page1GB */
	}
	v.set_cpuid(cpuid);
	const PagingState after = v.paging_state();
	for (auto &e : cpuid)
		if (e.function == 0x80000008 && cpuid_bit(cpuid, 0x80000000, 0, 'a', 31))
			TEST_ASSERT_EQ(after.maxphyaddr, e.eax & 0xff);
	TEST_ASSERT_EQ(after.features, effective(cpuid));
	if ((kvm_has & paging_feature::page1gb) && !tdp_1g)
		TEST_ASSERT_EQ(after.features ^ ps.features, paging_feature::page1gb);
	v.set_cpuid(orig);
	TEST_ASSERT_EQ(v.paging_state().features, ps.features);

	/* The CPL is SS.DPL, as KVM takes it. */
	kvm_sregs user = s;
	user.ss.dpl = 3;
	v.set_sregs(user);
	TEST_ASSERT_EQ(v.paging_state().cpl, 3);
	/* ... so a read of the (supervisor) code page is a user-mode #PF. */
	Walk w = v.translate(code, Access::read);
	TEST_ASSERT(w.page_fault() && w.error_code == (pfec::present | pfec::user) && w.mapped(),
		    "CPL 3 read of a supervisor page: %s error_code %#x", outcome_name(w),
		    w.error_code);
	/* ... and implicit accesses are supervisor-mode at any CPL. */
	w = v.translate(code, Access::implicit_read);
	TEST_ASSERT(w.ok(), "implicit read at CPL 3: %s", outcome_name(w));
	v.set_sregs(s);

	/* PAE paging (CR0.PG=1, EFER.LMA=0): not walked. */
	PagingState pae_state = ps;
	pae_state.efer = 0;
	std::string m = TEST_EXPECT_ERROR(translate(g.memory(), pae_state, code, Access::read),
					  ENOTSUP);
	TEST_ASSERT(m.find("page walk") != std::string::npos, "%s", m.c_str());
	/*
	 * The vCPU in PAE paging: Vcpu::translate() walks the state KVM
	 * holds, which is not always the one given (a KVM that runs guests
	 * with shadow paging in long mode only, kvm_pvm, keeps CR0.PG clear,
	 * and that vCPU cannot go back to long mode: a second vCPU, which
	 * never runs, takes the state).
	 */
	Vcpu &p = g.add_vcpu(guest_sync_once);
	kvm_sregs pae = p.sregs();
	pae.efer = 0;
	pae.cs.l = 0;
	pae.cs.db = 1;
	pae.cr3 = s.cr3 & 0xffffffffull;
	p.set_sregs(pae);
	const kvm_sregs back = p.sregs();
	vkt::diag("KVM_SET_SREGS with PAE paging: KVM holds efer %#llx cr0 %#llx cr4 %#llx",
		  (unsigned long long)back.efer, (unsigned long long)back.cr0,
		  (unsigned long long)back.cr4);
	TEST_ASSERT(!(back.efer & (1ull << 10)), "EFER.LMA is set with EFER.LME clear");
	if (back.cr0 & (1ull << 31)) {
		m = TEST_EXPECT_ERROR(p.translate(code, Access::read), ENOTSUP);
		TEST_ASSERT(m.find("page walk") != std::string::npos, "%s", m.c_str());
	} else {
		/* Paging off: the identity. */
		w = p.translate(code, Access::read);
		TEST_ASSERT(w.ok() && w.gpa == code && w.level == 0, "no paging: %s gpa %#llx",
			    outcome_name(w), (unsigned long long)w.gpa);
	}

	/* Page tables outside guest memory: EFAULT, not a guest fault. */
	kvm_sregs gone = s;
	gone.cr3 = 0x100000000ull;
	v.set_sregs(gone);
	m = TEST_EXPECT_ERROR(v.translate(code, Access::read), EFAULT);
	TEST_ASSERT(m.find("page walk") != std::string::npos && m.find("0x100000000") != std::string::npos,
		    "%s", m.c_str());
	v.set_sregs(s);

	/* A state the engine cannot use. */
	ps.cpl = 4;
	m = TEST_EXPECT_ERROR(translate(g.memory(), ps, code, Access::read), EINVAL);
	TEST_ASSERT(m.find("page walk") != std::string::npos, "%s", m.c_str());
	TEST_ASSERT(v.translate(code, Access::fetch).ok());
	g.run(v);
	g.run_to_done(v);
}

/* ---- the guest performs the access the engine predicted ---- */

enum Op : std::uint8_t { op_read, op_write, op_fetch };

struct Case {
	std::uint64_t gva;
	std::uint8_t op;
	std::uint8_t wp;	/* CR0.WP */
	std::uint8_t smep;	/* CR4.SMEP */
	std::uint8_t smap;	/* CR4.SMAP */
	std::uint8_t ac;	/* EFLAGS.AC */
	std::uint8_t pke;	/* 1: CR4.PKE with PKRU = pkru; 2: PKRU = pkru, then PKE cleared */
	std::uint32_t pkru;
	const char *what;
};

static constexpr std::size_t max_cases = 64;
static Case cases[max_cases];

static void (*const ops[])(void *) = {guest_read_byte, guest_write_byte, guest_call};

static void guest_matrix(std::uint64_t n)
{
	const std::uint64_t cr0 = guest_read_cr0(), cr4 = guest_read_cr4();

	for (std::uint64_t i = 0; i < n; i++) {
		const Case *c = &cases[i];
		struct virtkit_exception ex = {};
		std::uint64_t r;

		guest_write_cr0(c->wp ? cr0 | CR0_WP : cr0 & ~CR0_WP);
		std::uint64_t x = cr4 & ~(CR4_SMEP | CR4_SMAP | CR4_PKE);
		if (c->smep)
			x |= CR4_SMEP;
		if (c->smap)
			x |= CR4_SMAP;
		if (c->pke) {
			guest_write_cr4(x | CR4_PKE);
			guest_wrpkru(c->pkru);
			if (c->pke == 1)
				x |= CR4_PKE;
		}
		guest_write_cr4(x);
		guest_set_ac(c->ac);
		/* The host asks the engine now, with exactly this state. */
		GUEST_SYNC(0, i);
		r = guest_catch(ops[c->op], (void *)c->gva, &ex);
		guest_set_ac(false);
		if (c->pke) {
			guest_write_cr4(x | CR4_PKE);
			guest_wrpkru(0);
		}
		guest_write_cr4(cr4);
		guest_write_cr0(cr0);
		GUEST_SYNC(1, i, r ? ex.vector : ~0ull, ex.error_code, ex.cr2);
	}
	GUEST_DONE();
}

static Access access_of(std::uint8_t op)
{
	return op == op_read ? Access::read : op == op_write ? Access::write : Access::fetch;
}

/*
 * Each case breaks at most one rule, so that the fault it gets does not
 * depend on the order in which a processor checks the rules.
 */
static std::vector<Case> matrix(GuestVm &g, const Features &f, std::vector<std::string> &dropped)
{
	const std::uint8_t ret = 0xc3;
	auto page = [&](const PageFlags &fl) {
		std::uint64_t gva = g.alloc_vaddr(4096, fl);
		g.write_gva(gva, &ret, 1);
		return gva;
	};
	const std::uint64_t rw = page({}), ro = page({.writable = false});
	const std::uint64_t nx = page({.executable = false});
	const std::uint64_t u = page({.user = true}), uro = page({.writable = false, .user = true});
	const std::uint64_t uk = page({.user = true, .pkey = 3});
	const std::uint64_t gpa2m = alloc_2m(g);
	g.map(LARGE_GVA, gpa2m, 2 * MiB, {}, PageSize::m2);
	const std::uint64_t big = LARGE_GVA + MiB + 0x800;
	const std::uint64_t d = 0x800; /* data accesses; the RET is at 0 */

	std::vector<Case> all = {
		{rw + d, op_read, 1, 0, 0, 0, 0, 0, "supervisor page: read"},
		{rw + d, op_write, 1, 0, 0, 0, 0, 0, "supervisor page: write"},
		{rw, op_fetch, 1, 0, 0, 0, 0, 0, "supervisor page: fetch"},
		{ro + d, op_read, 1, 0, 0, 0, 0, 0, "read-only page: read"},
		{ro + d, op_write, 1, 0, 0, 0, 0, 0, "read-only page: write, WP=1"},
		{ro + d, op_write, 0, 0, 0, 0, 0, 0, "read-only page: write, WP=0"},
		{nx + d, op_read, 1, 0, 0, 0, 0, 0, "NX page: read"},
		{nx, op_fetch, 1, 0, 0, 0, 0, 0, "NX page: fetch"},
		{u + d, op_read, 1, 0, 0, 0, 0, 0, "user page: read"},
		{u + d, op_write, 1, 0, 0, 0, 0, 0, "user page: write"},
		{u, op_fetch, 1, 0, 0, 0, 0, 0, "user page: fetch"},
		{uro + d, op_write, 1, 0, 0, 0, 0, 0, "read-only user page: write, WP=1"},
		{uro + d, op_write, 0, 0, 0, 0, 0, 0, "read-only user page: write, WP=0"},
		{u, op_fetch, 1, 1, 0, 0, 0, 0, "user page: fetch, SMEP"},
		{u + d, op_read, 1, 1, 0, 0, 0, 0, "user page: read, SMEP"},
		{rw, op_fetch, 1, 1, 0, 0, 0, 0, "supervisor page: fetch, SMEP"},
		{u + d, op_read, 1, 0, 1, 0, 0, 0, "user page: read, SMAP, AC=0"},
		{u + d, op_write, 1, 0, 1, 0, 0, 0, "user page: write, SMAP, AC=0"},
		{u + d, op_read, 1, 0, 1, 1, 0, 0, "user page: read, SMAP, AC=1"},
		{u + d, op_write, 1, 0, 1, 1, 0, 0, "user page: write, SMAP, AC=1"},
		{u, op_fetch, 1, 0, 1, 0, 0, 0, "user page: fetch, SMAP, AC=0"},
		{rw + d, op_read, 1, 0, 1, 0, 0, 0, "supervisor page: read, SMAP, AC=0"},
		{uk + d, op_read, 1, 0, 0, 0, 1, pkr_ad(3), "user page key 3: read, PKRU AD(3)"},
		{uk + d, op_write, 1, 0, 0, 0, 1, pkr_ad(3), "user page key 3: write, PKRU AD(3)"},
		{uk, op_fetch, 1, 0, 0, 0, 1, pkr_ad(3), "user page key 3: fetch, PKRU AD(3)"},
		{uk + d, op_read, 1, 0, 0, 0, 1, pkr_wd(3), "user page key 3: read, PKRU WD(3)"},
		{uk + d, op_write, 1, 0, 0, 0, 1, pkr_wd(3), "user page key 3: write, PKRU WD(3), WP=1"},
		{uk + d, op_write, 0, 0, 0, 0, 1, pkr_wd(3), "user page key 3: write, PKRU WD(3), WP=0"},
		{uk + d, op_read, 1, 0, 0, 0, 1, pkr_ad(2) | pkr_ad(4),
		 "user page key 3: read, PKRU AD(2) AD(4)"},
		{uk + d, op_read, 1, 0, 0, 0, 2, pkr_ad(3), "user page key 3: read, PKRU AD(3), PKE=0"},
		{rw + d, op_read, 1, 0, 0, 0, 1, 0xffffffff, "supervisor page: read, PKRU all AD, WD"},
		{big, op_read, 1, 0, 0, 0, 0, 0, "2 MiB page: read"},
		{big, op_write, 1, 0, 0, 0, 0, 0, "2 MiB page: write"},
		{UNMAPPED_GVA, op_read, 1, 0, 0, 0, 0, 0, "unmapped: read"},
		{UNMAPPED_GVA, op_write, 1, 0, 0, 0, 0, 0, "unmapped: write"},
		{UNMAPPED_GVA, op_fetch, 1, 0, 0, 0, 0, 0, "unmapped: fetch"},
		{NONCANONICAL, op_read, 1, 0, 0, 0, 0, 0, "non-canonical: read"},
	};
	std::vector<Case> run;
	for (auto &c : all) {
		const char *missing = c.smep && !f.smep ? "SMEP"
				      : c.smap && !f.smap ? "SMAP"
				      : c.pke && !f.pku   ? "PKU"
							  : nullptr;
		if (missing)
			dropped.push_back(std::string(c.what) + " (guest CPUID has no " + missing + ")");
		else
			run.push_back(c);
	}
	return run;
}

VK_TEST(translate_predicts_guest_faults)
{
	GuestVm g(vkt::kvm());
	/* GuestVm gives its vCPUs the CPUID KVM supports. */
	const Features f = features(vkt::kvm().supported_cpuid());
	std::vector<std::string> dropped;
	std::vector<Case> run = matrix(g, f, dropped);
	TEST_ASSERT(run.size() <= max_cases);
	for (auto &d : dropped)
		vkt::diag("not run: %s", d.c_str());
	for (std::size_t i = 0; i < run.size(); i++)
		cases[i] = run[i];
	g.sync_to_guest(cases);

	Vcpu &v = g.add_vcpu(guest_matrix, run.size());
	int faults = 0;
	for (std::size_t i = 0; i < run.size(); i++) {
		const Case &c = run[i];
		Ucall uc = g.run(v);
		TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.size() == 2 && uc.args[0] == 0 &&
				    uc.args[1] == i,
			    "case %zu: %s", i, uc.describe().c_str());
		const Walk w = v.translate(c.gva, access_of(c.op));
		if (c.pke == 1)
			TEST_ASSERT_EQ(v.paging_state().pkru, c.pkru);
		/* KVM_TRANSLATE answers a supervisor read; it ignores canonicality. */
		if (c.gva != NONCANONICAL) {
			const Walk r = v.translate(c.gva, Access::read);
			const kvm_translation k = v.translate(c.gva);
			TEST_ASSERT(r.ok() == (k.valid != 0) && (!r.ok() || r.gpa == k.physical_address),
				    "%s: KVM_TRANSLATE valid=%u gpa=%#llx, read walk %s gpa=%#llx",
				    c.what, k.valid, (unsigned long long)k.physical_address,
				    outcome_name(r), (unsigned long long)r.gpa);
		}

		uc = g.run(v);
		TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.size() == 5 && uc.args[0] == 1 &&
				    uc.args[1] == i,
			    "case %zu: %s", i, uc.describe().c_str());
		const std::uint64_t vector = uc.args[2], ec = uc.args[3], cr2 = uc.args[4];
		const std::string got =
			vector == ~0ull ? "no fault"
					: vkt::format("%s error_code %#llx cr2 %#llx",
						      exception_name(vector).c_str(),
						      (unsigned long long)ec, (unsigned long long)cr2);
		const std::string predicted =
			w.ok() ? "no fault"
			: w.page_fault()
				? vkt::format("#PF error_code %#x", w.error_code)
				: "#GP";
		vkt::diag("%-52s guest: %s; engine: %s", c.what, got.c_str(), predicted.c_str());
		bool same;
		if (w.ok())
			same = vector == ~0ull;
		else if (w.page_fault())
			same = vector == PF_VECTOR && ec == w.error_code && cr2 == c.gva;
		else
			same = vector == GP_VECTOR && ec == 0;
		TEST_ASSERT(same, "%s: the guest got %s, the engine predicted %s", c.what, got.c_str(),
			    predicted.c_str());
		faults += !w.ok();
	}
	g.run_to_done(v);
	/* The matrix is not all one answer. */
	TEST_ASSERT(faults > 3 && faults < static_cast<int>(run.size()) - 3, "%d faults in %zu cases",
		    faults, run.size());
}
