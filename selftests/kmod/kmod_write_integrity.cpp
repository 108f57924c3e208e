// SPDX-License-Identifier: MIT
/*
 * The fast path performs a guest write whole, atomically, or not at all:
 *
 * - locked read-modify-writes (LOCK ADD/INC/XADD/CMPXCHG, XCHG) are never
 *   completed in the kernel: KVM emulates them on a read-only memslot as a
 *   read now and a plain write later, so storing that write would lose
 *   concurrent updates; they come back to userspace;
 * - a write whose VMM mapping cannot be written (here: a page the VMM made
 *   read-only) comes back to userspace with no byte of it performed, also
 *   when it straddles two pages and only the second is unwritable;
 * - the VMM page of an allowed write may fault into userspace
 *   (userfaultfd), whose handler may itself call SPP ioctls: nothing that
 *   can fault runs under the SPP lock, so this does not deadlock;
 * - several vCPUs on the fast path at once, and memslot changes (dirty
 *   logging toggled, a slot moved away and back) while they write: every
 *   write lands exactly once, in the right place, or comes back.
 */
#include "kmod_util.hpp"

#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/syscall.h>

#include <atomic>
#include <stdexcept>
#include <thread>

using namespace kmt;
using namespace virtkit;
using namespace virtkit::x86;

/* ---- guest code ---- */

enum RmwOp : u64 { LOCK_INC, LOCK_XADD, XCHG, LOCK_CMPXCHG, LOCK_OR };

static void guest_rmw(u64 addr, u64 op, u64 n)
{
	for (u64 i = 0; i < n; i++) {
		u64 one = 1, v;
		switch (op) {
		case LOCK_INC:
			asm volatile("lock incq (%0)" : : "r"(addr) : "memory", "cc");
			break;
		case LOCK_XADD:
			asm volatile("lock xaddq %0, (%1)" : "+r"(one) : "r"(addr) : "memory", "cc");
			break;
		case XCHG:
			v = i + 1;
			asm volatile("xchgq %0, (%1)" : "+r"(v) : "r"(addr) : "memory");
			break;
		case LOCK_CMPXCHG:
			v = *(volatile u64 *)addr;
			asm volatile("lock cmpxchgq %1, (%2)"
				     : "+a"(v)
				     : "r"(v + 1), "r"(addr)
				     : "memory", "cc");
			break;
		case LOCK_OR:
			asm volatile("lock orq %0, (%1)" : : "r"(u64(1) << (i % 64)), "r"(addr)
				     : "memory", "cc");
			break;
		}
	}
	GUEST_SYNC(n);
}

static void guest_store_then_sync(u64 addr, u64 value)
{
	*(volatile u64 *)addr = value;
	GUEST_SYNC(1);
}

/* Writes 1, 2, ... to addr until *stop, then reports the last value. */
static void guest_count(u64 addr, u64 stop)
{
	u64 i = 0;
	while (!*(volatile u64 *)stop)
		*(volatile u64 *)addr = ++i;
	GUEST_SYNC(i);
}

/* ---- tests ---- */

/*
 * What userspace does with a write that comes back: perform it on the
 * VMM's mapping (allowed sub-pages only here).
 */
static void complete_on_host(FastGuest &t, const kvm_run &run)
{
	t.g.memory().write(run.mmio.phys_addr,
			   std::as_bytes(std::span(run.mmio.data, run.mmio.len)));
}

/* Runs f, returning what it failed with ("" if nothing): for threads. */
template <class F> static std::string failure_of(F &&f)
{
	try {
		f();
	} catch (const vkt::Failure &e) {
		return e.message;
	} catch (const std::exception &e) {
		return e.what();
	}
	return {};
}

VK_TEST(locked_rmw_is_not_completed_in_the_kernel)
{
	require_module();
	FastGuest t;
	TEST_REQUIRE(sys_ioctl(t.vk.get(), VIRTKIT_CHECK_EXTENSION,
			       (unsigned long)VIRTKIT_CAP_SPP_FAST_WRITE) == 1,
		     "VIRTKIT_CAP_SPP_FAST_WRITE (the module could not probe KVM's emulator)");
	constexpr u64 n = 20;
	const struct {
		RmwOp op;
		const char *name;
	} ops[] = {{LOCK_INC, "lock inc"},
		   {LOCK_XADD, "lock xadd"},
		   {XCHG, "xchg"},
		   {LOCK_CMPXCHG, "lock cmpxchg"},
		   {LOCK_OR, "lock or"}};
	t.protect(page(0), deny(31));
	u64 addr = page(0);
	for (auto &o : ops) {
		Vcpu &v = t.g.add_vcpu(guest_rmw, addr, u64(o.op), n);
		GuestRunner r(t.g, v, t.vk.get());
		r.on_mmio = [&](const kvm_run &run) { complete_on_host(t, run); };
		auto before = t.st();
		TEST_ASSERT_EQ(r.until_ucall().args[0], n);
		auto after = t.st();
		vkt::diag("%s: %llu writes came back, fast path %llu", o.name,
			  (unsigned long long)r.mmio_exits,
			  (unsigned long long)(after.fast_writes - before.fast_writes));
		TEST_ASSERT(after.fast_writes == before.fast_writes,
			    "%s: %llu locked writes were completed in the kernel", o.name,
			    (unsigned long long)(after.fast_writes - before.fast_writes));
		TEST_ASSERT(r.mmio_exits == n, "%s: %llu of %llu writes came back", o.name,
			    (unsigned long long)r.mmio_exits, (unsigned long long)n);
		TEST_ASSERT_EQ(after.user_exits - before.user_exits, n);
		addr += 8;
	}
	/* Plain stores to the same page still take the fast path. */
	Vcpu &v = t.g.add_vcpu(guest_store_then_sync, page(0) + 64, u64(0x1234));
	GuestRunner r(t.g, v, t.vk.get());
	auto before = t.st();
	TEST_ASSERT_EQ(r.until_ucall().args[0], 1u);
	TEST_ASSERT_EQ(r.mmio_exits, 0u);
	TEST_ASSERT_EQ(t.st().fast_writes - before.fast_writes, 1u);
	TEST_ASSERT_EQ(t.read64(page(0) + 64), 0x1234u);
}

/*
 * The VMM's mapping of page 1 is read-only. An 8-byte write straddling
 * pages 0 and 1 (both allowed) cannot be performed whole in the kernel: it
 * comes back to userspace and neither page changed.
 */
VK_TEST(unwritable_vmm_page_leaves_no_partial_write)
{
	require_module();
	FastGuest t;
	t.protect(page(0), deny(0));
	t.protect(page(1), deny(31));
	auto region = t.g.memory().region_at(prot_gpa);
	std::byte *host1 = region.host + 4096;
	const u64 addr = page(1) - 4;
	t.g.memory().write_obj<u64>(addr, 0x5555555555555555ull);
	TEST_ASSERT(mprotect(host1, 4096, PROT_READ) == 0);
	Vcpu &v = t.g.add_vcpu(guest_store_then_sync, addr, u64(0x1122334455667788ull));
	GuestRunner r(t.g, v, t.vk.get());
	std::vector<std::pair<u64, u64>> seen; /* (gpa, memory at the exit) */
	r.on_mmio = [&](const kvm_run &run) {
		seen.emplace_back(run.mmio.phys_addr, t.read64(addr));
	};
	TEST_ASSERT_EQ(r.until_ucall().args[0], 1u);
	TEST_ASSERT(mprotect(host1, 4096, PROT_READ | PROT_WRITE) == 0);
	TEST_ASSERT(!seen.empty(), "the write did not come back to userspace");
	TEST_ASSERT_EQ(seen[0].first, addr);
	TEST_ASSERT(seen[0].second == 0x5555555555555555ull,
		    "part of the write landed before it came back: 0x%llx",
		    (unsigned long long)seen[0].second);
	TEST_ASSERT_EQ(t.read64(addr), 0x5555555555555555ull);
	TEST_ASSERT_EQ(t.st().fast_writes, 0u);
}

/* Four vCPUs write to their own allowed sub-pages of one protected page. */
VK_TEST(several_vcpus_on_the_fast_path)
{
	require_module();
	FastGuest t;
	constexpr unsigned nvcpus = 4;
	t.protect(page(0), deny(31));
	std::vector<std::unique_ptr<GuestRunner>> runners;
	for (unsigned i = 0; i < nvcpus; i++) {
		Vcpu &v = t.g.add_vcpu(guest_count, page(0) + 128 * i, ctl_gpa);
		runners.push_back(std::make_unique<GuestRunner>(t.g, v, t.vk.get()));
	}
	std::vector<u64> last(nvcpus);
	std::vector<std::string> errors(nvcpus);
	std::vector<std::thread> threads;
	for (unsigned i = 0; i < nvcpus; i++)
		threads.emplace_back([&, i] {
			errors[i] = failure_of([&] { last[i] = runners[i]->until_ucall().args[0]; });
		});
	usleep(1500000);
	t.g.memory().write_obj<u64>(ctl_gpa, 1);
	for (auto &th : threads)
		th.join();
	u64 total = 0;
	for (unsigned i = 0; i < nvcpus; i++) {
		TEST_ASSERT(errors[i].empty(), "vCPU %u: %s", i, errors[i].c_str());
		TEST_ASSERT(runners[i]->mmio_exits == 0, "vCPU %u: %llu writes came back", i,
			    (unsigned long long)runners[i]->mmio_exits);
		TEST_ASSERT(t.read64(page(0) + 128 * i) == last[i],
			    "vCPU %u: memory has %llu, the guest wrote %llu last", i,
			    (unsigned long long)t.read64(page(0) + 128 * i),
			    (unsigned long long)last[i]);
		total += last[i];
	}
	auto s = t.st();
	vkt::diag("%u vCPUs: %llu writes, %llu in the kernel", nvcpus, (unsigned long long)total,
		  (unsigned long long)s.fast_writes);
	TEST_ASSERT_EQ(s.fast_writes, total);
}

/*
 * While a vCPU writes 1, 2, 3, ... to a protected page, another thread
 * toggles dirty logging on its memslot, moves the slot away and back, and
 * deletes and re-creates it (raw KVM_SET_USER_MEMORY_REGION on a slot of the test's own: the library
 * keeps read-only regions out of dirty logging). Writes under dirty logging
 * or while the slot is away or gone come back (userspace performs them); the
 * others are completed in the kernel. Every write lands exactly once, in
 * the right page: memory ends with the last value written.
 */
VK_TEST(memslot_changes_during_fast_writes)
{
	require_module();
	FastGuest t;
	constexpr u64 gpa = 0x40600000, away_gpa = 0x40800000;
	constexpr u32 slot = 200;
	t.g.identity_map(gpa, 4096);
	auto mem = Mapping::map(4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
				"raw slot");
	auto *host = mem.as<volatile u64>();
	auto set_slot = [&](u64 at, u32 flags, u64 size = 4096) {
		kvm_userspace_memory_region r{};
		r.slot = slot;
		r.flags = flags;
		r.guest_phys_addr = at;
		r.memory_size = size;
		r.userspace_addr = reinterpret_cast<u64>(mem.data());
		long res = sys_ioctl(t.g.vm().fd(), KVM_SET_USER_MEMORY_REGION, &r);
		if (res)
			throw std::runtime_error("KVM_SET_USER_MEMORY_REGION: " + result_name(res));
	};
	set_slot(gpa, KVM_MEM_READONLY);
	t.protect(gpa, deny(31));
	Vcpu &v = t.g.add_vcpu(guest_count, gpa, ctl_gpa);
	GuestRunner r(t.g, v, t.vk.get());
	std::atomic<u64> returned{0};
	std::string error, mmio_error;
	r.on_mmio = [&](const kvm_run &run) {
		returned++;
		if (run.mmio.phys_addr != gpa || run.mmio.len != 8)
			mmio_error = vkt::format("unexpected write of %u bytes at 0x%llx", run.mmio.len,
					    (unsigned long long)run.mmio.phys_addr);
		std::memcpy(const_cast<u64 *>(host), run.mmio.data, 8);
	};
	u64 last = 0;
	std::thread runner([&] { error = failure_of([&] { last = r.until_ucall().args[0]; }); });
	u64 toggles = 0;
	std::string churn_error;
	try {
		for (int i = 0; i < 40; i++) {
			set_slot(gpa, KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES);
			usleep(10000);
			set_slot(gpa, KVM_MEM_READONLY);
			usleep(10000);
			set_slot(away_gpa, KVM_MEM_READONLY);
			usleep(5000);
			set_slot(gpa, KVM_MEM_READONLY);
			usleep(5000);
			set_slot(gpa, KVM_MEM_READONLY, 0); /* deleted */
			usleep(5000);
			set_slot(gpa, KVM_MEM_READONLY);
			toggles++;
			usleep(10000);
		}
	} catch (const std::exception &e) {
		churn_error = e.what();
	}
	t.g.memory().write_obj<u64>(ctl_gpa, 1);
	runner.join();
	auto s = t.st();
	vkt::diag("%llu rounds: %llu writes, %llu in the kernel, %llu came back",
		  (unsigned long long)toggles, (unsigned long long)last,
		  (unsigned long long)s.fast_writes, (unsigned long long)returned.load());
	TEST_ASSERT(churn_error.empty(), "changing the memslot: %s", churn_error.c_str());
	TEST_ASSERT(error.empty(), "%s", error.c_str());
	TEST_ASSERT(mmio_error.empty(), "%s", mmio_error.c_str());
	TEST_ASSERT_EQ(*host, last);
	TEST_ASSERT_EQ(s.fast_writes + returned.load(), last);
	TEST_ASSERT(s.fast_writes > 0, "no write took the fast path");
}

/*
 * The VMM page behind a protected page is missing and registered with
 * userfaultfd. The guest's allowed write makes the fast path fault it in;
 * the fault handler sets an SPP map (as a VMM restoring a snapshot might)
 * before it resolves the fault. Before 0.2 the fast path faulted while
 * holding the SPP lock, and the handler's SET waited for that lock forever.
 */
VK_TEST(userfault_handler_may_call_spp_ioctls)
{
	require_module();
	FastGuest t;
	constexpr u64 gpa = 0x40600000;
	constexpr u32 slot = 201;
	int uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
	TEST_REQUIRE(uffd >= 0, "userfaultfd(2)");
	FileDesc uffd_owner = FileDesc::adopt(uffd, "userfaultfd");
	uffdio_api api{};
	api.api = UFFD_API;
	TEST_ASSERT(ioctl(uffd, UFFDIO_API, &api) == 0);
	auto mem = Mapping::map(4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
				"userfault page");
	uffdio_register reg{};
	reg.range.start = reinterpret_cast<u64>(mem.data());
	reg.range.len = 4096;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	TEST_ASSERT(ioctl(uffd, UFFDIO_REGISTER, &reg) == 0);

	t.g.identity_map(gpa, 4096);
	kvm_userspace_memory_region r{};
	r.slot = slot;
	r.flags = KVM_MEM_READONLY;
	r.guest_phys_addr = gpa;
	r.memory_size = 4096;
	r.userspace_addr = reinterpret_cast<u64>(mem.data());
	EXPECT_OK(sys_ioctl(t.g.vm().fd(), KVM_SET_USER_MEMORY_REGION, &r));
	t.protect(gpa, deny(31));

	std::atomic<bool> stop{false};
	std::atomic<int> faults{0};
	std::string handler_error;
	std::thread handler([&] {
		static std::byte zero_page[4096] __attribute__((aligned(4096)));
		while (!stop.load()) {
			pollfd p{uffd, POLLIN, 0};
			if (poll(&p, 1, 100) <= 0)
				continue;
			uffd_msg msg;
			if (read(uffd, &msg, sizeof(msg)) != sizeof(msg))
				continue;
			if (msg.event != UFFD_EVENT_PAGEFAULT)
				continue;
			faults++;
			/* An SPP ioctl from the fault handler, before resolving it. */
			u32 map = deny(30);
			long res = spp_set(t.vk.get(), gpa / 4096 + 1, 1, &map);
			if (res != 0)
				handler_error = "SPP_SET_ACCESS in the fault handler: " + result_name(res);
			uffdio_copy c{};
			c.dst = msg.arg.pagefault.address & ~u64(4095);
			c.src = reinterpret_cast<u64>(zero_page);
			c.len = 4096;
			if (ioctl(uffd, UFFDIO_COPY, &c) != 0)
				handler_error = "UFFDIO_COPY: " + virtkit::errno_name(errno);
		}
	});
	/* If the run deadlocks, end the process: killing it frees the lock. */
	std::thread watchdog([&] {
		for (int i = 0; i < 600 && !stop.load(); i++)
			usleep(100000);
		if (!stop.load()) {
			fprintf(stdout, "# userfault_handler_may_call_spp_ioctls: no progress in 60 s "
					"(the fast path faults under the SPP lock)\n");
			fflush(stdout);
			_exit(1);
		}
	});
	Vcpu &v = t.g.add_vcpu(guest_store_then_sync, gpa + 8, u64(0x0123456789abcdefull));
	GuestRunner runner(t.g, v, t.vk.get());
	std::string error = failure_of([&] { TEST_ASSERT_EQ(runner.until_ucall().args[0], 1u); });
	stop = true;
	handler.join();
	watchdog.join();
	TEST_ASSERT(error.empty(), "%s", error.c_str());
	TEST_ASSERT(handler_error.empty(), "%s", handler_error.c_str());
	vkt::diag("%d userfaults, %llu writes in the kernel, %llu came back", faults.load(),
		  (unsigned long long)t.st().fast_writes, (unsigned long long)runner.mmio_exits);
	TEST_ASSERT(faults.load() >= 1, "the page was never faulted in through userfaultfd");
	TEST_ASSERT_EQ(t.st().fast_writes, 1u);
	TEST_ASSERT_EQ(*reinterpret_cast<volatile u64 *>(mem.data() + 8), 0x0123456789abcdefull);
	TEST_ASSERT_EQ(get_maps(t.vk.get(), gpa / 4096 + 1, 1)[0], deny(30));
}
