// SPDX-License-Identifier: MIT
/*
 * Internal: the virtkit kernel module (virtkit.ko) as libvirtkit sees it -
 * /dev/virtkit and the per-VM file VIRTKIT_ATTACH_VM returns
 * (uapi/linux/virtkit.h, Documentation/spp.rst). Move-only owners; every
 * failure is an Error naming the ioctl and its errno.
 */
#pragma once

#include <linux/virtkit.h>

#include <cstdint>
#include <span>

#include <virtkit/fd.hpp>
#include <virtkit/spp.hpp>
#include <virtkit/vm.hpp>

#include "core/run_control.hpp"

namespace virtkit::detail {

inline constexpr const char kmod_device_path[] = "/dev/" VIRTKIT_DEVICE_NAME;

class KmodVm;

/* An open /dev/virtkit whose API version libvirtkit speaks. */
class KmodDevice {
public:
	/*
	 * Throws Error("open", ENOENT/ENODEV/...) with a hint that virtkit.ko
	 * is not loaded when the device is missing, and Error EPROTO naming
	 * both versions when the module speaks another API version.
	 */
	static KmodDevice open(const char *path = kmod_device_path);

	int fd() const noexcept { return fd_.get(); }
	/* VIRTKIT_CHECK_EXTENSION: the capability's value, 0 when absent. */
	int check_extension(long cap) const;
	/* VIRTKIT_ATTACH_VM of a KVM VM fd (EBUSY: attached already). */
	KmodVm attach(int vm_fd) const;

private:
	explicit KmodDevice(FileDesc fd) noexcept : fd_(std::move(fd)) {}
	FileDesc fd_;
};

/*
 * The per-VM file of one attached VM. As a RunEntry it is the module's fast
 * path into the guest (VIRTKIT_VCPU_RUN), which kmod SPP installs.
 */
class KmodVm final : public RunEntry {
public:
	KmodVm(KmodVm &&) noexcept = default;
	KmodVm &operator=(KmodVm &&) noexcept = default;

	int fd() const noexcept { return fd_.get(); }
	int check_extension(long cap) const;
	/* VIRTKIT_CAP_SPP_MAX_PAGES, asked once at attach: pages per SET/GET. */
	std::uint64_t spp_max_pages() const noexcept { return max_pages_; }

	/* VIRTKIT_SPP_ENABLE (idempotent); throws. */
	void spp_enable() const;
	/*
	 * VIRTKIT_SPP_SET_ACCESS / _GET_ACCESS of pages gfn .. gfn + size - 1:
	 * 0 or the errno. SET is one call (all or nothing; E2BIG above
	 * spp_max_pages()); GET is split into calls of spp_max_pages().
	 */
	int spp_set(std::uint64_t gfn, std::span<const std::uint32_t> maps) const noexcept;
	int spp_get(std::uint64_t gfn, std::span<std::uint32_t> maps) const noexcept;
	/* VIRTKIT_SPP_GET_STATS; throws. */
	virtkit_spp_stats spp_stats() const;

	/* Enter the guest: ioctl(fd(), run_request, &run_arg(vcpu_fd)). */
	static constexpr unsigned long run_request = VIRTKIT_VCPU_RUN;
	static virtkit_vcpu_run run_arg(int vcpu_fd) noexcept
	{
		virtkit_vcpu_run r{};
		r.vcpu_fd = vcpu_fd;
		return r;
	}
	/* RunEntry: that, in place of the vCPU's KVM_RUN. */
	int enter(int vcpu_fd) const noexcept override;

	/*
	 * VIRTKIT_VCPU_GUEST_WRMSR: msr = value written by KVM as the
	 * guest's own WRMSR on the vCPU vcpu_fd of this VM (needs
	 * VIRTKIT_CAP_GUEST_WRMSR). false when KVM refused it (the guest
	 * gets #GP, nothing written); throws Error naming the ioctl.
	 */
	bool guest_wrmsr(int vcpu_fd, std::uint32_t msr, std::uint64_t value) const;
	const char *name() const noexcept override { return "VIRTKIT_VCPU_RUN"; }

private:
	friend class KmodDevice;
	KmodVm(FileDesc fd, std::uint64_t max_pages) noexcept
		: fd_(std::move(fd)), max_pages_(max_pages) {}
	FileDesc fd_;
	std::uint64_t max_pages_;
};

/*
 * The VM's attachment to virtkit.ko (a feature slot, RunControl::features),
 * attaching it on first use; throws. It lives as long as the VM's state and
 * outlives every feature attached after it (feature_slots.hpp).
 */
KmodVm &attach_kmod(Vm &vm);

/*
 * Which backend `asked` means (Documentation/spp.rst): itself unless
 * automatic; then VIRTKIT_SPP_BACKEND=user|kmod when set (another value:
 * Error EINVAL), else kmod where /dev/virtkit exists and user elsewhere.
 * Every feature that may use virtkit.ko chooses with it.
 */
SppBackendKind choose_spp_backend(SppBackendKind asked);

} // namespace virtkit::detail
