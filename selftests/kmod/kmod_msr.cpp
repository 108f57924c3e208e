// SPDX-License-Identifier: MIT
/*
 * VIRTKIT_VCPU_GUEST_WRMSR: the capability (1 where KVM exports its guest
 * write to modules, 0 on 7.x, where the ioctl fails with EOPNOTSUPP), the
 * arguments (each refused one writes nothing), and that the write is the
 * guest's and not the host's: where KVM treats the two differently
 * (MSR_SMI_COUNT, IA32_TSC without TSC_ADJUST in the guest's CPUID) the
 * ioctl does what the guest's WRMSR does. It waits for a vCPU another
 * thread runs, works after the VMM closed the VM fd, and with concurrent
 * calls while the descriptors are closed.
 */
#include "kmod_util.hpp"

#include <sys/utsname.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstddef>
#include <thread>
#include <vector>

#include <virtkit/cpuid.hpp>

using namespace kmt;
using namespace virtkit;
using namespace virtkit::x86;

/* The layout is ABI: the module checks the same with BUILD_BUG_ON. */
static_assert(sizeof(virtkit_guest_wrmsr) == 64);
static_assert(offsetof(virtkit_guest_wrmsr, index) == 4);
static_assert(offsetof(virtkit_guest_wrmsr, data) == 8);
static_assert(offsetof(virtkit_guest_wrmsr, flags) == 16);
static_assert(offsetof(virtkit_guest_wrmsr, result) == 20);
static_assert(offsetof(virtkit_guest_wrmsr, reserved) == 24);
static_assert(_IOC_SIZE(VIRTKIT_VCPU_GUEST_WRMSR) == 64 &&
	      _IOC_DIR(VIRTKIT_VCPU_GUEST_WRMSR) == (_IOC_READ | _IOC_WRITE));

static constexpr u32 msr_tsc = 0x10, msr_smi_count = 0x34, msr_tsc_adjust = 0x3b,
		     msr_sysenter_cs = 0x174;

static long guest_wrmsr(int vk, virtkit_guest_wrmsr *w)
{
	return sys_ioctl(vk, VIRTKIT_VCPU_GUEST_WRMSR, w);
}

/* The ioctl's result for msr = value on vcpu_fd: 0 written, 1 #GP, or -errno. */
static long guest_wrmsr(int vk, int vcpu_fd, u32 msr, u64 value)
{
	virtkit_guest_wrmsr w{};
	w.vcpu_fd = vcpu_fd;
	w.index = msr;
	w.data = value;
	w.result = 0xa5a5a5a5u;
	long r = guest_wrmsr(vk, &w);
	if (r < 0)
		return r;
	TEST_ASSERT_EQ(r, 0);
	TEST_ASSERT(w.result == VIRTKIT_GUEST_WRMSR_WRITTEN || w.result == VIRTKIT_GUEST_WRMSR_GP,
		    "result %u", w.result);
	return w.result;
}

/* The kernel's major version: 7.x does not export KVM's guest write. */
static unsigned kernel_major()
{
	utsname u{};
	TEST_ASSERT(uname(&u) == 0);
	return static_cast<unsigned>(std::strtoul(u.release, nullptr, 10));
}

static long cap(int fd)
{
	return sys_ioctl(fd, VIRTKIT_CHECK_EXTENSION, (unsigned long)VIRTKIT_CAP_GUEST_WRMSR);
}

static void require_guest_wrmsr(int dev)
{
	if (cap(dev) != 1)
		throw vkt::Skip{"VIRTKIT_CAP_GUEST_WRMSR = 0: KVM does not export its guest "
				"MSR write to modules on this kernel"};
}

/* Says it runs (stop + 8 = 1), then spins until *stop. */
static void guest_spin(u64 stop)
{
	*(volatile u64 *)(stop + 8) = 1;
	while (!*(volatile u64 *)stop)
		__asm__ volatile("pause");
	GUEST_SYNC(5);
}

/* A GuestVm with one vCPU (not run), attached. */
struct MsrGuest {
	GuestVm g{vkt::kvm()};
	FileDesc dev = open_dev();
	FileDesc vk;
	Vcpu *v;

	MsrGuest()
	{
		g.memory().add(ctl_gpa, 4096, {.name = "ctl"});
		g.identity_map(ctl_gpa, 4096);
		v = &g.add_vcpu(guest_spin, ctl_gpa);
		vk = attach_ok(dev.get(), g.vm().fd());
	}
};

VK_TEST(guest_wrmsr_capability)
{
	require_module();
	auto dev = open_dev();
	RawVm vm(1);
	auto vk = attach_ok(dev.get(), vm.vm.get());
	const long want = kernel_major() >= 7 ? 0 : 1;
	TEST_ASSERT(cap(dev.get()) == want, "VIRTKIT_CAP_GUEST_WRMSR = %s on Linux %u, expected %ld",
		    result_name(cap(dev.get())).c_str(), kernel_major(), want);
	TEST_ASSERT_EQ(cap(vk.get()), want);
	vkt::diag("VIRTKIT_CAP_GUEST_WRMSR = %ld", want);
	if (want == 0) {
		/* Absent: refused whatever the argument, before it is read. */
		EXPECT_ERRNO(guest_wrmsr(vk.get(), vm.vcpus[0].get(), msr_sysenter_cs, 1),
			     EOPNOTSUPP);
		EXPECT_ERRNO(sys_ioctl(vk.get(), VIRTKIT_VCPU_GUEST_WRMSR, 0ul), EOPNOTSUPP);
	}
}

VK_TEST(guest_wrmsr_bad_arguments)
{
	require_module();
	MsrGuest t;
	require_guest_wrmsr(t.dev.get());
	Vcpu &v = *t.v;
	v.set_msr(msr_sysenter_cs, 0x8);
	expect_only_own_vcpus("GUEST_WRMSR", t.dev.get(), t.vk.get(), t.g.vm().fd(), v.fd(),
			      [](int vk, int fd) { return guest_wrmsr(vk, fd, msr_sysenter_cs, 0x10); });
	virtkit_guest_wrmsr a{};
	a.vcpu_fd = v.fd();
	a.index = msr_sysenter_cs;
	a.data = 0x10;
	for (u32 f : {1u, 0x80000000u}) {
		a.flags = f;
		EXPECT_ERRNO(guest_wrmsr(t.vk.get(), &a), EINVAL);
	}
	a.flags = 0;
	for (std::size_t i = 0; i < std::size(a.reserved); i++) {
		a.reserved[i] = 1ull << 63;
		EXPECT_ERRNO(guest_wrmsr(t.vk.get(), &a), EINVAL);
		a.reserved[i] = 0;
	}
	for (unsigned long p : {0ul, 1ul, 0xffff888000000000ul})
		EXPECT_ERRNO(sys_ioctl(t.vk.get(), VIRTKIT_VCPU_GUEST_WRMSR, p), EFAULT);
	/* Readable but not writable: the result could not be returned, so nothing is written. */
	auto ro = Mapping::map(4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
			       "argument page");
	std::memcpy(ro.data(), &a, sizeof(a));
	TEST_ASSERT(mprotect(ro.data(), 4096, PROT_READ) == 0);
	EXPECT_ERRNO(sys_ioctl(t.vk.get(), VIRTKIT_VCPU_GUEST_WRMSR, ro.data()), EFAULT);
	/* None of them wrote. */
	TEST_ASSERT_EQ(v.msr(msr_sysenter_cs), 0x8u);
	/* And the same argument, valid, does. */
	TEST_ASSERT_EQ(guest_wrmsr(t.vk.get(), &a), 0);
	TEST_ASSERT_EQ(a.result, (u32)VIRTKIT_GUEST_WRMSR_WRITTEN);
	TEST_ASSERT_EQ(v.msr(msr_sysenter_cs), 0x10u);
}

/*
 * The guest's semantics where they differ from the host's: MSR_SMI_COUNT is
 * read-only for the guest (KVM_SET_MSRS writes it), and a guest write of
 * IA32_TSC moves TSC_ADJUST by the change even when the guest's CPUID lacks
 * TSC_ADJUST (a host write synchronizes the TSC instead).
 */
VK_TEST(guest_wrmsr_has_the_guests_semantics)
{
	require_module();
	MsrGuest t;
	require_guest_wrmsr(t.dev.get());
	Vcpu &v = *t.v;
	TEST_ASSERT_EQ(guest_wrmsr(t.vk.get(), v.fd(), msr_sysenter_cs, 0x23), 0);
	TEST_ASSERT_EQ(v.msr(msr_sysenter_cs), 0x23u);

	const u64 smi = v.msr(msr_smi_count);
	TEST_ASSERT_EQ(guest_wrmsr(t.vk.get(), v.fd(), msr_smi_count, smi + 5),
		       VIRTKIT_GUEST_WRMSR_GP);
	TEST_ASSERT_EQ(v.msr(msr_smi_count), smi);
	TEST_ASSERT(v.try_set_msr(msr_smi_count, smi + 5), "KVM_SET_MSRS of MSR_SMI_COUNT");

	/* IA32_TSC, without TSC_ADJUST in CPUID. */
	auto cpuid = v.cpuid();
	CpuidEdit e{.function = 7, .index = 0, .reg = CpuidReg::ebx, .clear = 1u << 1};
	apply_cpuid_edits(cpuid, std::span(&e, 1));
	v.set_cpuid(cpuid);
	constexpr u64 jump = 1ull << 40, slack = 1ull << 36;
	const u64 adjust = v.msr(msr_tsc_adjust);
	const u64 tsc = v.msr(msr_tsc);
	TEST_ASSERT_EQ(guest_wrmsr(t.vk.get(), v.fd(), msr_tsc, tsc + jump), 0);
	const u64 moved = v.msr(msr_tsc_adjust) - adjust;
	TEST_ASSERT(moved - jump + slack < 2 * slack,
		    "TSC_ADJUST moved by 0x%llx, the guest's write moves it by 0x%llx",
		    (unsigned long long)moved, (unsigned long long)jump);
	const u64 tsc_moved = v.msr(msr_tsc) - tsc;
	TEST_ASSERT(tsc_moved - jump < 2 * slack, "the TSC moved by 0x%llx",
		    (unsigned long long)tsc_moved);
	/* The guest runs on after all of it. */
	t.g.memory().write_obj<u64>(ctl_gpa, 1);
	TEST_ASSERT_EQ(t.g.run(v).args[0], 5u);
}

/* A vCPU in KVM_RUN on another thread is waited for (vcpu->mutex), then written. */
VK_TEST(guest_wrmsr_waits_for_a_running_vcpu)
{
	require_module();
	MsrGuest t;
	require_guest_wrmsr(t.dev.get());
	Vcpu &v = *t.v;
	v.set_msr(msr_sysenter_cs, 0x8);
	std::atomic<bool> ran{false};
	std::thread runner([&] {
		t.g.run(v);
		ran = true;
	});
	/* Until the guest spins: from then on its KVM_RUN holds the vCPU. */
	const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
	while (t.g.memory().read_obj<u64>(ctl_gpa + 8) != 1) {
		TEST_ASSERT(std::chrono::steady_clock::now() < deadline, "the guest did not start");
		std::this_thread::sleep_for(std::chrono::milliseconds(5));
	}
	std::atomic<long> r{LONG_MIN};
	std::thread writer([&] { r = guest_wrmsr(t.vk.get(), v.fd(), msr_sysenter_cs, 0x10); });
	std::this_thread::sleep_for(std::chrono::milliseconds(200));
	const bool waited = r == LONG_MIN;
	t.g.memory().write_obj<u64>(ctl_gpa, 1);
	runner.join();
	writer.join();
	TEST_ASSERT(ran.load());
	TEST_ASSERT(waited, "GUEST_WRMSR returned %s while the vCPU ran",
		    result_name(r).c_str());
	TEST_ASSERT_EQ(r.load(), 0);
	TEST_ASSERT_EQ(v.msr(msr_sysenter_cs), 0x10u);
}

/* The per-VM file holds the VM: with the VM fd closed the vCPU is still written. */
VK_TEST(guest_wrmsr_after_the_vm_fd_is_closed)
{
	require_module();
	auto dev = open_dev();
	require_guest_wrmsr(dev.get());
	RawVm vm(2);
	auto vk = attach_ok(dev.get(), vm.vm.get());
	vm.vm.close();
	TEST_ASSERT_EQ(guest_wrmsr(vk.get(), vm.vcpus[1].get(), msr_sysenter_cs, 0x10), 0);
	struct {
		kvm_msrs h;
		kvm_msr_entry e;
	} m{};
	m.h.nmsrs = 1;
	m.e.index = msr_sysenter_cs;
	TEST_ASSERT_EQ(sys_ioctl(vm.vcpus[1].get(), KVM_GET_MSRS, &m), 1);
	TEST_ASSERT_EQ(m.e.data, 0x10u);
	/* Its vCPU fds closed as well: the other vCPU. */
	vm.vcpus[1].close();
	TEST_ASSERT_EQ(guest_wrmsr(vk.get(), vm.vcpus[0].get(), msr_sysenter_cs, 0x18), 0);
}

/*
 * Concurrent calls on two vCPUs from four threads, the VM fd closed in
 * between, then the per-VM fd closed under them: every call is written or
 * EBADF (the per-VM fd gone), and each vCPU holds one of the values written.
 */
VK_TEST(guest_wrmsr_concurrent_calls_and_teardown)
{
	require_module();
	auto dev = open_dev();
	require_guest_wrmsr(dev.get());
	RawVm vm(2);
	auto vk = attach_ok(dev.get(), vm.vm.get());
	const int vkfd = vk.get();
	const int vcpu_fds[2] = {vm.vcpus[0].get(), vm.vcpus[1].get()};
	std::atomic<bool> failed{false};
	std::atomic<unsigned> calls{0}, gone{0};
	std::vector<std::thread> threads;
	for (unsigned t = 0; t < 4; t++)
		threads.emplace_back([&, t] {
			for (u64 i = 0;; i++) {
				long r = guest_wrmsr(vkfd, vcpu_fds[t % 2], msr_sysenter_cs,
						     (t + 1) << 8 | (i & 0xff));
				if (r == -EBADF) {
					gone++;
					return;
				}
				if (r != 0) {
					vkt::diag("thread %u: %s", t, result_name(r).c_str());
					failed = true;
					return;
				}
				calls++;
			}
		});
	std::this_thread::sleep_for(std::chrono::milliseconds(200));
	vm.vm.close();
	std::this_thread::sleep_for(std::chrono::milliseconds(200));
	vk.close(); /* the threads' next call: EBADF */
	for (auto &th : threads)
		th.join();
	TEST_ASSERT(!failed.load());
	TEST_ASSERT_EQ(gone.load(), 4u);
	vkt::diag("%u calls", calls.load());
	for (int fd : vcpu_fds) {
		struct {
			kvm_msrs h;
			kvm_msr_entry e;
		} m{};
		m.h.nmsrs = 1;
		m.e.index = msr_sysenter_cs;
		TEST_ASSERT_EQ(sys_ioctl(fd, KVM_GET_MSRS, &m), 1);
		const u64 owner = m.e.data >> 8;
		TEST_ASSERT(owner >= 1 && owner <= 4 && (owner - 1) % 2 == (fd == vcpu_fds[0] ? 0u : 1u),
			    "SYSENTER_CS = 0x%llx", (unsigned long long)m.e.data);
	}
}
