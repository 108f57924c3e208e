// SPDX-License-Identifier: MIT
/*
 * Several vCPUs per VM, each run from its own thread: per-vCPU identity and
 * arguments, shared guest memory with atomic updates, and vCPUs handing a
 * token around through guest memory while the host runs them in parallel.
 */
#include "test.hpp"

#include <virtkit/x86/guest_vm.hpp>

#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

/* Run fn(i) on n threads and rethrow the first failure on this thread. */
template <class Fn> static void on_threads(unsigned n, Fn fn)
{
	std::mutex mu;
	std::exception_ptr first;
	std::vector<std::thread> threads;
	for (unsigned i = 0; i < n; i++)
		threads.emplace_back([&, i] {
			try {
				fn(i);
			} catch (...) {
				std::lock_guard lock(mu);
				if (!first)
					first = std::current_exception();
			}
		});
	for (auto &t : threads)
		t.join();
	if (first)
		std::rethrow_exception(first);
}

static void guest_identity(std::uint64_t arg)
{
	GUEST_SYNC(guest_vcpu_id(), arg, guest_percpu()->self);
}

VK_TEST(vcpus_have_own_ids_args_and_percpu)
{
	GuestVm g(vkt::kvm());
	const unsigned n = 4;
	for (unsigned i = 0; i < n; i++)
		g.add_vcpu(guest_identity, 100 + i);
	TEST_ASSERT_EQ(g.vcpu_count(), n);
	std::vector<Ucall> got(n);
	on_threads(n, [&](unsigned i) { got[i] = g.run(g.vcpu(i)); });
	for (unsigned i = 0; i < n; i++) {
		TEST_ASSERT_EQ(got[i].args[0], i);
		TEST_ASSERT_EQ(got[i].args[1], 100 + i);
		for (unsigned j = 0; j < i; j++)
			TEST_ASSERT(got[i].args[2] != got[j].args[2], "vcpus %u and %u share %%gs", i, j);
	}
	on_threads(n, [&](unsigned i) { g.run_to_done(g.vcpu(i)); });
}

static std::uint64_t shared_counter;

static void guest_increment(std::uint64_t n)
{
	for (std::uint64_t i = 0; i < n; i++)
		__atomic_fetch_add(&shared_counter, 1, __ATOMIC_SEQ_CST);
	GUEST_SYNC(n);
}

VK_TEST(vcpus_share_memory_atomically)
{
	GuestVm g(vkt::kvm());
	const unsigned n = 2;
	const std::uint64_t per_vcpu = 20000;
	for (unsigned i = 0; i < n; i++)
		g.add_vcpu(guest_increment, per_vcpu);
	on_threads(n, [&](unsigned i) { g.run(g.vcpu(i)); });
	std::uint64_t total = 0;
	g.read_gva(reinterpret_cast<std::uint64_t>(&shared_counter), &total, sizeof(total));
	TEST_ASSERT_EQ(total, n * per_vcpu);
}

static volatile std::uint64_t token;

/* vCPU `me` waits for the token to be `me`, passes it to the next vCPU. */
static void guest_ping_pong(std::uint64_t me, std::uint64_t nvcpus, std::uint64_t rounds)
{
	for (std::uint64_t r = 0; r < rounds; r++) {
		while (token % nvcpus != me)
			guest_pause();
		token = token + 1;
	}
	GUEST_SYNC(me);
}

VK_TEST(vcpus_run_concurrently)
{
	/* Each vCPU can only finish if the others run at the same time. */
	GuestVm g(vkt::kvm());
	const unsigned n = 3;
	const std::uint64_t rounds = 100;
	for (unsigned i = 0; i < n; i++)
		g.add_vcpu(guest_ping_pong, i, n, rounds);
	on_threads(n, [&](unsigned i) { TEST_ASSERT_EQ(g.run(g.vcpu(i)).args[0], i); });
	std::uint64_t t = 0;
	g.read_gva(reinterpret_cast<std::uint64_t>(&token), &t, sizeof(t));
	TEST_ASSERT_EQ(t, n * rounds);
}

VK_TEST(exit_handlers_run_on_each_vcpu_thread)
{
	GuestVm g(vkt::kvm());
	const unsigned n = 3;
	std::mutex mu;
	std::vector<std::thread::id> seen(n);
	auto reg = g.vm().add_exit_handler([&](Vcpu &v, Exit &) {
		std::lock_guard lock(mu);
		seen[v.id()] = std::this_thread::get_id();
		return ExitAction::pass;
	});
	for (unsigned i = 0; i < n; i++)
		g.add_vcpu(guest_identity, i);
	std::vector<std::thread::id> runner(n);
	on_threads(n, [&](unsigned i) {
		runner[i] = std::this_thread::get_id();
		g.run(g.vcpu(i));
	});
	for (unsigned i = 0; i < n; i++)
		TEST_ASSERT(seen[i] == runner[i], "vcpu %u's handler ran on another thread", i);
}
