// SPDX-License-Identifier: MIT
/*
 * Writes KVM cannot complete on a page whose writes trap: the store of
 * sgdt/sidt and of fxsave in 32-bit code, and the accessed bit a segment
 * load sets in its descriptor. KVM's emulator performs them as system
 * accesses that fail on a read-only memslot and restarts the instruction,
 * so without help the vCPU spins inside KVM_RUN for ever. fxsave in 64-bit
 * code it refuses outright (an emulation failure exit). Sub-page protection must decide them like any
 * other write: on a writable sub-page they land (and the guest goes on), on
 * a protected one they are reported, and every run ends within its bound.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t base = 0x40000000;
static constexpr std::uint64_t page = 4096;
/* Page 0: a reference that does not trap. Page 1: sub-pages 0..15 writable, 16..31 protected. */
static constexpr std::uint64_t ref = base;
static constexpr std::uint64_t prot = base + page;
static constexpr std::uint32_t half_map = 0x0000ffffu;
static constexpr std::uint64_t allowed = prot + 0x100;
static constexpr std::uint64_t denied = prot + 2048 + 0x100;
static constexpr std::uint64_t bound_s = 60;

struct SysGuest {
	GuestVm g{vkt::kvm()};
	SubpageProtection &spp;
	std::vector<SppViolation> seen;
	SppDecision decision = SppDecision::drop;

	SysGuest() : spp(SubpageProtection::enable(g.vm()))
	{
		g.memory().add(base, 3 * page, {.name = "spp-sys"});
		g.identity_map(base, 3 * page);
		spp.set_access(prot / page, {half_map});
		spp.on_violation([this](Vcpu &, const SppViolation &v) {
			seen.push_back(v);
			return decision;
		});
	}

	/* Run to the next ucall; fail if it takes longer than the bound (kicked). */
	Ucall run_bounded(Vcpu &v)
	{
		std::atomic<bool> done{false};
		std::thread watchdog([&] {
			auto end = std::chrono::steady_clock::now() + std::chrono::seconds(bound_s);
			while (!done && std::chrono::steady_clock::now() < end)
				std::this_thread::sleep_for(std::chrono::milliseconds(5));
			if (!done)
				v.kick();
		});
		struct Join {
			std::atomic<bool> &done;
			std::thread &t;
			~Join()
			{
				done = true;
				t.join();
			}
		} join{done, watchdog};
		try {
			return g.run(v);
		} catch (const GuestFailure &e) {
			TEST_ASSERT(!std::strstr(e.what(), "INTERRUPTED"),
				    "the vCPU did not leave KVM_RUN within %llu s: %s",
				    (unsigned long long)bound_s, e.what());
			throw;
		}
	}

	std::vector<std::uint8_t> read(std::uint64_t gpa, std::size_t n)
	{
		std::vector<std::uint8_t> v(n);
		g.memory().read(gpa, std::as_writable_bytes(std::span(v)));
		return v;
	}
};

static void guest_sgdt_sidt(std::uint64_t r, std::uint64_t a, std::uint64_t d)
{
	asm volatile("sgdt (%0)\n\tsidt 16(%0)" : : "r"(r) : "memory");
	asm volatile("sgdt (%0)\n\tsidt 16(%0)" : : "r"(a) : "memory");
	asm volatile("sgdt (%0)" : : "r"(d) : "memory");
	asm volatile("sidt 16(%0)" : : "r"(d) : "memory");
	GUEST_SYNC(0);
}

VK_TEST(spp_sgdt_sidt_complete_on_a_trapping_page)
{
	SysGuest t;
	std::vector<std::uint8_t> fill(32, 0xee);
	for (std::uint64_t a : {ref, allowed, denied})
		t.g.memory().write(a, std::as_bytes(std::span(fill)));
	Vcpu &v = t.g.add_vcpu(guest_sgdt_sidt, ref, allowed, denied);
	const SppStats before = t.spp.stats();
	Ucall uc = t.run_bounded(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());

	auto r = t.read(ref, 32), a = t.read(allowed, 32), d = t.read(denied, 32);
	TEST_ASSERT(r != fill, "the reference sgdt/sidt stored nothing");
	TEST_ASSERT(a == r, "sgdt/sidt on the writable sub-page differ from the reference");
	TEST_ASSERT(d == fill, "sgdt/sidt wrote into the protected sub-page");
	TEST_ASSERT_EQ(t.seen.size(), 2u);
	for (int k = 0; k < 2; k++) {
		const SppViolation &x = t.seen[k];
		TEST_ASSERT(x.gpa == denied + 16 * k && x.write_gpa == x.gpa && x.size == 10,
			    "violation %d: gpa 0x%llx write_gpa 0x%llx size %u", k,
			    (unsigned long long)x.gpa, (unsigned long long)x.write_gpa, x.size);
		TEST_ASSERT(!std::memcmp(x.data().data(), &r[16 * k], 10),
			    "violation %d: the data differ from what the reference stored", k);
	}
	const SppStats s = t.spp.stats();
	TEST_ASSERT_EQ(s.violations - before.violations, 2u);
	t.g.run_to_done(v);
}

/* Load the descriptor `sel` of the table at gdt (a copy of the guest's GDT), then go back. */
static void guest_segment_load(std::uint64_t gdt, std::uint64_t sel)
{
	struct __attribute__((packed)) {
		std::uint16_t limit;
		std::uint64_t base;
	} old, copy;
	asm volatile("sgdt %0" : "=m"(old));
	copy.limit = old.limit;
	copy.base = gdt;
	asm volatile("lgdt %0\n\t"
		     "mov %1, %%ds\n\t"
		     "lgdt %2\n\t"
		     "mov %3, %%ds"
		     : : "m"(copy), "r"((std::uint16_t)sel), "m"(old), "r"((std::uint16_t)0x10)
		     : "memory");
	GUEST_SYNC(0);
}

/* The vCPU's GDT copied to gpa with the accessed bit of entry `index` cleared. */
static std::uint64_t place_gdt(SysGuest &t, Vcpu &v, std::uint64_t gpa, unsigned index)
{
	const kvm_sregs s = v.sregs();
	std::vector<std::uint8_t> gdt(s.gdt.limit + 1u);
	t.g.read_gva(s.gdt.base, gdt.data(), gdt.size());
	gdt[index * 8 + 5] &= ~1u;
	t.g.memory().write(gpa, std::as_bytes(std::span(gdt)));
	return gpa + index * 8 + 5;
}

VK_TEST(spp_segment_load_sets_accessed_bit_on_a_writable_sub_page)
{
	SysGuest t;
	Vcpu &v = t.g.add_vcpu(guest_segment_load, allowed, 0x10);
	const std::uint64_t type = place_gdt(t, v, allowed, 2);
	const std::uint8_t before = t.read(type, 1)[0];
	Ucall uc = t.run_bounded(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT_EQ(t.read(type, 1)[0], before | 1u);
	TEST_ASSERT_EQ(t.seen.size(), 0u);
	t.g.run_to_done(v);
}

VK_TEST(spp_segment_load_reports_protected_descriptor)
{
	SysGuest t;
	/* Entry 2's type byte lands in the protected half. */
	const std::uint64_t table = prot + 2048 - 16;
	Vcpu &v = t.g.add_vcpu(guest_segment_load, table, 0x10);
	const std::uint64_t type = place_gdt(t, v, table, 2);
	const std::uint8_t before = t.read(type, 1)[0];

	/* Allowed once by the handler: the bit is set and the guest goes on. */
	t.decision = SppDecision::allow_once;
	Ucall uc = t.run_bounded(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT_EQ(t.read(type, 1)[0], before | 1u);
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	TEST_ASSERT(t.seen[0].gpa == type && t.seen[0].size == 1 &&
			    std::to_integer<std::uint8_t>(t.seen[0].bytes[0]) == (before | 1u),
		    "violation at 0x%llx size %u, want 0x%llx size 1",
		    (unsigned long long)t.seen[0].gpa, t.seen[0].size, (unsigned long long)type);
	t.g.run_to_done(v);
}

VK_TEST(spp_segment_load_dropped_on_protected_descriptor_reaches_vmm)
{
	SysGuest t;
	const std::uint64_t table = prot + 2048 - 16;
	Vcpu &v = t.g.add_vcpu(guest_segment_load, table, 0x10);
	const std::uint64_t type = place_gdt(t, v, table, 2);
	const std::uint8_t before = t.read(type, 1)[0];

	/*
	 * Dropped: the guest cannot load the segment without the bit, so the
	 * run ends with the violation; the VMM lifts the protection and the
	 * guest goes on.
	 */
	t.decision = SppDecision::drop;
	bool stopped = false;
	try {
		t.run_bounded(v);
	} catch (const GuestFailure &e) {
		stopped = std::strstr(e.what(), "SPP") || std::strstr(e.what(), "sub-page");
		TEST_ASSERT(stopped, "run ended with: %s", e.what());
	}
	TEST_ASSERT(stopped, "the guest went on without its descriptor's accessed bit");
	TEST_ASSERT_EQ(t.read(type, 1)[0], before);
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	t.spp.set_access(prot / page, {SubpageProtection::all_writable});
	Ucall uc = t.run_bounded(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());
	TEST_ASSERT_EQ(t.read(type, 1)[0], before | 1u);
	t.g.run_to_done(v);
}

/*
 * fxsave and fxsave64 (REX.W): at r (the reference page, which does not
 * trap), then at a (writable sub-pages of the trapping page), then at d1
 * and d2 (areas overlapping its protected half). Each stores 512 bytes
 * apart: fxsave at +0, fxsave64 at +512. The x87/SSE state is the VMM's
 * (set_fx_state): kvm_pvm's emulator fails on x87 and SSE loads in the guest.
 */
static void guest_fxsave(std::uint64_t r, std::uint64_t a, std::uint64_t d1, std::uint64_t d2)
{
	asm volatile("fxsave (%0)\n\tfxsave64 512(%0)\n\t"
		     "fxsave (%1)\n\tfxsave64 512(%1)\n\t"
		     "fxsave (%2)\n\tfxsave64 (%3)"
		     : : "D"(r), "S"(a), "d"(d1), "c"(d2) : "memory"); /* fxsave64 (%rcx): 4 bytes */
	GUEST_SYNC(0);
}

/*
 * x87, SSE and MXCSR state unlike the reset values, through KVM_SET_XSAVE
 * with x87 and SSE marked in use (KVM_SET_FPU neither sets MXCSR nor marks
 * them: with XSAVE the guest would get their initial state).
 */
static void set_fx_state(Vcpu &v)
{
	Xsave x = v.xsave();
	auto *fx = reinterpret_cast<std::uint8_t *>(x.region.data());
	auto put = [&](std::size_t at, auto val) { std::memcpy(fx + at, &val, sizeof(val)); };
	put(0, std::uint16_t{0x037f});
	put(2, std::uint16_t{0x3800 | 0x21});	/* TOP = 7, sticky IE and PE (masked) */
	put(4, std::uint8_t{0x80});		/* physical register 7 (ST0) valid */
	put(6, std::uint16_t{0x1e8});		/* FOP */
	put(8, std::uint64_t{0x0000123456789abcull});	/* FIP */
	put(16, std::uint64_t{0x00000fedcba98760ull}); /* FDP */
	put(24, std::uint32_t{0x1f80 | 0x21});	/* MXCSR: default masks, IE and PE */
	for (int k = 0; k < 8; k++)
		for (int b = 0; b < 10; b++)
			fx[32 + 16 * k + b] = static_cast<std::uint8_t>(0x10 * k + b + 1);
	for (int k = 0; k < 16; k++)
		for (int b = 0; b < 16; b++)
			fx[160 + 16 * k + b] = static_cast<std::uint8_t>(k + 1 + (b << 4));
	fx[512] |= 3;				/* XSTATE_BV: x87, SSE */
	v.set_xsave(x);
}

/* The bytes fxsave stores in 64-bit mode with CR4.OSFXSR: header, ST0-7, XMM0-15. */
static constexpr std::size_t fx_stored = 416;

/*
 * The fxsave stored at a[at] differs from the reference b[at]. Not compared:
 * bytes 416..511 (reserved and software's: some processors write them, the
 * library, like KVM's em_fxsave, does not), bytes 10..15 of each ST
 * register's slot (reserved: QEMU's TCG does not write them, the library
 * stores KVM's, 0), and the x87 last-instruction
 * pointers FOP, FIP, FCS, FDP, FDS (bytes 6..23), which implementations
 * save differently (QEMU's TCG stores none of them, AMD processors without
 * XSAVEERPTR only with an exception pending): fx_pointers checks those.
 */
static bool fx_differ(const std::vector<std::uint8_t> &a, const std::vector<std::uint8_t> &b,
		      std::size_t at)
{
	bool differ = false;
	for (std::size_t k = 0; k < fx_stored; k++) {
		if ((k >= 6 && k < 24) || (k >= 32 && k < 160 && k % 16 >= 10))
			continue;
		if (a[at + k] != b[at + k]) {
			vkt::diag("byte %zu: 0x%02x, reference 0x%02x", k, a[at + k], b[at + k]);
			differ = true;
		}
	}
	return differ;
}

/*
 * The pointers in the fxsave at a[at] are KVM's (the legacy region of
 * KVM_GET_XSAVE, 64-bit layout) in the instruction's layout: fxsave64 as
 * they are; fxsave FIP[31:0] and FDP[31:0] with FCS and FDS 0.
 */
static bool fx_pointers(const std::vector<std::uint8_t> &a, std::size_t at, bool rex_w,
			const Xsave &xs)
{
	std::array<std::uint8_t, 24> want;
	std::memcpy(want.data(), xs.region.data(), want.size());
	if (!rex_w) {
		std::memset(want.data() + 12, 0, 4);
		std::memset(want.data() + 20, 0, 4);
	}
	for (std::size_t k = 6; k < want.size(); k++)
		if (a[at + k] != want[k]) {
			vkt::diag("fxsave%s byte %zu: 0x%02x, KVM's state 0x%02x", rex_w ? "64" : "",
				  k, a[at + k], want[k]);
			return false;
		}
	return true;
}

static void fxsave_test(SppDecision decision)
{
	SysGuest t;
	t.decision = decision;
	/* d1 overlaps sub-page 16 (the first protected one) with its last 256 bytes. */
	const std::uint64_t d1 = prot + 2048 - 256, d2 = prot + 4096 - 512;
	std::vector<std::uint8_t> fill(1024, 0xee);
	for (std::uint64_t x : {ref, allowed})
		t.g.memory().write(x, std::as_bytes(std::span(fill)));
	t.g.memory().write(d1, std::as_bytes(std::span(fill).first(512)));
	t.g.memory().write(d2, std::as_bytes(std::span(fill).first(512)));
	Vcpu &v = t.g.add_vcpu(guest_fxsave, ref, allowed, d1, d2);
	set_fx_state(v);
	const SppStats before = t.spp.stats();
	/* stop: each blocked fxsave ends the run (the guest is after it); run again. */
	std::optional<Ucall> uc;
	int stops = 0;
	while (!uc) {
		try {
			uc = t.run_bounded(v);
		} catch (const GuestFailure &e) {
			TEST_ASSERT(decision == SppDecision::stop && stops++ < 2 &&
					    (std::strstr(e.what(), "SPP") || std::strstr(e.what(), "sub-page")),
				    "run ended with: %s", e.what());
		}
	}
	TEST_ASSERT(uc->kind == Ucall::Kind::sync, "%s", uc->describe().c_str());
	TEST_ASSERT_EQ(stops, decision == SppDecision::stop ? 2 : 0);

	auto r = t.read(ref, 1024), a = t.read(allowed, 1024);
	TEST_ASSERT(r[160] == 1 && r[512 + 400] == 16 && r[24] == 0xa1 && r[32] == 1,
		    "the reference fxsave stored another state than the VMM set");
	const Xsave xs = v.xsave();
	TEST_ASSERT(!fx_differ(a, r, 0), "fxsave on writable sub-pages differs from the reference");
	TEST_ASSERT(!fx_differ(a, r, 512), "fxsave64 on writable sub-pages differs from the reference");
	TEST_ASSERT(fx_pointers(a, 0, false, xs) && fx_pointers(a, 512, true, xs),
		    "the x87 pointers on writable sub-pages are not KVM's in the instruction's layout");

	auto x1 = t.read(d1, 512), x2 = t.read(d2, 512);
	TEST_ASSERT_EQ(t.seen.size(), 2u);
	const std::uint64_t first[2] = {d1, d2}, blocked[2] = {prot + 2048, d2};
	for (int k = 0; k < 2; k++) {
		const SppViolation &x = t.seen[k];
		/* 64-bit mode with CR4.OSFXSR: 416 bytes, data() holds the first 64. */
		TEST_ASSERT(x.write_gpa == first[k] && x.gpa == blocked[k] &&
				    x.size == SppViolation::max_write && x.write_size == 416,
			    "violation %d: gpa 0x%llx write_gpa 0x%llx size %u write_size %u", k,
			    (unsigned long long)x.gpa, (unsigned long long)x.write_gpa, x.size,
			    x.write_size);
		/* FCW..FTW, MXCSR, its mask, ST0 and ST1 (see fx_differ) */
		const std::uint8_t *p = reinterpret_cast<const std::uint8_t *>(x.data().data());
		TEST_ASSERT(!std::memcmp(p, &r[512 * k], 6) &&
				    !std::memcmp(p + 24, &r[512 * k + 24], 18) &&
				    !std::memcmp(p + 48, &r[512 * k + 48], 10),
			    "violation %d: the data differ from what the reference stored", k);
		TEST_ASSERT(x.rip == t.seen[0].rip + 4 * k, "violation %d: rip 0x%llx", k,
			    (unsigned long long)x.rip);
	}
	if (decision != SppDecision::allow_once) {
		TEST_ASSERT(x1 == std::vector<std::uint8_t>(512, 0xee) &&
				    x2 == std::vector<std::uint8_t>(512, 0xee),
			    "a blocked fxsave wrote (all or nothing)");
	} else {
		std::vector<std::uint8_t> r64(r.begin() + 512, r.end());
		TEST_ASSERT(!fx_differ(x1, r, 0) && fx_pointers(x1, 0, false, xs),
			    "fxsave allowed once differs from the reference");
		TEST_ASSERT(!fx_differ(x2, r64, 0) && fx_pointers(x2, 0, true, xs),
			    "fxsave64 allowed once differs from the reference");
	}
	TEST_ASSERT_EQ(t.spp.stats().violations - before.violations, 2u);
	t.g.run_to_done(v);
}

VK_TEST(spp_fxsave_completes_on_a_trapping_page)
{
	fxsave_test(SppDecision::drop);
}

VK_TEST(spp_fxsave_allowed_once_on_a_protected_sub_page)
{
	fxsave_test(SppDecision::allow_once);
}

VK_TEST(spp_fxsave_stop_on_a_protected_sub_page_reaches_vmm)
{
	fxsave_test(SppDecision::stop);
}

/*
 * fxsave in 32-bit code (compatibility mode, through a copy of the GDT with
 * a 32-bit code segment, selector 0x38): at r, a and d. KVM emulates it
 * there (em_fxsave) and its store fails on a trapping page: the stall watch
 * must complete or report it.
 */
static void guest_fxsave32(std::uint64_t r, std::uint64_t a, std::uint64_t d)
{
	alignas(8) static std::uint64_t gdt[8];
	struct __attribute__((packed)) {
		std::uint16_t limit;
		std::uint64_t base;
	} old, copy;
	asm volatile("sgdt %0" : "=m"(old));
	std::memcpy(gdt, reinterpret_cast<const void *>(old.base), 7 * 8);
	gdt[7] = 0x00cf9b000000ffffull; /* code32: D = 1, L = 0 */
	copy.limit = sizeof(gdt) - 1;
	copy.base = reinterpret_cast<std::uint64_t>(gdt);
	asm volatile("lgdt %[copy]\n\t"
		     "pushq $0x38\n\t"
		     "leaq 1f(%%rip), %%rax\n\t"
		     "pushq %%rax\n\t"
		     "lretq\n\t"
		     ".code32\n"
		     "1:\tfxsave (%%edi)\n\t"
		     "fxsave (%%esi)\n\t"
		     "fxsave (%%edx)\n\t"
		     "ljmpl $0x08, $2f\n\t"
		     ".code64\n"
		     "2:\tlgdt %[old]"
		     : : [copy] "m"(copy), [old] "m"(old), "D"(r), "S"(a), "d"(d)
		     : "rax", "memory");
	GUEST_SYNC(0);
}

VK_TEST(spp_fxsave_in_32bit_code_completes_on_a_trapping_page)
{
	SysGuest t;
	const std::uint64_t d = prot + 2048 - 256;
	std::vector<std::uint8_t> fill(512, 0xee);
	for (std::uint64_t x : {ref, allowed, d})
		t.g.memory().write(x, std::as_bytes(std::span(fill)));
	Vcpu &v = t.g.add_vcpu(guest_fxsave32, ref, allowed, d);
	set_fx_state(v);
	Ucall uc = t.run_bounded(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s", uc.describe().c_str());

	auto r = t.read(ref, 512), a = t.read(allowed, 512);
	/* The 32-bit layout, XMM0-7: 288 bytes. */
	TEST_ASSERT(r[160] == 1 && r[160 + 7 * 16] == 8 && r[24] == 0xa1,
		    "the reference fxsave stored another state than the VMM set");
	TEST_ASSERT(!fx_differ(a, r, 0), "fxsave on writable sub-pages differs from the reference");
	TEST_ASSERT(fx_pointers(a, 0, false, v.xsave()),
		    "the x87 pointers on writable sub-pages are not KVM's in the 32-bit layout");
	TEST_ASSERT(t.read(d, 512) == fill, "a blocked fxsave wrote");
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	TEST_ASSERT(t.seen[0].write_gpa == d && t.seen[0].gpa == prot + 2048 &&
			    t.seen[0].size == SppViolation::max_write && t.seen[0].write_size == 288,
		    "violation: gpa 0x%llx write_gpa 0x%llx size %u write_size %u",
		    (unsigned long long)t.seen[0].gpa, (unsigned long long)t.seen[0].write_gpa,
		    t.seen[0].size, t.seen[0].write_size);
	t.g.run_to_done(v);
}
