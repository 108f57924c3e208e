// SPDX-License-Identifier: MIT
/*
 * The module under stress of lifetime and concurrency: a VMM killed while
 * its vCPU runs through VIRTKIT_VCPU_RUN, a VM destroyed while attached,
 * and many threads using one per-VM file while its vCPU runs - no leaked
 * reference (the module's and KVM's refcounts return), no error but the
 * expected ones, a consistent final state.
 */
#include "kmod_util.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <mutex>
#include <thread>

using namespace kmt;
using namespace virtkit;
using namespace virtkit::x86;

static void guest_sync_then_hammer(u64 addr, u64 stop)
{
	GUEST_SYNC(1);
	u64 i = 1;
	while (!*(volatile u64 *)stop)
		*(volatile u64 *)addr = i++;
	GUEST_SYNC(i);
}

/*
 * A child process sets up a guest and runs it through VIRTKIT_VCPU_RUN,
 * writing forever to `target` (allowed: in the kernel's loop; denied: back
 * and forth to userspace); the parent kills it mid-run.
 */
static void kill_mid_run(bool denied)
{
	int pfd[2];
	TEST_ASSERT(pipe2(pfd, O_CLOEXEC) == 0);
	pid_t pid = fork();
	TEST_ASSERT(pid >= 0);
	if (pid == 0) {
		close(pfd[0]);
		try {
			FastGuest t;
			t.protect(page(0), denied ? deny(0) : deny(31));
			Vcpu &v = t.g.add_vcpu(guest_sync_then_hammer, page(0) + 8, ctl_gpa);
			GuestRunner r(t.g, v, t.vk.get());
			r.until_ucall();
			(void)!write(pfd[1], "r", 1);
			r.until_ucall();
		} catch (...) {
		}
		_exit(3);
	}
	close(pfd[1]);
	pollfd p{pfd[0], POLLIN, 0};
	char c = 0;
	bool ready = poll(&p, 1, 120000) == 1 && read(pfd[0], &c, 1) == 1;
	close(pfd[0]);
	if (ready)
		usleep(300000); /* let it run a while */
	kill(pid, SIGKILL);
	int status = 0;
	TEST_ASSERT(waitpid(pid, &status, 0) == pid);
	TEST_ASSERT(ready, "the child did not get its guest running");
	TEST_ASSERT(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
		    "the child ended before it was killed (status 0x%x)", status);
}

VK_TEST(vmm_killed_mid_run)
{
	require_module();
	/* Nothing of this process holds the module or KVM yet. */
	const long vk0 = module_refcnt("virtkit"), kvm0 = module_refcnt(kvm_vendor_module());
	for (bool denied : {false, true}) {
		kill_mid_run(denied);
		long vk1 = module_refcnt("virtkit"), kvm1 = module_refcnt(kvm_vendor_module());
		TEST_ASSERT(vk1 == vk0, "virtkit refcnt %ld after the kill, %ld before", vk1, vk0);
		TEST_ASSERT(kvm1 == kvm0, "%s refcnt %ld after the kill, %ld before (VM leaked?)",
			    kvm_vendor_module(), kvm1, kvm0);
	}
	/* Everything still works. */
	FastGuest t;
	t.protect(page(0), deny(31));
	Vcpu &v = t.g.add_vcpu(guest_sync_then_hammer, page(0) + 8, ctl_gpa);
	GuestRunner r(t.g, v, t.vk.get());
	TEST_ASSERT_EQ(r.until_ucall().args[0], 1u);
	t.g.memory().write_obj<u64>(ctl_gpa, 1);
	r.until_ucall();
	TEST_ASSERT_EQ(r.mmio_exits, 0u);
}

VK_TEST(vm_destroyed_while_attached)
{
	require_module();
	vkt::kvm();
	const long vk0 = module_refcnt("virtkit"), kvm0 = module_refcnt(kvm_vendor_module());
	const int fds0 = vkt::open_fd_count();
	FileDesc vk;
	int old_vcpu_fd;
	{
		/* A whole guest: memory, vCPUs; everything but the per-VM fd goes. */
		FastGuest t;
		t.protect(page(0), deny(2));
		Vcpu &v = t.g.add_vcpu(guest_sync_then_hammer, page(0), ctl_gpa);
		GuestRunner r(t.g, v, t.vk.get());
		TEST_ASSERT_EQ(r.until_ucall().args[0], 1u);
		old_vcpu_fd = v.fd();
		vk = std::move(t.vk);
	}
	/* The guest memory is unmapped, its VM fd and vCPUs closed. */
	EXPECT_OK(spp_enable(vk.get()));
	TEST_ASSERT_EQ(get_maps(vk.get(), page(0) / 4096, 1)[0], deny(2));
	std::vector<u32> maps(100, 0u);
	EXPECT_OK(spp_set(vk.get(), page(0) / 4096, maps));
	TEST_ASSERT_EQ(stats(vk.get()).protected_pages, 100u);
	long r = vcpu_run(vk.get(), old_vcpu_fd);
	TEST_ASSERT(r == -EBADF || r == -EINVAL, "VCPU_RUN with a closed vCPU fd: %s",
		    result_name(r).c_str());
	vk.close();
	TEST_ASSERT_EQ(vkt::open_fd_count(), fds0);
	TEST_ASSERT_EQ(module_refcnt("virtkit"), vk0);
	TEST_ASSERT_EQ(module_refcnt(kvm_vendor_module()), kvm0);
}

/* SET/GET/STATS/CHECK from several threads while the vCPU runs. */
VK_TEST(concurrent_ioctls_while_running)
{
	require_module();
	FastGuest t;
	t.protect(page(0), deny(31));
	Vcpu &v = t.g.add_vcpu(guest_sync_then_hammer, page(0) + 8, ctl_gpa);
	GuestRunner r(t.g, v, t.vk.get());
	TEST_ASSERT_EQ(r.until_ucall().args[0], 1u);

	constexpr unsigned nthreads = 4, iters = 2000, own_pages = 256, shared_pages = 64;
	constexpr u64 shared_gfn = 0x900000;
	auto own_gfn = [](unsigned k) { return 0x100000 + u64(k) * 0x40000; };
	std::vector<std::vector<u32>> model(nthreads, std::vector<u32>(own_pages, ALL));
	std::mutex err_lock;
	std::string error;
	auto report = [&](std::string e) {
		std::lock_guard<std::mutex> g(err_lock);
		if (error.empty())
			error = std::move(e);
	};
	std::atomic<unsigned> shared_sets{0};

	auto worker = [&](unsigned k) {
		Rng rng(0x1000 + k);
		int vk = t.vk.get(), dev = t.dev.get();
		std::vector<u32> buf(shared_pages);
		for (unsigned it = 0; it < iters; it++) {
			long res = 0;
			switch (rng.below(7)) {
			case 0: { /* SET part of the own range */
				u64 off = rng.below(own_pages), n = 1 + rng.below(std::min<u64>(16, own_pages - off));
				for (u64 i = 0; i < n; i++)
					buf[i] = rng.chance(30) ? ALL : static_cast<u32>(rng.next());
				res = spp_set(vk, own_gfn(k) + off, n, buf.data());
				if (res == 0)
					std::copy(buf.begin(), buf.begin() + n, model[k].begin() + off);
				break;
			}
			case 1: { /* GET part of the own range: exactly the model */
				u64 off = rng.below(own_pages), n = 1 + rng.below(std::min<u64>(32, own_pages - off));
				res = spp_get(vk, own_gfn(k) + off, n, buf.data());
				if (res == 0 && !std::equal(buf.begin(), buf.begin() + n, model[k].begin() + off))
					report(vkt::format("thread %u: GET of its own range differs from "
							   "what it set", k));
				break;
			}
			case 2: { /* SET the shared range to one value */
				u32 val = (k << 28) | (it & 0x0fffffff);
				std::fill(buf.begin(), buf.end(), val);
				res = spp_set(vk, shared_gfn, shared_pages, buf.data());
				shared_sets++;
				break;
			}
			case 3: { /* GET the shared range: all from one SET */
				res = spp_get(vk, shared_gfn, shared_pages, buf.data());
				if (res == 0 && std::any_of(buf.begin(), buf.end(),
							    [&](u32 x) { return x != buf[0]; }))
					report(vkt::format("thread %u: GET saw a half-done SET "
							   "(0x%x ... 0x%x)", k, buf[0], buf.back()));
				break;
			}
			case 4: {
				virtkit_spp_stats s;
				res = spp_stats(vk, &s);
				if (res == 0 && (s.protected_pages > nthreads * own_pages + shared_pages + 1 ||
						 s.reserved[0] || s.reserved[3]))
					report(vkt::format("thread %u: STATS protected_pages %llu", k,
							   (unsigned long long)s.protected_pages));
				break;
			}
			case 5:
				res = sys_ioctl(rng.chance(50) ? vk : dev, VIRTKIT_CHECK_EXTENSION,
						(unsigned long)VIRTKIT_CAP_SPP);
				if (res != 1)
					report(vkt::format("thread %u: CHECK_EXTENSION %s", k,
							   result_name(res).c_str()));
				res = 0;
				break;
			default:
				res = spp_enable(vk);
				break;
			}
			if (res != 0)
				report(vkt::format("thread %u: ioctl %u failed: %s", k, it,
						   result_name(res).c_str()));
		}
	};

	std::vector<std::thread> threads;
	for (unsigned k = 0; k < nthreads; k++)
		threads.emplace_back(worker, k);
	std::thread stopper([&] {
		for (auto &th : threads)
			th.join();
		t.g.memory().write_obj<u64>(ctl_gpa, 1);
	});
	u64 last = 0;
	std::string run_error;
	try {
		last = r.until_ucall().args[0];
	} catch (const std::exception &e) {
		run_error = e.what();
	} catch (const vkt::Failure &f) {
		run_error = f.message;
	}
	if (!run_error.empty())
		t.g.memory().write_obj<u64>(ctl_gpa, 1);
	stopper.join();
	TEST_ASSERT(run_error.empty(), "the vCPU: %s", run_error.c_str());
	TEST_ASSERT(error.empty(), "%s", error.c_str());

	/* The final state is exactly the model. */
	u64 want_protected = 1;
	for (unsigned k = 0; k < nthreads; k++) {
		TEST_ASSERT(get_maps(t.vk.get(), own_gfn(k), own_pages) == model[k]);
		for (auto m : model[k])
			want_protected += m != ALL;
	}
	auto shared = get_maps(t.vk.get(), shared_gfn, shared_pages);
	for (auto m : shared)
		TEST_ASSERT_EQ(m, shared[0]);
	if (shared_sets.load())
		want_protected += shared_pages;
	auto s = t.st();
	TEST_ASSERT_EQ(s.protected_pages, want_protected);
	/* The guest's writes all went the fast way. */
	vkt::diag("guest writes %llu, fast %llu", (unsigned long long)last - 1,
		  (unsigned long long)s.fast_writes);
	TEST_ASSERT_EQ(r.mmio_exits, 0u);
	TEST_ASSERT_EQ(s.fast_writes, last - 1);
	TEST_ASSERT_EQ(s.user_exits, 0u);
	TEST_ASSERT_EQ(t.read64(page(0) + 8), last - 1);
}

/*
 * The guest alternates an allowed 8-byte store at the end of sub-page 0 and
 * a 16-byte store there that reaches into the denied sub-page 1; two
 * threads run the same vCPU, one with VIRTKIT_VCPU_RUN, one with plain
 * KVM_RUN (KVM serialises them). Whatever the interleaving, sub-page 1 is
 * never written.
 */
asm(".pushsection .text\n"
    ".globl kst_lc_store16\n"
    "kst_lc_store16:\n"
    "	movups (%rsi), %xmm0\n"
    "	movups %xmm0, (%rdi)\n"
    "	ret\n"
    ".popsection\n");
extern "C" void kst_lc_store16(u64 dst, const void *src);

static void guest_alternate(u64 addr, u64 stop)
{
	u64 data[2] = {0x1111111111111111ull, 0x2222222222222222ull};
	u64 i = 0;
	while (!*(volatile u64 *)stop) {
		*(volatile u64 *)addr = ++i;
		data[1] = i;
		kst_lc_store16(addr, data);
	}
	for (;;)
		GUEST_SYNC(i);
}

VK_TEST(two_threads_run_one_vcpu)
{
	require_module();
	FastGuest t;
	const u64 addr = page(0) + 128 - 8;
	t.protect(page(0), deny(1));
	Vcpu &v = t.g.add_vcpu(guest_alternate, addr, ctl_gpa);
	GuestRunner r(t.g, v, t.vk.get());
	std::atomic<bool> done{false};
	std::atomic<u64> runs[2] = {0, 0};
	std::string error;
	std::mutex err_lock;
	auto runner = [&](int which) {
		virtkit_vcpu_run arg{};
		arg.vcpu_fd = v.fd();
		while (!done.load()) {
			long res = which == 0 ? sys_ioctl(t.vk.get(), VIRTKIT_VCPU_RUN, &arg)
					      : sys_ioctl(v.fd(), KVM_RUN, 0ul);
			runs[which]++;
			if (res < 0 && res != -EINTR) {
				std::lock_guard<std::mutex> g(err_lock);
				error = (which ? "KVM_RUN: " : "VIRTKIT_VCPU_RUN: ") + result_name(res);
				done = true;
			}
			/* Read racily: only the ucalls after the stop matter. */
			if (r.run->exit_reason == KVM_EXIT_IO)
				done = true;
		}
	};
	std::thread a(runner, 0), b(runner, 1);
	std::thread stopper([&] {
		for (int i = 0; i < 400 && !done.load() && runs[0] + runs[1] < 3000; i++)
			usleep(50000);
		t.g.memory().write_obj<u64>(ctl_gpa, 1);
	});
	a.join();
	b.join();
	done = true;
	stopper.join();
	auto s = t.st();
	vkt::diag("runs: %llu VIRTKIT_VCPU_RUN, %llu KVM_RUN; fast %llu, back %llu",
		  (unsigned long long)runs[0].load(), (unsigned long long)runs[1].load(),
		  (unsigned long long)s.fast_writes, (unsigned long long)s.user_exits);
	TEST_ASSERT(error.empty(), "%s", error.c_str());
	/* Sub-page 1 was never written. */
	std::vector<u8> sp1(128);
	t.g.memory().read(page(0) + 128, std::as_writable_bytes(std::span(sp1)));
	for (unsigned i = 0; i < 128; i++)
		TEST_ASSERT(sp1[i] == 0, "denied sub-page byte %u is 0x%x", i, sp1[i]);
}
