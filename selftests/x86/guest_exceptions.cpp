// SPDX-License-Identifier: MIT
/* Guest exceptions: guest_catch(), installed handlers, unhandled reports. */
#include "test.hpp"

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
