// SPDX-License-Identifier: MIT
/*
 * VIRTKIT_ATTACH_VM and the per-VM file's lifetime: attach and detach with
 * the VM, vCPU, per-VM and /dev/virtkit descriptors closed in every order
 * (the VM stays usable through the per-VM file and is destroyed with the
 * last reference), one attachment per VM, every kind of wrong descriptor
 * and argument, and many VMs attached at once.
 */
#include "kmod_util.hpp"

#include <sys/syscall.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>

using namespace kmt;
using virtkit::FileDesc;

/* Module and KVM references: both return to where they were. */
struct Refs {
	long virtkit = module_refcnt("virtkit");
	long kvm = module_refcnt(kvm_vendor_module());
	int fds = vkt::open_fd_count();

	void expect_same(const char *when) const
	{
		Refs now;
		TEST_ASSERT(now.fds == fds, "%s: %d fds open, %d before", when, now.fds, fds);
		TEST_ASSERT(now.virtkit == virtkit, "%s: virtkit refcnt %ld, %ld before", when,
			    now.virtkit, virtkit);
		TEST_ASSERT(now.kvm == kvm, "%s: %s refcnt %ld, %ld before (a VM leaked?)", when,
			    kvm_vendor_module(), now.kvm, kvm);
	}
};

/* The per-VM file works: SPP round trip, and the vCPU (if open) is its VM's. */
static void vk_works(int vk, int vcpu_fd, u64 gfn, u32 map)
{
	EXPECT_OK(spp_enable(vk));
	EXPECT_OK(spp_set(vk, gfn, 1, &map));
	TEST_ASSERT_EQ(get_maps(vk, gfn, 1)[0], map);
	TEST_ASSERT(stats(vk).protected_pages >= 1);
	if (vcpu_fd >= 0) {
		/* Recognised as the VM's vCPU: KVM_RUN ran and returned at once. */
		auto m = map_run(vcpu_fd);
		m.as<kvm_run>()->immediate_exit = 1;
		EXPECT_ERRNO(vcpu_run(vk, vcpu_fd), EINTR);
		m.as<kvm_run>()->immediate_exit = 0;
	}
}

VK_TEST(close_in_every_order)
{
	require_module();
	vkt::kvm();
	const Refs before;
	enum { VM, VCPU, VK };
	std::array<int, 3> order = {VM, VCPU, VK};
	int n = 0;
	do {
		/* /dev/virtkit closed first, right after the attach. */
		for (bool dev_first : {true, false}) {
			auto dev = open_dev();
			RawVm vm(1);
			std::array<FileDesc, 3> f;
			f[VM] = std::move(vm.vm);
			f[VCPU] = std::move(vm.vcpus[0]);
			f[VK] = attach_ok(dev.get(), f[VM].get());
			if (dev_first)
				dev.close();
			u32 map = 0x01010101u * static_cast<u32>(n + 1);
			vk_works(f[VK].get(), f[VCPU].get(), 0x1000 + n, map);
			for (int what : order) {
				f[what].close();
				if (f[VK])
					vk_works(f[VK].get(), f[VCPU] ? f[VCPU].get() : -1,
						 0x2000 + n, map ^ 1);
			}
			if (dev) {
				/* /dev/virtkit still attaches other VMs. */
				RawVm other(0);
				auto vk2 = attach_ok(dev.get(), other.vm.get());
				vk_works(vk2.get(), -1, 1, 0);
			}
			n++;
		}
		before.expect_same(("after close order " + std::to_string(order[0]) +
				    std::to_string(order[1]) + std::to_string(order[2])).c_str());
	} while (std::next_permutation(order.begin(), order.end()));
	TEST_ASSERT_EQ(n, 12);
}

VK_TEST(per_vm_file_keeps_the_vm)
{
	require_module();
	vkt::kvm();
	const Refs before;
	auto dev = open_dev();
	long kvm_refs_vm_only;
	{
		RawVm vm(1);
		auto vk = attach_ok(dev.get(), vm.vm.get());
		vm.vcpus.clear();
		vm.vm.close();
		kvm_refs_vm_only = module_refcnt(kvm_vendor_module());
		/* Only the per-VM file holds the VM now; it is fully usable. */
		EXPECT_OK(spp_enable(vk.get()));
		std::vector<u32> maps(300);
		for (u32 i = 0; i < maps.size(); i++)
			maps[i] = i * 0x01000193u;
		for (int round = 0; round < 20; round++) {
			EXPECT_OK(spp_set(vk.get(), 0x40000 + round * 7, maps));
			TEST_ASSERT(get_maps(vk.get(), 0x40000 + round * 7, maps.size()) == maps);
		}
		EXPECT_ERRNO(vcpu_run(vk.get(), closed_fd()), EBADF);
	}
	dev.close();
	before.expect_same("after closing the per-VM file last");
	/*
	 * The per-VM file kept the VM and so KVM's vendor module: since 6.7
	 * only open KVM files pin it (a struct kvm reference does not), and
	 * a VM destroyed after kvm-amd/kvm-intel unloaded oopses the host.
	 */
	vkt::diag("%s refcnt: %ld before, %ld with only the per-VM file, %ld after",
		  kvm_vendor_module(), before.kvm, kvm_refs_vm_only, module_refcnt(kvm_vendor_module()));
	TEST_ASSERT(kvm_refs_vm_only > before.kvm,
		    "%s refcnt %ld with only the per-VM file open, %ld before: the VM does not "
		    "pin its vendor module",
		    kvm_vendor_module(), kvm_refs_vm_only, before.kvm);
}

/* delete_module(name) is refused while a VM is attached: the module is in use. */
static void expect_unload_refused(const char *name)
{
	long r = syscall(SYS_delete_module, name, O_NONBLOCK);
	TEST_ASSERT(r != 0, "delete_module(%s) succeeded with a VM attached", name);
	TEST_ASSERT(errno == EWOULDBLOCK || errno == EBUSY,
		    "delete_module(%s): expected EWOULDBLOCK or EBUSY, got %s", name,
		    virtkit::errno_name(errno).c_str());
}

/*
 * Unloading KVM's vendor module while only the per-VM file holds a VM is
 * refused (before 0.2 it succeeded on 6.7+ and closing the file oopsed).
 */
VK_TEST(vendor_module_unload_refused_while_attached)
{
	require_module();
	vkt::kvm();
	const Refs before;
	auto dev = open_dev();
	{
		RawVm vm(1);
		auto vk = attach_ok(dev.get(), vm.vm.get());
		vm.vcpus.clear();
		vm.vm.close();
		expect_unload_refused(kvm_vendor_module());
		/* The VM is intact: the per-VM file still works. */
		EXPECT_OK(spp_enable(vk.get()));
	}
	dev.close();
	before.expect_same("after closing the per-VM file");
}

/* virtkit.ko itself cannot be unloaded while a VM is attached. */
VK_TEST(module_unload_refused_while_attached)
{
	require_module();
	vkt::kvm();
	RawVm vm(1);
	auto vk = attach_ok(open_dev().get(), vm.vm.get());
	expect_unload_refused("virtkit");
	EXPECT_OK(spp_enable(vk.get()));
}

/*
 * Like KVM's own ioctls, the module refuses calls from a process that does
 * not own the VM (EIO): after fork(), the child can neither attach the
 * parent's VM nor use the parent's per-VM file.
 */
VK_TEST(foreign_process_gets_eio)
{
	require_module();
	vkt::kvm();
	auto dev = open_dev();
	RawVm vm(1);
	auto vk = attach_ok(dev.get(), vm.vm.get());
	EXPECT_OK(spp_enable(vk.get()));
	u32 map = 0x0000ffff;
	EXPECT_OK(spp_set(vk.get(), 0x100, 1, &map));
	auto other_dev = open_dev();
	RawVm other(1);

	pid_t pid = fork();
	TEST_ASSERT(pid >= 0);
	if (pid == 0) {
		/* The child: each call must fail with EIO, changing nothing. */
		u32 m = 0, all = ALL;
		virtkit_spp_stats st;
		const std::pair<long, const char *> calls[] = {
			{attach(other_dev.get(), other.vm.get()), "ATTACH_VM of the parent's VM"},
			{sys_ioctl(vk.get(), VIRTKIT_GET_API_VERSION, 0ul), "GET_API_VERSION"},
			{spp_enable(vk.get()), "SPP_ENABLE"},
			{spp_set(vk.get(), 0x100, 1, &all), "SPP_SET_ACCESS"},
			{spp_get(vk.get(), 0x100, 1, &m), "SPP_GET_ACCESS"},
			{spp_stats(vk.get(), &st), "SPP_GET_STATS"},
			{vcpu_run(vk.get(), vm.vcpus[0].get()), "VCPU_RUN"},
		};
		int bad = 0;
		for (auto &[r, what] : calls)
			if (r != -EIO) {
				fprintf(stderr, "# child: %s: expected EIO, got %s\n", what,
					result_name(r).c_str());
				bad++;
			}
		_exit(bad ? 1 : 0);
	}
	int status = 0;
	TEST_ASSERT(waitpid(pid, &status, 0) == pid);
	TEST_ASSERT(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		    "a call from the forked child did not fail with EIO (status 0x%x)", status);
	/* Nothing changed: the map is the parent's, the parent still attaches others. */
	TEST_ASSERT_EQ(get_maps(vk.get(), 0x100, 1)[0], map);
	auto again = attach_ok(other_dev.get(), other.vm.get());
}

VK_TEST(one_attachment_per_vm)
{
	require_module();
	vkt::kvm();
	const Refs before;
	{
		auto dev = open_dev();
		auto dev2 = open_dev();
		RawVm vm(1);
		auto vk = attach_ok(dev.get(), vm.vm.get());
		EXPECT_OK(spp_enable(vk.get()));
		u32 map = 0x12345678u;
		EXPECT_OK(spp_set(vk.get(), 77, 1, &map));
		/* Through any descriptor of the VM, any /dev/virtkit file. */
		EXPECT_ERRNO(attach(dev.get(), vm.vm.get()), EBUSY);
		EXPECT_ERRNO(attach(dev2.get(), vm.vm.get()), EBUSY);
		int dup_fd = dup(vm.vm.get());
		EXPECT_ERRNO(attach(dev.get(), dup_fd), EBUSY);
		close(dup_fd);
		/* The attachment is untouched. */
		TEST_ASSERT_EQ(get_maps(vk.get(), 77, 1)[0], map);
		/* Detach; attaching again works and starts empty. */
		for (int round = 0; round < 5; round++) {
			vk.close();
			vk = attach_ok(round % 2 ? dev.get() : dev2.get(), vm.vm.get());
			virtkit_spp_stats s;
			EXPECT_ERRNO(spp_stats(vk.get(), &s), ENOENT);
			EXPECT_OK(spp_enable(vk.get()));
			TEST_ASSERT_EQ(get_maps(vk.get(), 77, 1)[0], VIRTKIT_SPP_ALL_WRITABLE);
			TEST_ASSERT_EQ(stats(vk.get()).protected_pages, 0u);
			EXPECT_ERRNO(attach(dev.get(), vm.vm.get()), EBUSY);
		}
		/* A dup of the per-VM fd is the same attachment: closing one keeps it. */
		FileDesc d = adopt(fcntl(vk.get(), F_DUPFD_CLOEXEC, 0), "dup");
		vk.close();
		EXPECT_ERRNO(attach(dev.get(), vm.vm.get()), EBUSY);
		EXPECT_OK(spp_enable(d.get()));
		d.close();
		auto again = attach_ok(dev.get(), vm.vm.get());
	}
	before.expect_same("after all closed");
}

VK_TEST(attach_wrong_descriptors)
{
	require_module();
	vkt::kvm();
	const Refs before;
	{
		auto dev = open_dev();
		RawVm vm(1), other(1);
		auto other_vk = attach_ok(dev.get(), other.vm.get());
		int pipefd[2];
		TEST_ASSERT(pipe2(pipefd, O_CLOEXEC) == 0);
		auto null = FileDesc::open("/dev/null", O_RDWR | O_CLOEXEC);
		auto memfd = FileDesc::memfd("kmod_attach");
		auto evfd = FileDesc::eventfd(0);

		for (int fd : {-1, closed_fd(), INT_MAX, -100, INT_MIN})
			EXPECT_ERRNO(attach(dev.get(), fd), EBADF);
		const std::pair<int, const char *> not_vm[] = {
			{null.get(), "/dev/null"},
			{pipefd[0], "a pipe"},
			{pipefd[1], "a pipe's write end"},
			{memfd.get(), "a memfd"},
			{evfd.get(), "an eventfd"},
			{vkt::kvm().fd().get(), "/dev/kvm"},
			{vm.vcpus[0].get(), "a vCPU fd"},
			{other_vk.get(), "another VM's per-VM virtkit fd"},
			{dev.get(), "/dev/virtkit itself"},
		};
		for (auto &[fd, what] : not_vm) {
			long r = attach(dev.get(), fd);
			TEST_ASSERT(r == -EINVAL, "ATTACH_VM(%s): expected EINVAL, got %s", what,
				    result_name(r).c_str());
		}
		/* KVM's stats files are not VMs either. */
		if (vkt::kvm().has(KVM_CAP_BINARY_STATS_FD)) {
			auto vs = adopt(sys_ioctl(vm.vm.get(), KVM_GET_STATS_FD, 0ul), "KVM_GET_STATS_FD");
			auto cs = adopt(sys_ioctl(vm.vcpus[0].get(), KVM_GET_STATS_FD, 0ul),
					"KVM_GET_STATS_FD");
			EXPECT_ERRNO(attach(dev.get(), vs.get()), EINVAL);
			EXPECT_ERRNO(attach(dev.get(), cs.get()), EINVAL);
		}
		close(pipefd[0]);
		close(pipefd[1]);
		/* None of it attached anything: the VM attaches now. */
		auto vk = attach_ok(dev.get(), vm.vm.get());
	}
	before.expect_same("after all closed");
}

VK_TEST(attach_bad_arguments)
{
	require_module();
	vkt::kvm();
	const Refs before;
	{
		auto dev = open_dev();
		RawVm vm(0);
		virtkit_attach_vm a{};
		a.vm_fd = vm.vm.get();
		for (u32 flags : {1u, 2u, 0x80000000u, ~0u}) {
			a.flags = flags;
			EXPECT_ERRNO(sys_ioctl(dev.get(), VIRTKIT_ATTACH_VM, &a), EINVAL);
		}
		a.flags = 0;
		for (int i = 0; i < 3; i++) {
			for (u64 v : {1ull, 1ull << 63}) {
				a.reserved[i] = v;
				EXPECT_ERRNO(sys_ioctl(dev.get(), VIRTKIT_ATTACH_VM, &a), EINVAL);
			}
			a.reserved[i] = 0;
		}
		/* Checked before the descriptor: a bad fd with flags is EINVAL too. */
		virtkit_attach_vm b{};
		b.vm_fd = -1;
		b.flags = 1;
		EXPECT_ERRNO(sys_ioctl(dev.get(), VIRTKIT_ATTACH_VM, &b), EINVAL);

		/* Bad pointers: NULL, low, kernel, unmapped, straddling into PROT_NONE. */
		auto pages = virtkit::Mapping::anonymous(2 * 4096, "pages");
		TEST_ASSERT(mprotect(pages.data() + 4096, 4096, PROT_NONE) == 0);
		auto *straddle = pages.data() + 4096 - 16;
		std::memcpy(straddle, &a, 16);
		for (unsigned long p : {0ul, 1ul, 4095ul, 0xffff888000000000ul, ~0ul - 16,
					reinterpret_cast<unsigned long>(pages.data() + 4096),
					reinterpret_cast<unsigned long>(straddle)})
			EXPECT_ERRNO(sys_ioctl(dev.get(), VIRTKIT_ATTACH_VM, p), EFAULT);
		/* A read-only struct is fine: the module only reads it. */
		auto ro = virtkit::Mapping::anonymous(4096, "ro");
		std::memcpy(ro.data(), &a, sizeof(a));
		TEST_ASSERT(mprotect(ro.data(), 4096, PROT_READ) == 0);
		auto vk = adopt(sys_ioctl(dev.get(), VIRTKIT_ATTACH_VM, ro.data()), "ATTACH_VM(ro)");
		EXPECT_ERRNO(attach(dev.get(), vm.vm.get()), EBUSY);
	}
	before.expect_same("after all closed");
}

VK_TEST(many_vms_attached)
{
	require_module();
	vkt::kvm();
	const Refs before;
	constexpr unsigned n = 48;
	{
		auto dev = open_dev();
		std::vector<RawVm> vms;
		std::vector<FileDesc> vks;
		for (unsigned i = 0; i < n; i++) {
			vms.emplace_back(i % 4 == 0 ? 1 : 0);
			vks.push_back(attach_ok(dev.get(), vms.back().vm.get()));
			EXPECT_OK(spp_enable(vks.back().get()));
			std::vector<u32> maps(i + 1, ~(1u << (i % 32)));
			EXPECT_OK(spp_set(vks.back().get(), 0x100 * i, maps));
		}
		/* Each VM sees only its own maps, and its vCPUs only work with it. */
		for (unsigned i = 0; i < n; i++) {
			auto st = stats(vks[i].get());
			TEST_ASSERT_EQ(st.protected_pages, i + 1);
			for (unsigned j = 0; j < n; j += 7) {
				auto m = get_maps(vks[i].get(), 0x100 * j, j + 1);
				for (auto x : m)
					TEST_ASSERT_EQ(x, i == j ? ~(1u << (i % 32)) : VIRTKIT_SPP_ALL_WRITABLE);
			}
			for (unsigned j = 0; j < n; j += 4)
				if (j != i)
					EXPECT_ERRNO(vcpu_run(vks[i].get(), vms[j].vcpus[0].get()), EINVAL);
			EXPECT_ERRNO(attach(dev.get(), vms[i].vm.get()), EBUSY);
		}
		/* Close the VM fds of half of them; the rest detach first. */
		for (unsigned i = 0; i < n; i += 2)
			vms[i].vm.close();
		for (unsigned i = 1; i < n; i += 2)
			vks[i].close();
		for (unsigned i = 0; i < n; i += 2)
			TEST_ASSERT_EQ(stats(vks[i].get()).protected_pages, i + 1);
	}
	before.expect_same("after all closed");
}
