// SPDX-License-Identifier: MIT
/* Guest code basics: entry arguments, ucalls, return-as-DONE, globals. */
#include "test.hpp"

#include <virtkit/x86/guest_vm.hpp>

using namespace virtkit;
using namespace virtkit::x86;

static void guest_sync_args(uint64_t a, uint64_t b, uint64_t c)
{
	GUEST_SYNC(a, b, c);
	GUEST_SYNC(a + b + c);
	GUEST_DONE();
}

VK_TEST(guest_sync_and_args)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_sync_args, 1, 2, 0x1234567890ull);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync);
	TEST_ASSERT_EQ(uc.args.size(), 3u);
	TEST_ASSERT_EQ(uc.args[0], 1u);
	TEST_ASSERT_EQ(uc.args[1], 2u);
	TEST_ASSERT_EQ(uc.args[2], 0x1234567890ull);
	uc = g.run(v);
	TEST_ASSERT_EQ(uc.args[0], 0x1234567893ull);
	g.run_to_done(v);
}
