// SPDX-License-Identifier: MIT
#include "kmod/kmod_vm.hpp"

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <string>

#include <virtkit/error.hpp>

#include "core/feature_slots.hpp"
#include "core/ioctl.hpp"
#include "kmod/uapi_layout.hpp"

namespace virtkit::detail {

KmodDevice KmodDevice::open(const char *path)
{
	try {
		FileDesc fd = FileDesc::open(path, O_RDWR | O_CLOEXEC);
		int v = VK_IOCTL_VAL(fd.get(), VIRTKIT_GET_API_VERSION, 0, path, -1);
		if (v != VIRTKIT_API_VERSION)
			throw Error("VIRTKIT_GET_API_VERSION", EPROTO,
				    std::string(path) + " speaks API version " + std::to_string(v) +
					    ", this libvirtkit speaks version " +
					    std::to_string(VIRTKIT_API_VERSION));
		return KmodDevice(std::move(fd));
	} catch (const Error &e) {
		if (e.operation() != "open" || (e.err() != ENOENT && e.err() != ENODEV &&
						e.err() != ENXIO))
			throw;
		throw Error("open", e.err(),
			    std::string(path) + ": the virtkit kernel module (virtkit.ko) "
						"is not loaded");
	}
}

int KmodDevice::check_extension(long cap) const
{
	return VK_IOCTL_VAL(fd(), VIRTKIT_CHECK_EXTENSION, cap,
			    "/dev/virtkit cap=" + std::to_string(cap), -1);
}

KmodVm KmodDevice::attach(int vm_fd) const
{
	virtkit_attach_vm a{};
	a.vm_fd = vm_fd;
	int r = typed_ioctl<VIRTKIT_ATTACH_VM>(fd(), &a);
	FileDesc vm = FileDesc::adopt(r, "VIRTKIT_ATTACH_VM",
				      ("vm fd " + std::to_string(vm_fd)).c_str());
	int max = VK_IOCTL_VAL(vm.get(), VIRTKIT_CHECK_EXTENSION, VIRTKIT_CAP_SPP_MAX_PAGES,
			       "per-VM file, VIRTKIT_CAP_SPP_MAX_PAGES", vm_fd);
	return KmodVm(std::move(vm), max > 0 ? static_cast<std::uint64_t>(max) : 0);
}

int KmodVm::check_extension(long cap) const
{
	return VK_IOCTL_VAL(fd(), VIRTKIT_CHECK_EXTENSION, cap,
			    "per-VM file cap=" + std::to_string(cap), -1);
}

void KmodVm::spp_enable() const
{
	virtkit_spp_enable e{};
	VK_IOCTL(fd(), VIRTKIT_SPP_ENABLE, &e, "per-VM file", -1);
}

int KmodVm::spp_set(std::uint64_t gfn, std::span<const std::uint32_t> maps) const noexcept
{
	virtkit_spp_access a{};
	a.gfn = gfn;
	a.npages = maps.size();
	a.maps = reinterpret_cast<std::uintptr_t>(maps.data());
	return typed_ioctl<VIRTKIT_SPP_SET_ACCESS>(fd(), &a) < 0 ? errno : 0;
}

int KmodVm::spp_get(std::uint64_t gfn, std::span<std::uint32_t> maps) const noexcept
{
	for (std::size_t done = 0; done < maps.size();) {
		std::uint64_t n = std::min<std::uint64_t>(maps.size() - done,
							  max_pages_ ? max_pages_ : 1);
		virtkit_spp_access a{};
		a.gfn = gfn + done;
		a.npages = n;
		a.maps = reinterpret_cast<std::uintptr_t>(maps.data() + done);
		if (typed_ioctl<VIRTKIT_SPP_GET_ACCESS>(fd(), &a) < 0)
			return errno;
		done += n;
	}
	return 0;
}

virtkit_spp_stats KmodVm::spp_stats() const
{
	virtkit_spp_stats s{};
	VK_IOCTL(fd(), VIRTKIT_SPP_GET_STATS, &s, "per-VM file", -1);
	return s;
}

int KmodVm::enter(int vcpu_fd) const noexcept
{
	auto arg = run_arg(vcpu_fd);
	return typed_ioctl<run_request>(fd(), &arg);
}

bool KmodVm::guest_wrmsr(int vcpu_fd, std::uint32_t msr, std::uint64_t value) const
{
	virtkit_guest_wrmsr w{};
	w.vcpu_fd = vcpu_fd;
	w.index = msr;
	w.data = value;
	char what[96];
	std::snprintf(what, sizeof(what), "vcpu fd %d MSR 0x%x = 0x%llx", vcpu_fd, msr,
		      static_cast<unsigned long long>(value));
	VK_IOCTL(fd(), VIRTKIT_VCPU_GUEST_WRMSR, &w, what, -1);
	return w.result == VIRTKIT_GUEST_WRMSR_WRITTEN;
}

KmodVm &attach_kmod(Vm &vm)
{
	return RunControl::features(vm).get_or_attach<KmodVm>([&] {
		return std::make_unique<KmodVm>(KmodDevice::open().attach(vm.fd()));
	});
}

} // namespace virtkit::detail
