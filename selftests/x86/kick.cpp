// SPDX-License-Identifier: MIT
/*
 * Vcpu::kick(): a vCPU spinning in the guest is interrupted from another
 * thread and run() returns InterruptedExit; kicks are never lost (a kick
 * before run() makes run() return at once) and never spurious (the next
 * run() enters the guest again), also when the vCPU thread blocks the kick
 * signal.
 */
#include "test.hpp"

#include <virtkit/x86/guest_vm.hpp>

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <thread>

using namespace virtkit;
using namespace virtkit::x86;

static volatile std::uint64_t stop_spinning;
static volatile std::uint64_t spins;

static void guest_spin(void)
{
	for (;;) {
		while (!stop_spinning)
			spins = spins + 1;
		GUEST_SYNC(spins);
		stop_spinning = 0;
	}
}

static void set_stop(GuestVm &g)
{
	const std::uint64_t one = 1;
	g.write_gva(reinterpret_cast<std::uint64_t>(&stop_spinning), &one, sizeof(one));
}

static std::uint64_t read_spins(GuestVm &g)
{
	std::uint64_t n;
	g.read_gva(reinterpret_cast<std::uint64_t>(&spins), &n, sizeof(n));
	return n;
}

/* Kick v from another thread after delay; return the exit run() gave. */
static Exit run_and_kick(Vcpu &v, std::chrono::milliseconds delay)
{
	std::thread kicker([&] {
		std::this_thread::sleep_for(delay);
		v.kick();
	});
	Exit e = v.run();
	kicker.join();
	return e;
}

VK_TEST(kick_interrupts_spinning_guest)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_spin);
	Exit e = run_and_kick(v, std::chrono::milliseconds(200));
	TEST_ASSERT(std::holds_alternative<InterruptedExit>(e), "got %s", describe(e).c_str());
	/* The guest really ran before the kick. */
	std::uint64_t before = read_spins(g);
	TEST_ASSERT(before > 0);
	/* Resume: the guest continues where it was and finishes on request. */
	set_stop(g);
	Ucall uc = g.run(v);
	TEST_ASSERT(uc.kind == Ucall::Kind::sync);
	TEST_ASSERT(uc.args[0] >= before);
}

VK_TEST(kick_before_run_is_not_lost)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_spin);
	v.kick();
	Exit e = v.run();
	TEST_ASSERT(std::holds_alternative<InterruptedExit>(e), "got %s", describe(e).c_str());
	TEST_ASSERT_EQ(read_spins(g), 0);
	/* Consumed: the next run enters the guest. */
	set_stop(g);
	TEST_ASSERT(g.run(v).kind == Ucall::Kind::sync);
}

VK_TEST(kick_races_never_lose_or_repeat)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_spin);
	/* Kicks land before, during and right after entering the guest. */
	for (int i = 0; i < 40; i++) {
		Exit e = run_and_kick(v, std::chrono::milliseconds(i % 4 == 0 ? 0 : i % 7));
		TEST_ASSERT(std::holds_alternative<InterruptedExit>(e), "round %d: %s", i,
			    describe(e).c_str());
	}
	set_stop(g);
	TEST_ASSERT(g.run(v).kind == Ucall::Kind::sync);
}

VK_TEST(kick_works_with_signal_blocked_in_vcpu_thread)
{
	GuestVm g(vkt::kvm());
	Vcpu &v = g.add_vcpu(guest_spin);
	std::atomic<int> step{0};
	std::string failure;
	std::thread vcpu_thread([&] {
		/* A VMM that blocks every signal in its vCPU threads. */
		sigset_t all;
		sigfillset(&all);
		pthread_sigmask(SIG_BLOCK, &all, nullptr);
		try {
			Exit e = v.run();
			if (!std::holds_alternative<InterruptedExit>(e))
				failure = "first run: " + describe(e);
			step = 1;
			while (step != 2)
				std::this_thread::yield();
			/* No stale kick: this run reaches the guest's SYNC. */
			if (g.run(v).kind != Ucall::Kind::sync)
				failure = "second run did not sync";
		} catch (const std::exception &ex) {
			failure = ex.what();
		}
		step = 3;
	});
	std::this_thread::sleep_for(std::chrono::milliseconds(200));
	v.kick();
	while (step != 1 && failure.empty())
		std::this_thread::yield();
	set_stop(g);
	step = 2;
	vcpu_thread.join();
	TEST_ASSERT(failure.empty(), "%s", failure.c_str());
}
