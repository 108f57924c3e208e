// SPDX-License-Identifier: MIT
/*
 * An exception delivered onto a stack page with a protected sub-page. The
 * processor pushes the frame during delivery, which KVM cannot complete on
 * a read-only memslot. Where KVM reports the event it failed to deliver
 * (platform::failed_delivery_reported), sub-page protection delivers it:
 * a frame on writable sub-pages lands and the handler runs; a frame that
 * touches a protected sub-page is reported, and - the guest cannot go on
 * without it - the run ends with the violation, the event still queued, so
 * that the VMM can lift the protection and run again.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_probes.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <cstring>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t base = 0x40000000, page = 4096, prot = base + page;
/* Sub-pages 0..15 writable, 16..31 protected. */
static constexpr std::uint32_t half_map = 0x0000ffffu;

static void ud_skip(virtkit_ex_frame *f)
{
	f->rip += 2; /* ud2 */
	f->rax = 0x5eed;
}

static void guest_fault_on_stack(std::uint64_t top)
{
	std::uint64_t saved, rax = 0;
	asm volatile("mov %%rsp, %0\n\t"
		     "mov %2, %%rsp\n\t"
		     "ud2\n\t"
		     "mov %0, %%rsp"
		     : "=&r"(saved), "+a"(rax)
		     : "r"(top)
		     : "memory");
	GUEST_SYNC(rax);
}

struct FrameGuest {
	GuestVm g{vkt::kvm()};
	SubpageProtection &spp;
	std::vector<SppViolation> seen;
	Vcpu *v;

	explicit FrameGuest(std::uint64_t top) : spp(SubpageProtection::enable(g.vm()))
	{
		g.memory().add(base, 3 * page, {.name = "spp-stack"});
		g.identity_map(base, 3 * page);
		spp.set_access(prot / page, {half_map});
		spp.on_violation([this](Vcpu &, const SppViolation &x) {
			seen.push_back(x);
			return SppDecision::drop;
		});
		g.install_exception_handler(UD_VECTOR, ud_skip);
		v = &g.add_vcpu(guest_fault_on_stack, top);
	}
};

static void require_platform()
{
	const Probe &p = platform::failed_delivery_reported(vkt::kvm());
	TEST_REQUIRE(static_cast<bool>(p),
		     "KVM to name an event it cannot deliver onto a read-only memslot (without "
		     "that nothing can deliver it): " + p.describe());
	vkt::diag("%s", p.describe().c_str());
}

VK_TEST(spp_exception_frame_on_writable_sub_pages_is_delivered)
{
	require_platform();
	FrameGuest t(prot + 2048); /* the frame lands just below: sub-page 15 */
	Ucall uc = t.g.run(*t.v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 0x5eed,
		    "the #UD handler did not run: %s", uc.describe().c_str());
	TEST_ASSERT_EQ(t.seen.size(), 0u);
	/* The frame as the processor pushes it: RIP, CS, RFLAGS, RSP, SS below the top. */
	std::uint64_t frame[5];
	t.g.memory().read(prot + 2048 - 40, std::as_writable_bytes(std::span(frame)));
	TEST_ASSERT(frame[3] == prot + 2048 && frame[1] == t.v->sregs().cs.selector,
		    "frame: rsp 0x%llx cs 0x%llx", (unsigned long long)frame[3],
		    (unsigned long long)frame[1]);
	t.g.run_to_done(*t.v);
}

static std::uint64_t gp_error_code;

static void gp_skip(virtkit_ex_frame *f)
{
	gp_error_code = f->error_code;
	f->rip += 2; /* mov %eax,%ds */
}

static void guest_gp_on_stack(std::uint64_t top)
{
	std::uint64_t saved;
	asm volatile("mov %%rsp, %0\n\t"
		     "mov %1, %%rsp\n\t"
		     "mov $0xfff8, %%eax\n\t"
		     "mov %%eax, %%ds\n\t"
		     "mov %0, %%rsp"
		     : "=&r"(saved)
		     : "r"(top)
		     : "rax", "memory");
	GUEST_SYNC(gp_error_code);
}

VK_TEST(spp_emulatable_fault_frame_is_delivered)
{
	const Probe &p = platform::failed_delivery_queued(vkt::kvm());
	TEST_REQUIRE(static_cast<bool>(p), "KVM to keep or name an exception it cannot deliver "
					   "from an instruction it emulates: " + p.describe());
	vkt::diag("%s", p.describe().c_str());
	GuestVm g(vkt::kvm());
	g.memory().add(base, 3 * page, {.name = "spp-stack"});
	g.identity_map(base, 3 * page);
	auto &spp = SubpageProtection::enable(g.vm());
	spp.set_access(prot / page, {half_map});
	g.install_exception_handler(GP_VECTOR, gp_skip);
	Vcpu &v = g.add_vcpu(guest_gp_on_stack, prot + 2048);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 0xfff8,
		    "the #GP handler did not get error code 0xfff8: %s", uc.describe().c_str());
	g.run_to_done(v);
}

VK_TEST(spp_exception_frame_on_protected_sub_page_reaches_vmm)
{
	require_platform();
	FrameGuest t(prot + 4096); /* the frame lands in the protected half */
	std::vector<std::uint8_t> before(64);
	t.g.memory().read(prot + 4096 - 64, std::as_writable_bytes(std::span(before)));
	Exit e = t.v->run();
	auto *x = std::get_if<SppViolationExit>(&e);
	TEST_ASSERT(x, "run() ended with %s, want the violation", describe(e).c_str());
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	TEST_ASSERT(x->violation.gpa >= prot + 2048 && x->violation.size == 40,
		    "violation gpa 0x%llx size %u", (unsigned long long)x->violation.gpa,
		    x->violation.size);
	std::vector<std::uint8_t> after(64);
	t.g.memory().read(prot + 4096 - 64, std::as_writable_bytes(std::span(after)));
	TEST_ASSERT(after == before, "part of a blocked frame landed");
	/* The VMM lifts the protection: the event is delivered on the next run. */
	t.spp.set_access(prot / page, {SubpageProtection::all_writable});
	Ucall uc = t.g.run(*t.v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 0x5eed,
		    "after lifting the protection: %s", uc.describe().c_str());
	t.g.run_to_done(*t.v);
}
