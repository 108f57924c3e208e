// SPDX-License-Identifier: MIT
/* Guest exceptions: guest_catch(), installed handlers, vectors and error codes. */
#include "test.hpp"

#include <virtkit/x86/guest_probes.hpp>
#include <virtkit/x86/guest_vm.hpp>

using namespace virtkit;
using namespace virtkit::x86;

static void do_ud2(void *) { __asm__ volatile("ud2"); }

static void do_read(void *p) { (void)*(volatile uint64_t *)p; }

static void do_write(void *p) { *(volatile uint64_t *)p = 1; }

static void guest_catch_ud_pf(uint64_t unmapped)
{
	struct virtkit_exception ex = {};

	GUEST_ASSERT_EQ(guest_catch(do_ud2, 0, &ex), UD_VECTOR + 1);
	GUEST_ASSERT_EQ(ex.vector, UD_VECTOR);
	GUEST_ASSERT_EQ(guest_catch(do_read, (void *)unmapped, &ex), PF_VECTOR + 1);
	GUEST_ASSERT_EQ(ex.cr2, unmapped);
	GUEST_ASSERT_EQ(ex.error_code, 0);
	GUEST_ASSERT_EQ(guest_catch(do_write, (void *)unmapped, &ex), PF_VECTOR + 1);
	GUEST_ASSERT_EQ(ex.error_code, PFERR_WRITE);
	GUEST_SYNC(ex.vector, ex.error_code, ex.cr2);
}

VK_TEST(exception_catch_ud_pf)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_catch_ud_pf, 0x40000000000ull);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync);
	TEST_ASSERT_EQ(uc.args[0], PF_VECTOR);
	TEST_ASSERT_EQ(uc.args[1], PFERR_WRITE);
	TEST_ASSERT_EQ(uc.args[2], 0x40000000000ull);
	g.run_to_done(v);
}

static std::uint64_t ud_count;

/* An installed handler: skip the 2-byte ud2 and count it. */
static void ud_handler(struct virtkit_ex_frame *f)
{
	ud_count++;
	f->rip += 2;
}

static void guest_handler_resumes(std::uint64_t n)
{
	for (std::uint64_t i = 0; i < n; i++)
		__asm__ volatile("ud2");
	GUEST_SYNC(ud_count);
}

VK_TEST(exception_handler_installed_and_resumes)
{
	GuestVm g(vkt::kvm());
	g.install_exception_handler(UD_VECTOR, ud_handler);
	Vcpu &v = g.add_vcpu(guest_handler_resumes, 5);
	Ucall uc = g.run(v);
	TEST_ASSERT_EQ(uc.args[0], 5);
	g.run_to_done(v);

	/* Removing the handler makes #UD unhandled again. */
	g.install_exception_handler(UD_VECTOR, nullptr);
	g.set_entry(v, guest_handler_resumes, 1);
	try {
		g.run(v);
		vkt::fail(__FILE__, __LINE__, "#UD was handled after the handler was removed");
	} catch (const GuestFailure &f) {
		TEST_ASSERT(f.ucall() && f.ucall()->kind == Ucall::Kind::unhandled_exception);
		TEST_ASSERT_EQ(f.ucall()->args[0], UD_VECTOR);
	}
}

static void do_noncanonical(void *) { (void)*(volatile uint64_t *)0x8000000000000000ull; }

static void do_int3(void *) { __asm__ volatile("int3"); }

static void do_divide(void *p)
{
	volatile std::uint64_t zero = (std::uint64_t)p;
	volatile std::uint64_t x = 7 / zero;
	(void)x;
}

static void do_user_page(void *p) { (void)*(volatile uint64_t *)p; }

static void do_exec_nx(void *p) { ((void (*)(void))p)(); }

static void do_write_readonly(void *p) { *(volatile uint64_t *)p = 1; }

static void guest_vectors_and_error_codes(std::uint64_t ro_page, std::uint64_t nx_page)
{
	struct virtkit_exception ex = {};

	GUEST_ASSERT_EQ(guest_catch(do_noncanonical, 0, &ex), GP_VECTOR + 1);
	GUEST_ASSERT_EQ(ex.error_code, 0);
	GUEST_ASSERT_EQ(guest_catch(do_divide, 0, &ex), DE_VECTOR + 1);
	/* CR0.WP=1: a supervisor write to a read-only page faults. */
	GUEST_ASSERT_EQ(guest_catch(do_write_readonly, (void *)ro_page, &ex), PF_VECTOR + 1);
	GUEST_ASSERT_EQ(ex.error_code, PFERR_PRESENT | PFERR_WRITE);
	GUEST_ASSERT_EQ(ex.cr2, ro_page);
	GUEST_ASSERT_EQ(guest_catch(do_user_page, (void *)ro_page, &ex), 0);
	/* EFER.NXE=1: fetching from an NX page faults with I/D set. */
	GUEST_ASSERT_EQ(guest_catch(do_exec_nx, (void *)nx_page, &ex), PF_VECTOR + 1);
	GUEST_ASSERT_EQ(ex.error_code, PFERR_PRESENT | PFERR_FETCH);
	GUEST_ASSERT_EQ(ex.rip, nx_page);
	GUEST_DONE();
}

VK_TEST(exception_vectors_and_error_codes)
{
	GuestVm g(vkt::kvm());
	std::uint64_t ro = g.alloc_vaddr(4096, {.writable = false});
	std::uint64_t nx = g.alloc_vaddr(4096, {.executable = false});
	/* A ret at the NX page, so that only NX makes the call fault. */
	const std::uint8_t ret = 0xc3;
	g.write_gva(nx, &ret, 1);
	Vcpu &v = g.add_vcpu(guest_vectors_and_error_codes, ro, nx);
	g.run_to_done(v);
}

static void guest_int3_breakpoint(void)
{
	struct virtkit_exception ex = {};

	GUEST_ASSERT_EQ(guest_catch(do_int3, 0, &ex), BP_VECTOR + 1);
	/* #BP is a trap: the saved RIP is after the INT3. */
	GUEST_ASSERT_EQ(ex.rip, (std::uint64_t)do_int3 + 1);
	GUEST_DONE();
}

/*
 * INT3 raises #BP in the guest. Some KVMs send the instruction to their
 * emulator, which cannot run it (kvm_pvm: KVM_EXIT_INTERNAL_ERROR).
 */
VK_TEST(exception_int3_breakpoint)
{
	TEST_REQUIRE_PROBE(platform::guest_int3(vkt::kvm()), "INT3 raising #BP in a guest");
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_int3_breakpoint);
	g.run_to_done(v);
}
