// SPDX-License-Identifier: MIT
/*
 * Helpers of the virtkit.ko selftests: the module's own ABI
 * (uapi/linux/virtkit.h) through raw ioctls - not libvirtkit's kmod
 * backend - so each test sees exactly what the kernel returns.
 *
 * Calls return what the kernel returned: the result, or -errno.
 * EXPECT_ERRNO / EXPECT_OK check such a result and name both errnos on a
 * mismatch. GuestRunner runs a GuestVm vCPU through VIRTKIT_VCPU_RUN and
 * handles the exits itself (vcpu.run() is never used).
 */
#pragma once

#include "test.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <linux/virtkit.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <virtkit/x86/guest_vm.hpp>

namespace kmt {

using u8 = std::uint8_t;
using u32 = std::uint32_t;
using u64 = std::uint64_t;

inline constexpr const char *dev_path = "/dev/virtkit";

/* Every module test starts here: skip when the module is not loaded. */
inline void require_module()
{
	if (access(dev_path, F_OK) != 0)
		throw vkt::Skip{"virtkit.ko not loaded (/dev/virtkit missing)"};
}

/* ioctl(2) as the kernel answered it: the result, or -errno. */
inline long sys_ioctl(int fd, unsigned long cmd, unsigned long arg)
{
	long r = ::ioctl(fd, cmd, arg);
	return r < 0 ? -errno : r;
}
inline long sys_ioctl(int fd, unsigned long cmd, const void *arg)
{
	return sys_ioctl(fd, cmd, reinterpret_cast<unsigned long>(arg));
}

/* "EINVAL" for -EINVAL, "3" for 3. */
inline std::string result_name(long r)
{
	return r < 0 ? virtkit::errno_name(static_cast<int>(-r)) : std::to_string(r);
}

/* A descriptor a call returned (r >= 0), owned; r < 0 throws naming op. */
inline virtkit::FileDesc adopt(long r, const char *op)
{
	if (r < 0)
		errno = static_cast<int>(-r);
	return virtkit::FileDesc::adopt(r < 0 ? -1 : static_cast<int>(r), op);
}

/* A descriptor number that is not open (until the next open). */
inline int closed_fd()
{
	int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
	TEST_ASSERT(fd >= 0);
	::close(fd);
	return fd;
}

inline virtkit::FileDesc open_dev()
{
	return virtkit::FileDesc::open(dev_path, O_RDWR | O_CLOEXEC);
}

inline long attach(int dev, int vm_fd)
{
	virtkit_attach_vm a{};
	a.vm_fd = vm_fd;
	return sys_ioctl(dev, VIRTKIT_ATTACH_VM, &a);
}
inline virtkit::FileDesc attach_ok(int dev, int vm_fd)
{
	return adopt(attach(dev, vm_fd), "VIRTKIT_ATTACH_VM");
}

inline long spp_enable(int vk)
{
	virtkit_spp_enable e{};
	return sys_ioctl(vk, VIRTKIT_SPP_ENABLE, &e);
}

inline virtkit_spp_access access_arg(u64 gfn, u64 npages, const void *maps)
{
	virtkit_spp_access a{};
	a.gfn = gfn;
	a.npages = npages;
	a.maps = reinterpret_cast<u64>(maps);
	return a;
}
inline long spp_set(int vk, u64 gfn, u64 npages, const u32 *maps)
{
	auto a = access_arg(gfn, npages, maps);
	return sys_ioctl(vk, VIRTKIT_SPP_SET_ACCESS, &a);
}
inline long spp_set(int vk, u64 gfn, const std::vector<u32> &maps)
{
	return spp_set(vk, gfn, maps.size(), maps.data());
}
inline long spp_get(int vk, u64 gfn, u64 npages, u32 *maps)
{
	auto a = access_arg(gfn, npages, maps);
	return sys_ioctl(vk, VIRTKIT_SPP_GET_ACCESS, &a);
}
inline long spp_stats(int vk, virtkit_spp_stats *s)
{
	return sys_ioctl(vk, VIRTKIT_SPP_GET_STATS, s);
}
inline long vcpu_run(int vk, int vcpu_fd)
{
	virtkit_vcpu_run r{};
	r.vcpu_fd = vcpu_fd;
	return sys_ioctl(vk, VIRTKIT_VCPU_RUN, &r);
}

} // namespace kmt

/* expr (a kmt call) failed with err. */
#define EXPECT_ERRNO(expr, err)                                                \
	do {                                                                   \
		long vk_r_ = (expr);                                           \
		if (vk_r_ != -static_cast<long>(err))                          \
			::vkt::fail(__FILE__, __LINE__,                        \
				    ::vkt::format("%s: expected %s, got %s",   \
						  #expr,                       \
						  ::virtkit::errno_name(err).c_str(), \
						  ::kmt::result_name(vk_r_).c_str())); \
	} while (0)

/* expr (a kmt call) succeeded. */
#define EXPECT_OK(expr)                                                        \
	do {                                                                   \
		long vk_r_ = (expr);                                           \
		if (vk_r_ < 0)                                                 \
			::vkt::fail(__FILE__, __LINE__,                        \
				    ::vkt::format("%s failed: %s", #expr,      \
						  ::kmt::result_name(vk_r_).c_str())); \
	} while (0)

namespace kmt {

inline std::vector<u32> get_maps(int vk, u64 gfn, u64 npages)
{
	std::vector<u32> m(npages, 0x0badf00du);
	EXPECT_OK(spp_get(vk, gfn, npages, m.data()));
	return m;
}

inline virtkit_spp_stats stats(int vk)
{
	virtkit_spp_stats s;
	std::memset(&s, 0xa5, sizeof(s));
	EXPECT_OK(spp_stats(vk, &s));
	for (auto r : s.reserved)
		TEST_ASSERT_EQ(r, 0u);
	return s;
}

/* /sys/module/NAME/refcnt, or -1 when there is none. */
inline long module_refcnt(const char *name)
{
	std::ifstream f(std::string("/sys/module/") + name + "/refcnt");
	long v = -1;
	if (!(f >> v))
		return -1;
	return v;
}

/* The KVM vendor module: every VM, VM fd and vCPU fd holds a reference. */
inline const char *kvm_vendor_module()
{
	return access("/sys/module/kvm_intel", F_OK) == 0 ? "kvm_intel" : "kvm_amd";
}

/* A VM and vCPUs made with raw KVM ioctls, without memory: for fd games. */
struct RawVm {
	virtkit::FileDesc vm;
	std::vector<virtkit::FileDesc> vcpus;

	explicit RawVm(unsigned nvcpus = 1)
	{
		vm = adopt(sys_ioctl(vkt::kvm().fd().get(), KVM_CREATE_VM, 0ul), "KVM_CREATE_VM");
		for (unsigned i = 0; i < nvcpus; i++)
			vcpus.push_back(adopt(sys_ioctl(vm.get(), KVM_CREATE_VCPU, (unsigned long)i),
					      "KVM_CREATE_VCPU"));
	}
};

/*
 * The vcpu_fd check every per-vCPU ioctl shares (virtkit_vcpu_fget() in
 * the module). call(vk, fd) issues the ioctl on the per-VM file vk with
 * vcpu_fd = fd; dev is the /dev/virtkit file vk came from, vm_fd its VM
 * and vcpu_fd one of its vCPUs. Descriptors not open give EBADF; every
 * file that is not a vCPU of vk's VM gives EINVAL (name: the ioctl, for
 * messages), and so does vcpu_fd on another VM's per-VM file.
 */
template <class Call>
void expect_only_own_vcpus(const char *name, int dev, int vk, int vm_fd, int vcpu_fd, Call call)
{
	RawVm other(1);
	auto other_dev = open_dev();
	auto other_vk = attach_ok(other_dev.get(), other.vm.get());
	auto null = virtkit::FileDesc::open("/dev/null", O_RDWR | O_CLOEXEC);
	int pipefd[2];
	TEST_ASSERT(pipe2(pipefd, O_CLOEXEC) == 0);
	virtkit::FileDesc pipe_r = virtkit::FileDesc::adopt(pipefd[0], "pipe2");
	virtkit::FileDesc pipe_w = virtkit::FileDesc::adopt(pipefd[1], "pipe2");

	EXPECT_ERRNO(call(vk, -1), EBADF);
	EXPECT_ERRNO(call(vk, closed_fd()), EBADF);
	EXPECT_ERRNO(call(vk, INT_MAX), EBADF);
	std::vector<std::pair<int, std::string>> not_vcpu = {
		{other.vcpus[0].get(), "another VM's vCPU"},
		{vm_fd, "the VM fd"},
		{other.vm.get(), "another VM fd"},
		{vkt::kvm().fd().get(), "/dev/kvm"},
		{vk, "the per-VM fd"},
		{other_vk.get(), "another per-VM fd"},
		{dev, "/dev/virtkit"},
		{null.get(), "/dev/null"},
		{pipe_r.get(), "a pipe"},
	};
	/* KVM's statistics files point at the VM and the vCPU too. */
	std::vector<virtkit::FileDesc> stats;
	if (vkt::kvm().has(KVM_CAP_BINARY_STATS_FD)) {
		for (int fd : {vm_fd, vcpu_fd}) {
			stats.push_back(adopt(sys_ioctl(fd, KVM_GET_STATS_FD, 0ul), "KVM_GET_STATS_FD"));
			not_vcpu.push_back({stats.back().get(),
					    fd == vm_fd ? "the VM's stats fd" : "the vCPU's stats fd"});
		}
	}
	for (auto &[fd, what] : not_vcpu) {
		long r = call(vk, fd);
		TEST_ASSERT(r == -EINVAL, "%s(%s): expected EINVAL, got %s", name, what.c_str(),
			    result_name(r).c_str());
	}
	/* The other VM's per-VM file refuses this VM's vCPU. */
	long r = call(other_vk.get(), vcpu_fd);
	TEST_ASSERT(r == -EINVAL, "%s(this VM's vCPU on another per-VM fd): expected EINVAL, got %s",
		    name, result_name(r).c_str());
}

/* The kvm_run of a vCPU fd, mapped once more (KVM allows any number). */
inline virtkit::Mapping map_run(int vcpu_fd)
{
	return virtkit::Mapping::map(vkt::kvm().vcpu_mmap_size(), PROT_READ | PROT_WRITE,
				     MAP_SHARED, vcpu_fd, 0, "vcpu kvm_run");
}

/*
 * Runs a GuestVm vCPU with VIRTKIT_VCPU_RUN on the per-VM fd vk, handling
 * the exits here: MMIO exits go to on_mmio (default: drop the write, as
 * ROM would) and are counted; a ucall ends until_ucall().
 */
struct GuestRunner {
	virtkit::x86::GuestVm &g;
	virtkit::Vcpu &v;
	int vk;
	virtkit::Mapping map;
	kvm_run *run;
	std::function<void(const kvm_run &)> on_mmio;
	u64 mmio_exits = 0;

	GuestRunner(virtkit::x86::GuestVm &guest, virtkit::Vcpu &vcpu, int vkfd)
		: g(guest), v(vcpu), vk(vkfd), map(map_run(vcpu.fd())), run(map.as<kvm_run>())
	{
	}

	/* The ucall behind an I/O exit, if it is one. */
	std::optional<virtkit::x86::Ucall> ucall()
	{
		if (run->exit_reason != KVM_EXIT_IO)
			return std::nullopt;
		virtkit::IoExit io{
			.direction = run->io.direction == KVM_EXIT_IO_OUT
					     ? virtkit::IoExit::Direction::out
					     : virtkit::IoExit::Direction::in,
			.port = run->io.port,
			.size = run->io.size,
			.count = run->io.count,
			.data = {reinterpret_cast<std::byte *>(run) + run->io.data_offset,
				 std::size_t(run->io.size) * run->io.count},
		};
		return g.ucall(v, virtkit::Exit{io});
	}

	/* VIRTKIT_VCPU_RUN until the guest's next GUEST_SYNC or DONE. */
	virtkit::x86::Ucall until_ucall()
	{
		using Kind = virtkit::x86::Ucall::Kind;
		for (;;) {
			long r = vcpu_run(vk, v.fd());
			if (r != 0)
				vkt::fail(__FILE__, __LINE__,
					  "VIRTKIT_VCPU_RUN: " + result_name(r));
			if (run->exit_reason == KVM_EXIT_MMIO) {
				mmio_exits++;
				if (on_mmio)
					on_mmio(*run);
				continue;
			}
			auto uc = ucall();
			if (!uc)
				vkt::fail(__FILE__, __LINE__,
					  "unexpected exit " + virtkit::exit_reason_name(run->exit_reason) +
						  vkt::format(" at rip=0x%llx",
							      (unsigned long long)v.regs().rip));
			if (uc->kind == Kind::print)
				continue;
			if (uc->kind == Kind::assert_failed || uc->kind == Kind::unhandled_exception)
				throw virtkit::x86::GuestFailure(uc->describe(), uc);
			return *uc;
		}
	}
};

/*
 * The fast path's memslot layout, made by hand: the protected pages are one
 * read-only region (the VMM's mapping of it stays writable), control words
 * and a protected page in plain RAM, and a page without a memslot.
 */
inline constexpr u32 ALL = VIRTKIT_SPP_ALL_WRITABLE;
inline constexpr u64 prot_gpa = 0x40000000;	/* read-only region */
inline constexpr u64 prot_pages = 8;
inline constexpr u64 ctl_gpa = 0x40100000;	/* RAM: control words */
inline constexpr u64 ram_gpa = 0x40200000;	/* RAM: a protected page in a RW slot */
inline constexpr u64 mmio_gpa = 0xd0000000;	/* no memslot */

constexpr u64 page(u64 n) { return prot_gpa + n * 4096; }
constexpr u32 deny(unsigned subpage) { return ~(1u << subpage); }

/* A GuestVm with the read-only region, attached to the module, SPP enabled. */
struct FastGuest {
	virtkit::x86::GuestVm g{vkt::kvm()};
	virtkit::FileDesc dev = open_dev();
	virtkit::FileDesc vk;

	explicit FastGuest(bool enable = true)
	{
		g.memory().add(prot_gpa, prot_pages * 4096, {.readonly = true, .name = "protected"});
		g.memory().add(ctl_gpa, 4096, {.name = "ctl"});
		g.memory().add(ram_gpa, 4096, {.name = "ram"});
		g.identity_map(prot_gpa, prot_pages * 4096);
		g.identity_map(ctl_gpa, 4096);
		g.identity_map(ram_gpa, 4096);
		g.identity_map(mmio_gpa, 4096);
		vk = attach_ok(dev.get(), g.vm().fd());
		if (enable)
			EXPECT_OK(spp_enable(vk.get()));
	}
	void protect(u64 gpa, u32 map) { EXPECT_OK(spp_set(vk.get(), gpa / 4096, 1, &map)); }
	u64 read64(u64 gpa) { return g.memory().read_obj<u64>(gpa); }
	virtkit_spp_stats st() { return stats(vk.get()); }
};

using vkt::env_u64;
using vkt::Rng;

} // namespace kmt
