// SPDX-License-Identifier: MIT
/*
 * Locked read-modify-writes on the writable sub-pages of a protected page
 * stay atomic: two vCPUs hammer the same words with lock inc, lock xadd,
 * xchg, lock cmpxchg, lock bts and lock cmpxchg8b - counters and
 * spinlocks as a guest kernel keeps them next to data a security tool
 * protects. KVM emulates such an instruction on a page whose writes trap as
 * a read followed later by a plain write; without help from sub-page
 * protection, increments are lost and a failed compare writes back a stale
 * value (a spinlock then deadlocks). Every count must come out exact, every
 * run end within its bound, and the protected half of the page stay
 * unchanged with no violation reported.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t base = 0x40000000;
static constexpr std::uint64_t page = 4096;
/* Sub-pages 0..15 writable, 16..31 protected. */
static constexpr std::uint32_t half_map = 0x0000ffffu;
static constexpr std::uint64_t protected_half = base + 2048;

/* The words the vCPUs share, one cache line apart, in the writable half. */
static constexpr std::uint64_t lock_word = base + 0x100;
static constexpr std::uint64_t counter = base + 0x140;
static constexpr std::uint64_t sum_word = base + 0x180;

enum Kind : std::uint64_t {
	lock_incl,
	lock_xaddq,
	lock_addw,
	xchg_spinlock,
	cmpxchg_spinlock,
	bts_spinlock,
	cmpxchg8b_counter,
	lock_xaddl_r9d,
};

static const char *kind_name(std::uint64_t k)
{
	static const char *const names[] = {"lock incl",	"lock xaddq",	  "lock addw",
					    "xchg spinlock",	"cmpxchg spinlock", "lock bts spinlock",
					    "lock cmpxchg8b counter", "lock xaddl %r9d"};
	return names[k];
}

static void spin_lock(std::uint64_t kind)
{
	volatile std::uint64_t *l = (volatile std::uint64_t *)lock_word;
	for (;;) {
		std::uint64_t busy = 1;
		if (kind == xchg_spinlock) {
			asm volatile("xchg %0, %1" : "+r"(busy), "+m"(*l) : : "memory");
		} else if (kind == cmpxchg_spinlock) {
			std::uint64_t expected = 0;
			asm volatile("lock cmpxchg %2, %1"
				     : "+a"(expected), "+m"(*l)
				     : "r"(busy)
				     : "memory", "cc");
			busy = expected;
		} else {
			std::uint8_t was;
			asm volatile("lock btsq $0, %1; setc %0"
				     : "=r"(was), "+m"(*l)
				     : : "memory", "cc");
			busy = was;
		}
		if (!busy)
			return;
		while (*l)
			guest_pause();
	}
}

static void guest_hammer(std::uint64_t kind, std::uint64_t iters)
{
	volatile std::uint64_t *c = (volatile std::uint64_t *)counter;
	std::uint64_t sum = 0;

	for (std::uint64_t i = 0; i < iters; i++) {
		switch (kind) {
		case lock_incl:
			asm volatile("lock incl %0" : "+m"(*(volatile std::uint32_t *)counter)
				     : : "memory", "cc");
			break;
		case lock_xaddq: {
			std::uint64_t v = 1;
			asm volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*c) : : "memory", "cc");
			sum += v; /* the values handed out: 0 .. 2 * iters - 1, once each */
			break;
		}
		case lock_xaddl_r9d: {
			/*
			 * REX.R names r9d: without its REX byte the same
			 * bytes read as an xadd of %ecx, as long.
			 */
			std::uint32_t v;
			asm volatile("mov $1, %%r9d\n\t"
				     "lock xaddl %%r9d, %1\n\t"
				     "mov %%r9d, %0"
				     : "=r"(v), "+m"(*(volatile std::uint32_t *)counter)
				     : : "r9", "memory", "cc");
			sum += v;
			break;
		}
		case lock_addw:
			asm volatile("lock addw %1, %0"
				     : "+m"(*(volatile std::uint16_t *)counter)
				     : "ri"((std::uint16_t)3)
				     : "memory", "cc");
			break;
		case cmpxchg8b_counter: {
			std::uint32_t lo = (std::uint32_t)*c, hi = (std::uint32_t)(*c >> 32);
			for (;;) {
				std::uint64_t next = ((std::uint64_t)hi << 32 | lo) + 1;
				std::uint8_t ok;
				asm volatile("lock cmpxchg8b %1; sete %0"
					     : "=r"(ok), "+m"(*c), "+a"(lo), "+d"(hi)
					     : "b"((std::uint32_t)next), "c"((std::uint32_t)(next >> 32))
					     : "memory", "cc");
				if (ok)
					break;
			}
			break;
		}
		default:
			spin_lock(kind);
			*c = *c + 1; /* plain: only the lock keeps it exact */
			*(volatile std::uint64_t *)lock_word = 0;
			break;
		}
	}
	if (kind == lock_xaddq || kind == lock_xaddl_r9d)
		__atomic_fetch_add((std::uint64_t *)sum_word, sum, __ATOMIC_SEQ_CST);
	GUEST_SYNC(iters);
}

/*
 * Run two vCPUs through `kind` iters times each; fail (after kicking them)
 * when they do not finish in time: a spinlock whose mutual exclusion broke
 * can deadlock.
 */
static void hammer(std::uint64_t kind, std::uint64_t iters)
{
	GuestVm g(vkt::kvm());
	g.memory().add(base, 2 * page, {.name = "spp-atomic"});
	g.identity_map(base, 2 * page);
	auto &spp = SubpageProtection::enable(g.vm());
	spp.set_access(base / page, {half_map});
	std::vector<std::uint8_t> pattern(2048);
	for (std::size_t k = 0; k < pattern.size(); k++)
		pattern[k] = static_cast<std::uint8_t>(k * 13 + 7);
	g.memory().write(protected_half, std::as_bytes(std::span(pattern)));

	const unsigned n = 2;
	for (unsigned i = 0; i < n; i++)
		g.add_vcpu(guest_hammer, kind, iters);
	const SppStats before = spp.stats();

	std::mutex mu;
	std::exception_ptr first;
	std::atomic<unsigned> finished{0};
	std::vector<std::thread> threads;
	for (unsigned i = 0; i < n; i++)
		threads.emplace_back([&, i] {
			try {
				Ucall uc = g.run(g.vcpu(i));
				TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.at(0) == iters,
					    "vcpu %u: %s", i, uc.describe().c_str());
			} catch (...) {
				std::lock_guard lock(mu);
				if (!first)
					first = std::current_exception();
			}
			finished++;
		});
	const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
	while (finished < n && std::chrono::steady_clock::now() < deadline)
		std::this_thread::sleep_for(std::chrono::milliseconds(5));
	const bool hung = finished < n;
	if (hung)
		for (unsigned i = 0; i < n; i++)
			g.vcpu(i).kick();
	for (auto &t : threads)
		t.join();
	auto c = g.memory().read_obj<std::uint64_t>(counter);
	TEST_ASSERT(!hung, "%s: the vCPUs did not finish in 120 s (lock word 0x%llx, counter %llu)",
		    kind_name(kind),
		    (unsigned long long)g.memory().read_obj<std::uint64_t>(lock_word),
		    (unsigned long long)c);
	if (first)
		std::rethrow_exception(first);

	const std::uint64_t total = n * iters;
	switch (kind) {
	case lock_incl:
		TEST_ASSERT(c == total, "lock incl: counter %llu after %llu increments",
			    (unsigned long long)c, (unsigned long long)total);
		break;
	case lock_addw:
		TEST_ASSERT(c == 3 * total, "lock addw: counter %llu, want %llu",
			    (unsigned long long)c, (unsigned long long)(3 * total));
		break;
	case lock_xaddl_r9d:
	case lock_xaddq: {
		auto sum = g.memory().read_obj<std::uint64_t>(sum_word);
		TEST_ASSERT(c == total, "lock xadd: counter %llu after %llu additions",
			    (unsigned long long)c, (unsigned long long)total);
		TEST_ASSERT(sum == total * (total - 1) / 2,
			    "lock xadd: the old values returned add up to %llu, want %llu",
			    (unsigned long long)sum, (unsigned long long)(total * (total - 1) / 2));
		break;
	}
	default:
		TEST_ASSERT(c == total, "%s: counter %llu after %llu increments", kind_name(kind),
			    (unsigned long long)c, (unsigned long long)total);
	}
	std::vector<std::uint8_t> after(2048);
	g.memory().read(protected_half, std::as_writable_bytes(std::span(after)));
	TEST_ASSERT(after == pattern, "%s: the protected half changed", kind_name(kind));
	const SppStats s = spp.stats();
	TEST_ASSERT_EQ(s.violations - before.violations, 0u);
	TEST_ASSERT(s.allowed_writes - before.allowed_writes >= total,
		    "%s: %llu writes went through sub-page protection, fewer than the %llu "
		    "instructions: the page did not trap",
		    kind_name(kind), (unsigned long long)(s.allowed_writes - before.allowed_writes),
		    (unsigned long long)total);
	vkt::diag("%s: %llu instructions on 2 vCPUs exact, %llu writes checked", kind_name(kind),
		  (unsigned long long)total,
		  (unsigned long long)(s.checked_writes - before.checked_writes));
	for (unsigned i = 0; i < n; i++)
		g.run_to_done(g.vcpu(i));
}

static constexpr std::uint64_t iters = 3000;

VK_TEST(spp_lock_inc_is_atomic) { hammer(lock_incl, iters); }
VK_TEST(spp_lock_xadd_is_atomic) { hammer(lock_xaddq, iters); }
VK_TEST(spp_lock_add_word_is_atomic) { hammer(lock_addw, iters); }
VK_TEST(spp_xchg_spinlock_excludes) { hammer(xchg_spinlock, iters); }
VK_TEST(spp_cmpxchg_spinlock_excludes) { hammer(cmpxchg_spinlock, iters); }
VK_TEST(spp_bts_spinlock_excludes) { hammer(bts_spinlock, iters); }
VK_TEST(spp_cmpxchg8b_counter_is_atomic) { hammer(cmpxchg8b_counter, iters); }
VK_TEST(spp_lock_xadd_of_extended_register_is_atomic) { hammer(lock_xaddl_r9d, iters); }
