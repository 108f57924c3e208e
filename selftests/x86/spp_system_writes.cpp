// SPDX-License-Identifier: MIT
/*
 * Writes KVM cannot complete on a page whose writes trap: the store of
 * sgdt/sidt and the accessed bit a segment load sets in its descriptor.
 * KVM's emulator performs them as system accesses that fail on a read-only
 * memslot and restarts the instruction, so without help the vCPU spins
 * inside KVM_RUN for ever. Sub-page protection must decide them like any
 * other write: on a writable sub-page they land (and the guest goes on), on
 * a protected one they are reported, and every run ends within its bound.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <atomic>
#include <chrono>
#include <cstring>
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
