// SPDX-License-Identifier: MIT
/*
 * A guest-environment consumer: guest code as an ordinary function of this
 * program, run in a real KVM guest by virtkit::x86::GuestVm, built against
 * an installed libvirtkit-dev with `pkg-config virtkit-guest` (its variable
 * guest_cflags holds the guest-code flags; its Libs link the static libraries
 * into a non-PIE executable: GuestVm loads the program's own pages into the
 * guest).
 */
#include <virtkit/x86/guest.h>
#include <virtkit/x86/guest_vm.hpp>

#include <cstdio>
#include <exception>

/* In the guest: the sum 1 + ... + n, reported with a ucall. */
static void guest_sum(uint64_t n)
{
	uint64_t sum = 0;
	for (uint64_t k = 1; k <= n; k++)
		sum += k;
	GUEST_SYNC(sum);
	GUEST_ASSERT_EQ(sum, n * (n + 1) / 2);
}

int main()
{
	try {
		auto sys = virtkit::System::open();
		virtkit::x86::GuestVm g(sys);
		auto &v = g.add_vcpu(guest_sum, 100);
		auto uc = g.run(v);
		if (uc.kind != virtkit::x86::Ucall::Kind::sync || uc.args.at(0) != 5050) {
			std::fprintf(stderr, "guest-code: %s, expected GUEST_SYNC(5050)\n",
				     uc.describe().c_str());
			return 1;
		}
		g.run_to_done(v);
		std::printf("the guest summed 1..100: %llu\n",
			    static_cast<unsigned long long>(uc.args.at(0)));
	} catch (const std::exception &e) {
		std::fprintf(stderr, "guest-code: %s\n", e.what());
		return 1;
	}
	std::printf("consumer: ok\n");
	return 0;
}
