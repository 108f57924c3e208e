// SPDX-License-Identifier: MIT
/*
 * VIRTKIT_VCPU_RUN: its arguments, that it runs a real guest as KVM_RUN
 * does (exits, EINTR for immediate_exit and signals), and the fast path -
 * guest writes to protected pages of read-only memslots that touch only
 * writable sub-pages are completed in the kernel, everything else comes
 * back to userspace untouched. The fast path never performs a denied
 * write, also while another thread changes the maps.
 *
 * The memslot layout is made here by hand: the protected pages are one
 * read-only region (the VMM's mapping of it stays writable), the kernel's
 * table gets the maps through the raw SPP ioctls, and the vCPU runs with
 * VIRTKIT_VCPU_RUN directly, dropping the writes that come back (as ROM).
 */
#include "kmod_util.hpp"

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <thread>

using namespace kmt;
using namespace virtkit;
using namespace virtkit::x86;

/* ---- guest code ---- */

asm(".pushsection .text\n"
    /* kst_store16(dst, src): a 16-byte SSE store. */
    ".globl kst_store16\n"
    "kst_store16:\n"
    "	movups (%rsi), %xmm0\n"
    "	movups %xmm0, (%rdi)\n"
    "	ret\n"
    /* kst_rep_stosb(dst, count, byte) */
    ".globl kst_rep_stosb\n"
    "kst_rep_stosb:\n"
    "	mov %rdx, %rax\n"
    "	mov %rsi, %rcx\n"
    "	cld\n"
    "	rep stosb\n"
    "	ret\n"
    ".popsection\n");
extern "C" void kst_store16(u64 dst, const void *src);
extern "C" void kst_rep_stosb(u64 dst, u64 count, u64 byte);

static void store8(u64 a, u64 v) { *(volatile u64 *)a = v; }

static void guest_basic(u64 allowed, u64 denied, u64 n)
{
	for (u64 i = 0; i < n; i++)
		store8(allowed + 8 * (i % 16), i + 1);
	GUEST_SYNC(1);
	store8(denied, 0xdeadbeefull);
	GUEST_SYNC(2);
}

static void guest_like_kvm_run(u64 mmio, u64 ro)
{
	guest_outb(0x80, 0x5a);
	GUEST_SYNC(7, 8);
	u64 v = *(volatile u64 *)mmio;
	*(volatile u32 *)(mmio + 8) = 0xc0ffee;
	store8(ro, 0x1234);
	GUEST_SYNC(v);
}

/* The i-th write of guest_sizes: a store of len 8 or 16 at addr. */
struct SizeCase {
	u64 addr;
	unsigned len;
	bool allowed;		/* every byte in writable sub-pages */
	unsigned user_exits;	/* MMIO exits that come back when denied */
	const char *what;
};
/*
 * Maps: page 0 denies sub-page 4, page 1 denies sub-page 10, page 2
 * denies sub-page 0.
 */
static const SizeCase size_cases[] = {
	{page(0) + 3, 8, true, 0, "unaligned 8 bytes"},
	{page(0) + 2 * 128 + 5, 16, true, 0, "unaligned 16 bytes"},
	{page(0) + 6 * 128, 16, true, 0, "aligned 16 bytes"},
	{page(0) + 4 * 128 - 4, 8, false, 1, "8 bytes over allowed|denied sub-pages"},
	{page(0) + 5 * 128 - 8, 16, false, 2, "16 bytes over denied|allowed sub-pages"},
	{page(0) + 4 * 128 + 64, 8, false, 1, "8 bytes inside a denied sub-page"},
	{page(0) + 4096 - 4, 8, true, 0, "8 bytes over two pages, both allowed"},
	{page(0) + 4096 - 8, 16, true, 0, "16 bytes over two pages, 8 + 8"},
	{page(0) + 4096 - 12, 16, true, 0, "16 bytes over two pages, 12 + 4"},
	{page(1) + 4096 - 4, 8, false, 2, "8 bytes over two pages, the second denied"},
	{page(1) + 10 * 128 - 2, 8, false, 1, "8 bytes into page 1's denied sub-page"},
	{page(1) + 4096 - 6, 16, false, 3, "16 bytes over two pages (6 + 10), the second denied"},
};
static constexpr u64 n_size_cases = sizeof(size_cases) / sizeof(size_cases[0]);

static void guest_sizes(const SizeCase *cases, u64 n)
{
	for (u64 i = 0; i < n; i++) {
		u64 data[2] = {0x1111111111111111ull * (i + 1), 0x0101010101010101ull * (i + 0x80)};
		if (cases[i].len == 8)
			store8(cases[i].addr, data[0]);
		else
			kst_store16(cases[i].addr, data);
		GUEST_SYNC(i);
	}
}

static void guest_stosb(u64 dst, u64 count, u64 byte)
{
	kst_rep_stosb(dst, count, byte);
	GUEST_SYNC(3);
}

static void guest_hammer(u64 addr, u64 stop)
{
	u64 i = 1;
	while (!*(volatile u64 *)stop)
		store8(addr, i++);
	GUEST_SYNC(i);
}

static void guest_spin(u64 stop)
{
	while (!*(volatile u64 *)stop)
		__asm__ volatile("pause");
	GUEST_SYNC(5);
}

/* ---- tests ---- */

VK_TEST(vcpu_run_bad_arguments)
{
	require_module();
	FastGuest t;
	Vcpu &v = t.g.add_vcpu(guest_spin, ctl_gpa);
	expect_only_own_vcpus("VCPU_RUN", t.dev.get(), t.vk.get(), t.g.vm().fd(), v.fd(),
			      [](int vk, int fd) { return vcpu_run(vk, fd); });
	virtkit_vcpu_run a{};
	a.vcpu_fd = v.fd();
	for (u32 f : {1u, 0x80000000u}) {
		a.flags = f;
		EXPECT_ERRNO(sys_ioctl(t.vk.get(), VIRTKIT_VCPU_RUN, &a), EINVAL);
	}
	a.flags = 0;
	for (int i = 0; i < 3; i++) {
		a.reserved[i] = 1;
		EXPECT_ERRNO(sys_ioctl(t.vk.get(), VIRTKIT_VCPU_RUN, &a), EINVAL);
		a.reserved[i] = 0;
	}
	for (unsigned long p : {0ul, 1ul, 0xffff888000000000ul})
		EXPECT_ERRNO(sys_ioctl(t.vk.get(), VIRTKIT_VCPU_RUN, p), EFAULT);
	/* None of it ran the guest: it is still at its first instruction. */
	t.g.memory().write_obj<u64>(ctl_gpa, 1);
	GuestRunner r(t.g, v, t.vk.get());
	TEST_ASSERT_EQ(r.until_ucall().args[0], 5u);
}

VK_TEST(runs_like_kvm_run)
{
	require_module();
	/* Without SPP_ENABLE: exactly KVM_RUN. */
	for (bool enable : {false, true}) {
		FastGuest t(enable);
		Vcpu &v = t.g.add_vcpu(guest_like_kvm_run, mmio_gpa, page(0));
		GuestRunner r(t.g, v, t.vk.get());
		TEST_ASSERT_EQ(vcpu_run(t.vk.get(), v.fd()), 0);
		TEST_ASSERT_EQ(r.run->exit_reason, KVM_EXIT_IO);
		TEST_ASSERT_EQ(r.run->io.port, 0x80);
		TEST_ASSERT_EQ(r.run->io.direction, KVM_EXIT_IO_OUT);
		TEST_ASSERT_EQ(*(reinterpret_cast<u8 *>(r.run) + r.run->io.data_offset), 0x5a);
		auto uc = r.until_ucall();
		TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.size() == 2 && uc.args[0] == 7 &&
			    uc.args[1] == 8);
		/* An MMIO read completed by userspace, an MMIO write, a ROM write. */
		std::vector<std::pair<u64, bool>> seen;
		r.on_mmio = [&](const kvm_run &run) {
			seen.emplace_back(run.mmio.phys_addr, run.mmio.is_write);
			if (!run.mmio.is_write) {
				u64 v64 = 0x1122334455667788ull;
				std::memcpy(r.run->mmio.data, &v64, run.mmio.len);
			}
		};
		uc = r.until_ucall();
		TEST_ASSERT_EQ(uc.args[0], 0x1122334455667788ull);
		TEST_ASSERT_EQ(seen.size(), 3u);
		TEST_ASSERT(seen[0] == std::make_pair(mmio_gpa, false));
		TEST_ASSERT(seen[1] == std::make_pair(mmio_gpa + 8, true));
		TEST_ASSERT(seen[2] == std::make_pair(page(0), true));
		TEST_ASSERT_EQ(t.read64(page(0)), 0u);
		if (enable) {
			/* No map: none of these was the fast path's. */
			auto s = t.st();
			TEST_ASSERT_EQ(s.fast_writes, 0u);
			TEST_ASSERT_EQ(s.user_exits, 0u);
		}
		/* Plain KVM_RUN still works on the same vCPU afterwards. */
		t.g.set_entry(v, guest_spin, ctl_gpa);
		t.g.memory().write_obj<u64>(ctl_gpa, 1);
		TEST_ASSERT_EQ(t.g.run(v).args[0], 5u);
	}
}

VK_TEST(immediate_exit_and_signals_are_eintr)
{
	require_module();
	FastGuest t;
	Vcpu &v = t.g.add_vcpu(guest_spin, ctl_gpa);
	GuestRunner r(t.g, v, t.vk.get());
	r.run->immediate_exit = 1;
	EXPECT_ERRNO(vcpu_run(t.vk.get(), v.fd()), EINTR);
	EXPECT_ERRNO(vcpu_run(t.vk.get(), v.fd()), EINTR);
	r.run->immediate_exit = 0;

	/* A signal while the guest spins (also with protection set up). */
	t.protect(page(0), deny(3));
	struct sigaction sa {};
	sa.sa_handler = [](int) {};
	sigemptyset(&sa.sa_mask);
	TEST_ASSERT(sigaction(SIGUSR1, &sa, nullptr) == 0); /* no SA_RESTART */
	std::atomic<bool> back{false};
	pthread_t self = pthread_self();
	std::thread kicker([&] {
		while (!back.load()) {
			pthread_kill(self, SIGUSR1);
			std::this_thread::sleep_for(std::chrono::milliseconds(20));
		}
	});
	long rc = vcpu_run(t.vk.get(), v.fd());
	back = true;
	kicker.join();
	TEST_ASSERT(rc == -EINTR, "VCPU_RUN with a signal: %s", result_name(rc).c_str());
	TEST_ASSERT_EQ(r.run->exit_reason, KVM_EXIT_INTR);
	/* The guest continues where it was. */
	t.g.memory().write_obj<u64>(ctl_gpa, 1);
	TEST_ASSERT_EQ(r.until_ucall().args[0], 5u);
}

VK_TEST(allowed_writes_stay_in_the_kernel)
{
	require_module();
	FastGuest t;
	constexpr u64 n = 200;
	t.protect(page(0), deny(1));
	const u64 allowed = page(0), denied = page(0) + 128 + 8;
	Vcpu &v = t.g.add_vcpu(guest_basic, allowed, denied, n);
	GuestRunner r(t.g, v, t.vk.get());
	TEST_ASSERT_EQ(r.until_ucall().args[0], 1u);
	TEST_ASSERT_EQ(r.mmio_exits, 0u);
	auto s = t.st();
	TEST_ASSERT_EQ(s.fast_writes, n);
	TEST_ASSERT_EQ(s.user_exits, 0u);
	for (u64 j = 0; j < 16; j++) {
		u64 last = n - 1 - ((n - 1 - j) % 16); /* the last i with i % 16 == j */
		TEST_ASSERT_EQ(t.read64(allowed + 8 * j), last + 1);
	}

	/* The denied write comes back, not performed. */
	struct Seen {
		u64 gpa, data, mem;
		u32 len;
	};
	std::vector<Seen> seen;
	r.on_mmio = [&](const kvm_run &run) {
		u64 d = 0;
		std::memcpy(&d, run.mmio.data, run.mmio.len);
		seen.push_back({run.mmio.phys_addr, d, t.read64(denied), run.mmio.len});
	};
	TEST_ASSERT_EQ(r.until_ucall().args[0], 2u);
	TEST_ASSERT_EQ(seen.size(), 1u);
	TEST_ASSERT_EQ(seen[0].gpa, denied);
	TEST_ASSERT_EQ(seen[0].len, 8u);
	TEST_ASSERT_EQ(seen[0].data, 0xdeadbeefull);
	TEST_ASSERT_EQ(seen[0].mem, 0u);
	TEST_ASSERT_EQ(t.read64(denied), 0u);
	s = t.st();
	TEST_ASSERT_EQ(s.fast_writes, n);
	TEST_ASSERT_EQ(s.user_exits, 1u);
}

VK_TEST(only_protected_readonly_pages_are_fast)
{
	require_module();
	FastGuest t;
	/* Page 2 of the read-only region has no map; the RAM page has one. */
	t.protect(ram_gpa, 0u);
	t.protect(page(0), deny(31));
	Vcpu &v = t.g.add_vcpu(guest_basic, ram_gpa, page(2), 5);
	GuestRunner r(t.g, v, t.vk.get());
	/* RAM is written by KVM itself: no exit, no counter. */
	TEST_ASSERT_EQ(r.until_ucall().args[0], 1u);
	TEST_ASSERT_EQ(r.mmio_exits, 0u);
	TEST_ASSERT_EQ(t.read64(ram_gpa), 1u);
	/* A read-only page without a map is userspace's: back, no counter. */
	TEST_ASSERT_EQ(r.until_ucall().args[0], 2u);
	TEST_ASSERT_EQ(r.mmio_exits, 1u);
	TEST_ASSERT_EQ(t.read64(page(2)), 0u);
	auto s = t.st();
	TEST_ASSERT_EQ(s.fast_writes, 0u);
	TEST_ASSERT_EQ(s.user_exits, 0u);

	/* Protection removed (all writable): no longer the fast path's. */
	t.protect(page(0), ALL);
	t.g.set_entry(v, guest_basic, page(0), page(0) + 4000, 3);
	TEST_ASSERT_EQ(r.until_ucall().args[0], 1u);
	TEST_ASSERT_EQ(r.mmio_exits, 4u);
	TEST_ASSERT_EQ(t.read64(page(0)), 0u);
	TEST_ASSERT_EQ(t.st().fast_writes, 0u);
}

VK_TEST(write_sizes_and_straddles)
{
	require_module();
	FastGuest t;
	t.protect(page(0), deny(4));
	t.protect(page(1), deny(10));
	t.protect(page(2), deny(0));
	/* The cases, in RAM the guest reads. */
	u64 cases_gpa = ctl_gpa + 1024;
	t.g.memory().write(cases_gpa, std::as_bytes(std::span(size_cases)));
	Vcpu &v = t.g.add_vcpu(guest_sizes, cases_gpa, n_size_cases);
	GuestRunner r(t.g, v, t.vk.get());
	std::vector<std::byte> before(3 * 4096), after(3 * 4096), seen_mem(3 * 4096);
	bool mem_changed_at_exit = false;
	r.on_mmio = [&](const kvm_run &) {
		t.g.memory().read(page(0), seen_mem);
		mem_changed_at_exit |= seen_mem != before;
	};
	for (u64 i = 0; i < n_size_cases; i++) {
		const SizeCase &c = size_cases[i];
		t.g.memory().read(page(0), before);
		auto s0 = t.st();
		u64 exits0 = r.mmio_exits;
		mem_changed_at_exit = false;
		TEST_ASSERT_EQ(r.until_ucall().args[0], i);
		t.g.memory().read(page(0), after);
		auto s1 = t.st();
		u64 exits = r.mmio_exits - exits0;
		u64 data[2] = {0x1111111111111111ull * (i + 1), 0x0101010101010101ull * (i + 0x80)};
		std::vector<std::byte> want = before;
		if (c.allowed)
			std::memcpy(want.data() + (c.addr - page(0)), data, c.len);
		TEST_ASSERT(after == want, "case %llu (%s): memory %s", (unsigned long long)i, c.what,
			    c.allowed ? "not written as expected" : "changed by a denied write");
		TEST_ASSERT(!mem_changed_at_exit, "case %llu (%s): memory changed before the exit",
			    (unsigned long long)i, c.what);
		TEST_ASSERT(exits == (c.allowed ? 0 : c.user_exits),
			    "case %llu (%s): %llu MMIO exits came back", (unsigned long long)i, c.what,
			    (unsigned long long)exits);
		TEST_ASSERT(s1.fast_writes - s0.fast_writes == (c.allowed ? 1u : 0u),
			    "case %llu (%s): fast_writes +%llu", (unsigned long long)i, c.what,
			    (unsigned long long)(s1.fast_writes - s0.fast_writes));
		TEST_ASSERT(s1.user_exits - s0.user_exits == (c.allowed ? 0u : 1u),
			    "case %llu (%s): user_exits +%llu", (unsigned long long)i, c.what,
			    (unsigned long long)(s1.user_exits - s0.user_exits));
	}
}

VK_TEST(rep_stosb_stops_at_the_denied_subpage)
{
	require_module();
	FastGuest t;
	constexpr unsigned denied_sp = 20;
	const u64 p = page(3), start = p + denied_sp * 128;
	t.protect(p, deny(denied_sp));
	Vcpu &v = t.g.add_vcpu(guest_stosb, p, 4096, 0xab);
	GuestRunner r(t.g, v, t.vk.get());
	std::vector<u8> first(4096);
	std::vector<u64> gpas;
	virtkit_spp_stats at_first{};
	r.on_mmio = [&](const kvm_run &run) {
		if (gpas.empty()) {
			t.g.memory().read(p, std::as_writable_bytes(std::span(first)));
			at_first = t.st();
		}
		gpas.push_back(run.mmio.phys_addr);
	};
	TEST_ASSERT_EQ(r.until_ucall().args[0], 3u);
	TEST_ASSERT(!gpas.empty());
	/* The first exit is the first byte of the denied sub-page, nothing past it written. */
	TEST_ASSERT_EQ(gpas[0], start);
	for (unsigned i = 0; i < 4096; i++)
		TEST_ASSERT(first[i] == (i < denied_sp * 128 ? 0xab : 0),
			    "byte %u is 0x%x at the first exit", i, first[i]);
	vkt::diag("fast writes before the denied sub-page: %llu; exits that came back: %zu",
		  (unsigned long long)at_first.fast_writes, gpas.size());
	TEST_ASSERT(at_first.fast_writes >= 1 && at_first.fast_writes <= denied_sp * 128);
	/* Every exit that came back is inside the denied sub-page. */
	for (auto g : gpas)
		TEST_ASSERT(g >= start && g < start + 128, "exit at 0x%llx", (unsigned long long)g);
	/* At the end: everything but the denied sub-page. */
	std::vector<u8> end(4096);
	t.g.memory().read(p, std::as_writable_bytes(std::span(end)));
	for (unsigned i = 0; i < 4096; i++)
		TEST_ASSERT(end[i] == (i / 128 == denied_sp ? 0 : 0xab), "byte %u is 0x%x", i, end[i]);
}

VK_TEST(no_write_lands_after_deny_returns)
{
	require_module();
	FastGuest t;
	const u64 target = page(0) + 16;
	const u32 allow_map = deny(31), deny_map = deny(0) & deny(31);
	t.protect(page(0), allow_map);
	Vcpu &v = t.g.add_vcpu(guest_hammer, target, ctl_gpa);
	GuestRunner r(t.g, v, t.vk.get());
	std::atomic<u64> exits{0};
	r.on_mmio = [&](const kvm_run &run) {
		if (run.mmio.phys_addr == target)
			exits++;
	};
	std::string error;
	unsigned rounds = 0, landed_writes = 0;
	std::thread toggler([&] {
		auto wait_for = [&](auto cond) {
			auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
			while (!cond()) {
				if (std::chrono::steady_clock::now() > until)
					return false;
				std::this_thread::yield();
			}
			return true;
		};
		try {
			for (rounds = 0; rounds < 40 && error.empty(); rounds++) {
				/* Allowed: writes land in the kernel. */
				u64 v0 = t.read64(target);
				if (spp_set(t.vk.get(), page(0) / 4096, 1, &allow_map) != 0)
					error = "SET allow failed";
				else if (!wait_for([&] { return t.read64(target) > v0 + 2; }))
					error = "the allowed writes do not land";
				if (!error.empty())
					break;
				/* Denied: from the moment SET returns, nothing lands. */
				if (spp_set(t.vk.get(), page(0) / 4096, 1, &deny_map) != 0) {
					error = "SET deny failed";
					break;
				}
				u64 v1 = t.read64(target), e1 = exits.load();
				if (!wait_for([&] { return exits.load() > e1 + 3; }))
					error = "the denied writes do not come back";
				u64 v2 = t.read64(target);
				if (v2 != v1) {
					landed_writes++;
					error = vkt::format("round %u: value 0x%llx -> 0x%llx after the "
							    "SET that denied it returned",
							    rounds, (unsigned long long)v1,
							    (unsigned long long)v2);
				}
			}
		} catch (...) {
			error = "exception in the toggler";
		}
		t.g.memory().write_obj<u64>(ctl_gpa, 1);
	});
	u64 last = 0;
	try {
		last = r.until_ucall().args[0];
	} catch (...) {
		t.g.memory().write_obj<u64>(ctl_gpa, 1);
		toggler.join();
		throw;
	}
	toggler.join();
	auto s = t.st();
	vkt::diag("%u rounds, %llu guest writes, %llu fast, %llu came back", rounds,
		  (unsigned long long)last, (unsigned long long)s.fast_writes,
		  (unsigned long long)s.user_exits);
	TEST_ASSERT(error.empty(), "%s", error.c_str());
	TEST_ASSERT_EQ(landed_writes, 0u);
	TEST_ASSERT_EQ(rounds, 40u);
	/* Every guest write either landed in the kernel or came back. */
	TEST_ASSERT_EQ(s.fast_writes + r.mmio_exits, last - 1);
	TEST_ASSERT_EQ(s.user_exits, r.mmio_exits);
}
