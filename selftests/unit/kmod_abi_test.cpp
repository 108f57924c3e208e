// SPDX-License-Identifier: MIT
/*
 * virtkit.ko's ABI as libvirtkit uses it (uapi/linux/virtkit.h): struct
 * layout, ioctl numbers, the argument builders, opening a device that is not
 * virtkit, and the local SPP store's errno mapping.
 */
#include <catch2/catch.hpp>

#include <linux/virtkit.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <virtkit/error.hpp>

#include "kmod/kmod_vm.hpp"
#include "spp/store.hpp"
#include "kmod/uapi_layout.hpp" /* the compile-time size and offset checks */

using Catch::Matchers::Contains;
using virtkit::Error;
using namespace virtkit::detail;

TEST_CASE("virtkit ioctls encode their argument size, magic and direction", "[kmod]")
{
	struct Ioctl {
		unsigned long req;
		unsigned nr, size, dir;
	};
	const Ioctl all[] = {
		{VIRTKIT_GET_API_VERSION, 0x00, 0, _IOC_NONE},
		{VIRTKIT_CHECK_EXTENSION, 0x01, 0, _IOC_NONE},
		{VIRTKIT_ATTACH_VM, 0x02, 32, _IOC_WRITE},
		{VIRTKIT_SPP_ENABLE, 0x10, 32, _IOC_WRITE},
		{VIRTKIT_SPP_SET_ACCESS, 0x11, 64, _IOC_WRITE},
		{VIRTKIT_SPP_GET_ACCESS, 0x12, 64, _IOC_WRITE},
		{VIRTKIT_SPP_GET_STATS, 0x13, 64, _IOC_READ},
		{VIRTKIT_VCPU_RUN, 0x20, 32, _IOC_WRITE},
	};
	std::set<unsigned long> seen;
	for (const auto &i : all) {
		CAPTURE(i.nr);
		CHECK(_IOC_TYPE(i.req) == 0xE7);
		CHECK(_IOC_NR(i.req) == i.nr);
		CHECK(_IOC_SIZE(i.req) == i.size);
		CHECK(_IOC_DIR(i.req) == i.dir);
		CHECK(seen.insert(i.req).second);
	}
	CHECK(std::string(kmod_device_path) == "/dev/virtkit");
}

TEST_CASE("the vCPU run argument names the vCPU and nothing else", "[kmod]")
{
	virtkit_vcpu_run r = KmodVm::run_arg(7);
	CHECK(r.vcpu_fd == 7);
	CHECK(r.flags == 0);
	for (auto x : r.reserved)
		CHECK(x == 0);
	CHECK(KmodVm::run_request == VIRTKIT_VCPU_RUN);
}

TEST_CASE("opening a missing virtkit device says the module is not loaded", "[kmod]")
{
	try {
		KmodDevice::open("/nonexistent/virtkit");
		FAIL("opened a missing device");
	} catch (const Error &e) {
		CHECK(e.err() == ENOENT);
		CHECK(e.operation() == "open");
		CHECK_THAT(e.what(), Contains("virtkit.ko") && Contains("not loaded"));
	}
}

TEST_CASE("a device that is not virtkit fails the version ioctl", "[kmod]")
{
	try {
		KmodDevice::open("/dev/null");
		FAIL("/dev/null answered VIRTKIT_GET_API_VERSION");
	} catch (const Error &e) {
		CHECK(e.err() == ENOTTY);
		CHECK(e.operation() == "VIRTKIT_GET_API_VERSION");
	}
}

TEST_CASE("SPP table codes map to errno values", "[spp][kmod]")
{
	CHECK(sppt_errno(VK_SPPT_OK) == 0);
	CHECK(sppt_errno(VK_SPPT_ENOMEM) == ENOMEM);
	CHECK(sppt_errno(VK_SPPT_ERANGE) == EINVAL);
	CHECK(sppt_errno(VK_SPPT_EMISCONFIG) == EIO);
}

TEST_CASE("the local SPP store keeps maps like the kernel's", "[spp]")
{
	LocalSppStore s;
	CHECK(s.kind() == virtkit::SppBackendKind::user);
	CHECK(std::string(s.op_name(true)).empty());
	CHECK(s.max_set_pages() == ~0ull);

	std::vector<std::uint32_t> got(4);
	REQUIRE(s.get(0x1000, got) == 0);
	for (auto m : got)
		CHECK(m == VK_SPP_ALL_WRITABLE);

	const std::vector<std::uint32_t> maps = {0u, 0xffff0000u, VK_SPP_ALL_WRITABLE, 1u};
	REQUIRE(s.set(0x1000, maps) == 0);
	REQUIRE(s.get(0x1000, got) == 0);
	CHECK(got == maps);

	/* Beyond the table, or wrapping: EINVAL, nothing changed. */
	CHECK(s.set(VK_SPPT_GFN_LIMIT - 1, maps) == EINVAL);
	CHECK(s.get(VK_SPPT_GFN_LIMIT, got) == EINVAL);
	CHECK(s.fill(~0ull, 2, 0) == EINVAL);
	REQUIRE(s.get(0x1000, got) == 0);
	CHECK(got == maps);

	REQUIRE(s.fill(0x1000, 4, VK_SPP_ALL_WRITABLE) == 0);
	REQUIRE(s.get(0x1000, got) == 0);
	for (auto m : got)
		CHECK(m == VK_SPP_ALL_WRITABLE);
}
