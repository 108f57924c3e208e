// SPDX-License-Identifier: MIT
/*
 * virtkit.ko's ABI as userspace sees it: the device node, the version and
 * capability queries on /dev/virtkit and on the per-VM file, unknown
 * ioctls, the per-VM file's flags and the layout of every argument struct.
 */
#include "kmod_util.hpp"

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <climits>
#include <cstddef>

using namespace kmt;

/* The layout is ABI: the module checks the same with BUILD_BUG_ON. */
static_assert(sizeof(virtkit_attach_vm) == 32);
static_assert(sizeof(virtkit_spp_enable) == 32);
static_assert(sizeof(virtkit_spp_access) == 64);
static_assert(offsetof(virtkit_spp_access, maps) == 16);
static_assert(offsetof(virtkit_spp_access, flags) == 24);
static_assert(offsetof(virtkit_spp_access, reserved) == 32);
static_assert(sizeof(virtkit_spp_stats) == 64);
static_assert(offsetof(virtkit_spp_stats, reserved) == 32);
static_assert(sizeof(virtkit_vcpu_run) == 32);
static_assert(sizeof(virtkit_guest_wrmsr) == 64);
static_assert(VIRTKIT_IO == 0xE7);
static_assert(VIRTKIT_SPP_GFN_LIMIT == 1ull << 36);
static_assert(_IOC_SIZE(VIRTKIT_SPP_SET_ACCESS) == 64 && _IOC_DIR(VIRTKIT_SPP_SET_ACCESS) == _IOC_WRITE);
static_assert(_IOC_SIZE(VIRTKIT_SPP_GET_STATS) == 64 && _IOC_DIR(VIRTKIT_SPP_GET_STATS) == _IOC_READ);

VK_TEST(device_node)
{
	require_module();
	struct stat st;
	TEST_ASSERT(stat(dev_path, &st) == 0, "stat(%s): %s", dev_path, strerror(errno));
	TEST_ASSERT(S_ISCHR(st.st_mode), "%s is not a character device (mode 0%o)", dev_path,
		    st.st_mode);
	TEST_ASSERT_EQ(major(st.st_rdev), 10u); /* a misc device */
	vkt::diag("%s: char 10:%u mode 0%o", dev_path, minor(st.st_rdev), st.st_mode & 07777);
	/* Owner and group read and write (the misc device's 0660; udev may widen it). */
	TEST_ASSERT((st.st_mode & 0660) == 0660, "mode 0%o", st.st_mode & 07777);
	/* The module parameter of the SPP table budget. */
	std::ifstream p("/sys/module/virtkit/parameters/spp_max_table_pages");
	unsigned long budget = 0;
	TEST_ASSERT(p >> budget, "spp_max_table_pages is not readable");
	TEST_ASSERT(budget > 0);
}

VK_TEST(api_version)
{
	require_module();
	auto dev = open_dev();
	TEST_ASSERT_EQ(sys_ioctl(dev.get(), VIRTKIT_GET_API_VERSION, 0ul), VIRTKIT_API_VERSION);
	TEST_ASSERT_EQ(VIRTKIT_API_VERSION, 1);
	for (unsigned long arg : {1ul, 2ul, 0x80000000ul, ~0ul})
		EXPECT_ERRNO(sys_ioctl(dev.get(), VIRTKIT_GET_API_VERSION, arg), EINVAL);

	RawVm vm(0);
	auto vk = attach_ok(dev.get(), vm.vm.get());
	TEST_ASSERT_EQ(sys_ioctl(vk.get(), VIRTKIT_GET_API_VERSION, 0ul), VIRTKIT_API_VERSION);
	EXPECT_ERRNO(sys_ioctl(vk.get(), VIRTKIT_GET_API_VERSION, 1ul), EINVAL);
}

static void check_extensions(int fd)
{
	TEST_ASSERT_EQ(sys_ioctl(fd, VIRTKIT_CHECK_EXTENSION, (unsigned long)VIRTKIT_CAP_SPP), 1);
	TEST_ASSERT_EQ(sys_ioctl(fd, VIRTKIT_CHECK_EXTENSION,
				 (unsigned long)VIRTKIT_CAP_SPP_FAST_WRITE), 1);
	long max = sys_ioctl(fd, VIRTKIT_CHECK_EXTENSION, (unsigned long)VIRTKIT_CAP_SPP_MAX_PAGES);
	TEST_ASSERT(max > 0, "VIRTKIT_CAP_SPP_MAX_PAGES = %s", result_name(max).c_str());
	TEST_ASSERT_EQ(sys_ioctl(fd, VIRTKIT_CHECK_EXTENSION, (unsigned long)VIRTKIT_CAP_PKS), 0);
	/* 1 where KVM exports its guest MSR write to modules (kmod_msr checks which). */
	long wrmsr = sys_ioctl(fd, VIRTKIT_CHECK_EXTENSION, (unsigned long)VIRTKIT_CAP_GUEST_WRMSR);
	TEST_ASSERT(wrmsr == 0 || wrmsr == 1, "VIRTKIT_CAP_GUEST_WRMSR = %s",
		    result_name(wrmsr).c_str());
	/* Unknown capabilities are absent, not an error. */
	for (unsigned long cap : {0ul, 6ul, 0x100ul, 0xffffffffUL, ~0ul, 1ul << 32 | 1})
		TEST_ASSERT_EQ(sys_ioctl(fd, VIRTKIT_CHECK_EXTENSION, cap), 0);
}

VK_TEST(check_extension_on_device_and_vm)
{
	require_module();
	auto dev = open_dev();
	check_extensions(dev.get());
	RawVm vm(0);
	auto vk = attach_ok(dev.get(), vm.vm.get());
	check_extensions(vk.get());
	/* The same answer everywhere. */
	TEST_ASSERT_EQ(sys_ioctl(dev.get(), VIRTKIT_CHECK_EXTENSION,
				 (unsigned long)VIRTKIT_CAP_SPP_MAX_PAGES),
		       sys_ioctl(vk.get(), VIRTKIT_CHECK_EXTENSION,
				 (unsigned long)VIRTKIT_CAP_SPP_MAX_PAGES));
	vkt::diag("VIRTKIT_CAP_SPP_MAX_PAGES = %ld",
		  sys_ioctl(dev.get(), VIRTKIT_CHECK_EXTENSION,
			    (unsigned long)VIRTKIT_CAP_SPP_MAX_PAGES));
}

VK_TEST(unknown_ioctls_are_enotty)
{
	require_module();
	auto dev = open_dev();
	RawVm vm(1);
	auto vk = attach_ok(dev.get(), vm.vm.get());
	char buf[256] = {};

	/* /dev/virtkit: per-VM ioctls, free numbers, other types, wrong sizes. */
	const unsigned long dev_bad[] = {
		VIRTKIT_SPP_ENABLE, VIRTKIT_SPP_SET_ACCESS, VIRTKIT_SPP_GET_ACCESS,
		VIRTKIT_SPP_GET_STATS, VIRTKIT_VCPU_RUN, VIRTKIT_VCPU_GUEST_WRMSR,
		_IO(VIRTKIT_IO, 0x03), _IO(VIRTKIT_IO, 0xff), _IO(VIRTKIT_IO, 0x02),
		_IOR(VIRTKIT_IO, 0x02, struct virtkit_attach_vm),
		_IOW(VIRTKIT_IO, 0x02, std::uint64_t), _IOWR(VIRTKIT_IO, 0x00, int),
		KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CHECK_EXTENSION, TCGETS, 0, ~0u,
	};
	for (unsigned long cmd : dev_bad)
		TEST_ASSERT(sys_ioctl(dev.get(), cmd, buf) == -ENOTTY, "/dev/virtkit cmd 0x%lx: %s",
			    cmd, result_name(sys_ioctl(dev.get(), cmd, buf)).c_str());

	/* The per-VM file: ATTACH_VM, KVM's own ioctls, wrong sizes or directions. */
	const unsigned long vm_bad[] = {
		VIRTKIT_ATTACH_VM, _IO(VIRTKIT_IO, 0x14), _IO(VIRTKIT_IO, 0x21),
		_IOW(VIRTKIT_IO, 0x11, std::uint32_t), _IOR(VIRTKIT_IO, 0x12, struct virtkit_spp_access),
		_IOW(VIRTKIT_IO, 0x13, struct virtkit_spp_stats),
		_IOW(VIRTKIT_IO, 0x20, std::uint64_t), _IO(VIRTKIT_IO, 0x10),
		_IOW(VIRTKIT_IO, 0x21, struct virtkit_guest_wrmsr),
		_IOR(VIRTKIT_IO, 0x21, struct virtkit_guest_wrmsr),
		KVM_RUN, KVM_CREATE_VCPU, KVM_GET_API_VERSION, TCGETS, 0, ~0u,
	};
	for (unsigned long cmd : vm_bad)
		TEST_ASSERT(sys_ioctl(vk.get(), cmd, buf) == -ENOTTY, "per-VM file cmd 0x%lx: %s",
			    cmd, result_name(sys_ioctl(vk.get(), cmd, buf)).c_str());
	/* Nothing was enabled by any of them. */
	virtkit_spp_stats s;
	EXPECT_ERRNO(spp_stats(vk.get(), &s), ENOENT);
}

VK_TEST(per_vm_file)
{
	require_module();
	auto dev = open_dev();
	RawVm vm(0);
	auto vk = attach_ok(dev.get(), vm.vm.get());
	int fl = fcntl(vk.get(), F_GETFD);
	TEST_ASSERT(fl >= 0 && (fl & FD_CLOEXEC), "the per-VM fd is not O_CLOEXEC (F_GETFD 0x%x)",
		    fl);
	int st = fcntl(vk.get(), F_GETFL);
	TEST_ASSERT((st & O_ACCMODE) == O_RDWR, "F_GETFL 0x%x", st);
	char link[256] = {};
	std::string path = "/proc/self/fd/" + std::to_string(vk.get());
	TEST_ASSERT(readlink(path.c_str(), link, sizeof(link) - 1) > 0);
	TEST_ASSERT(std::string(link) == "anon_inode:virtkit-vm", "%s -> %s", path.c_str(), link);
	/* Not a stream: read, write and mmap are refused. */
	char b[8];
	TEST_ASSERT(read(vk.get(), b, sizeof(b)) < 0);
	TEST_ASSERT(write(vk.get(), b, sizeof(b)) < 0);
	void *p = mmap(nullptr, 4096, PROT_READ, MAP_SHARED, vk.get(), 0);
	TEST_ASSERT(p == MAP_FAILED);
	/* Nor is /dev/virtkit. */
	TEST_ASSERT(read(dev.get(), b, sizeof(b)) < 0);
	/* A read-only open of /dev/virtkit answers queries too. */
	auto ro = virtkit::FileDesc::open(dev_path, O_RDONLY | O_CLOEXEC);
	TEST_ASSERT_EQ(sys_ioctl(ro.get(), VIRTKIT_GET_API_VERSION, 0ul), 1);
}
