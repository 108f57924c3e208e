// SPDX-License-Identifier: MIT
#include <virtkit/system.hpp>

#include <cpuid.h>
#include <fcntl.h>

#include <algorithm>
#include <cerrno>

#include <virtkit/cpuid.hpp>
#include <virtkit/error.hpp>
#include <virtkit/platform.hpp>
#include <virtkit/vm.hpp>

#include "core/ioctl.hpp"
#include "core/vm_state.hpp"

namespace virtkit {

using detail::hex;

System System::open(const char *path)
{
	FileDesc fd = FileDesc::open(path, O_RDWR);
	int version = VK_IOCTL_VAL(fd.get(), KVM_GET_API_VERSION, 0, path, -1);
	if (version != KVM_API_VERSION)
		throw Error("KVM_GET_API_VERSION", ENOTSUP,
			    std::string(path) + " speaks API " + std::to_string(version) +
				    ", virtkit needs " + std::to_string(KVM_API_VERSION));
	int size = VK_IOCTL_VAL(fd.get(), KVM_GET_VCPU_MMAP_SIZE, 0, path, -1);
	return System(std::move(fd), static_cast<std::size_t>(size));
}

int System::api_version() const
{
	return VK_IOCTL_VAL(fd_.get(), KVM_GET_API_VERSION, 0, "", -1);
}

int System::check_extension(long cap) const
{
	int r = detail::value_ioctl<KVM_CHECK_EXTENSION>(fd_.get(), cap);
	return r < 0 ? 0 : r;
}

std::vector<kvm_cpuid_entry2> System::supported_cpuid() const
{
	for (std::uint32_t n = 64;; n *= 2) {
		std::vector<std::byte> buf(sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2));
		auto *c = reinterpret_cast<kvm_cpuid2 *>(buf.data());
		c->nent = n;
		if (detail::typed_ioctl<KVM_GET_SUPPORTED_CPUID>(fd_.get(), c) == 0)
			return {c->entries, c->entries + c->nent};
		if (errno != E2BIG || n >= 4096)
			detail::throw_ioctl_error("KVM_GET_SUPPORTED_CPUID",
						  "nent=" + std::to_string(n));
	}
}

std::vector<std::uint32_t> System::msr_list(unsigned long req, const char *name) const
{
	kvm_msr_list probe{};
	/* The first call fails with E2BIG and reports the count. */
	if (::ioctl(fd_.get(), req, &probe) < 0 && errno != E2BIG)
		detail::throw_ioctl_error(name, "nmsrs=0");
	std::vector<std::byte> buf(sizeof(kvm_msr_list) + probe.nmsrs * sizeof(std::uint32_t));
	auto *l = reinterpret_cast<kvm_msr_list *>(buf.data());
	l->nmsrs = probe.nmsrs;
	if (::ioctl(fd_.get(), req, l) < 0)
		detail::throw_ioctl_error(name, "nmsrs=" + std::to_string(probe.nmsrs));
	return {l->indices, l->indices + l->nmsrs};
}

std::vector<std::uint32_t> System::msr_index_list() const
{
	static_assert(_IOC_SIZE(KVM_GET_MSR_INDEX_LIST) == sizeof(kvm_msr_list));
	return msr_list(KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST");
}

std::vector<std::uint32_t> System::feature_msr_index_list() const
{
	static_assert(_IOC_SIZE(KVM_GET_MSR_FEATURE_INDEX_LIST) == sizeof(kvm_msr_list));
	if (!has(KVM_CAP_GET_MSR_FEATURES))
		return {};
	return msr_list(KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST");
}

/* Whether KVM saves and restores IA32_PKRS. */
static bool lists_pkrs(const System &sys)
{
	return std::ranges::count(sys.msr_index_list(), PksSupport::pkrs_msr) > 0;
}

PksSupport System::pks_support() const
{
	PksSupport p;
	const auto cpuid = supported_cpuid();
	if (auto *e = cpuid_find(cpuid, 7, 0))
		p.cpuid = e->ecx >> 31 & 1;
	p.msr = lists_pkrs(*this);
	return p;
}

std::string PksSupport::missing() const
{
	std::string s;
	if (!cpuid)
		s = "KVM_GET_SUPPORTED_CPUID (7,0):ECX[31] clear";
	if (!msr)
		s += std::string(s.empty() ? "" : "; ") + "IA32_PKRS (" + hex(pkrs_msr) +
		     ") not in KVM_GET_MSR_INDEX_LIST";
	return s;
}

Vm System::create_vm(const VmOptions &options) const
{
	/* Dirty ring size: a power of two of kvm_dirty_gfn entries, within the cap. */
	if (options.dirty_ring_bytes) {
		int max = check_extension(KVM_CAP_DIRTY_LOG_RING);
		std::uint32_t b = options.dirty_ring_bytes;
		if (!max)
			throw Error("KVM_ENABLE_CAP", ENOTSUP,
				    "KVM_CAP_DIRTY_LOG_RING is not offered by this host");
		if ((b & (b - 1)) || b < 4096 || b > static_cast<std::uint32_t>(max))
			throw Error("System::create_vm", EINVAL,
				    "dirty_ring_bytes=" + std::to_string(b) +
					    " must be a power of two in [4096, " +
					    std::to_string(max) + "]");
	}

	FileDesc vm = FileDesc::adopt(
		detail::value_ioctl<KVM_CREATE_VM>(fd_.get(), options.type),
		"KVM_CREATE_VM", ("type=" + std::to_string(options.type)).c_str());

	int slots = detail::value_ioctl<KVM_CHECK_EXTENSION>(vm.get(), KVM_CAP_NR_MEMSLOTS);
	if (slots <= 0)
		slots = 32;
	/* Intel without unrestricted guest needs a TSS for real mode; harmless elsewhere. */
	if (check_extension(KVM_CAP_SET_TSS_ADDR))
		detail::value_ioctl<KVM_SET_TSS_ADDR>(vm.get(), 0xfffbd000ul);

	if (options.dirty_ring_bytes) {
		kvm_enable_cap cap{};
		cap.cap = check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
				  ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL
				  : KVM_CAP_DIRTY_LOG_RING;
		cap.args[0] = options.dirty_ring_bytes;
		VK_IOCTL(vm.get(), KVM_ENABLE_CAP, &cap,
			 "KVM_CAP_DIRTY_LOG_RING bytes=" + std::to_string(cap.args[0]), vm.get());
	}

	auto state = std::make_shared<detail::VmState>(std::move(vm), vcpu_mmap_size_,
						       static_cast<std::uint32_t>(slots),
						       options.dirty_ring_bytes);
	state->paging.pkrs_listed = lists_pkrs(*this);
	state->paging.features = detail::paging_features(supported_cpuid());
	if (platform::tdp_enabled()) {
		unsigned int a, b, c, d;
		state->paging.tdp_page1gb = __get_cpuid(0x80000001, &a, &b, &c, &d) && (d >> 26 & 1);
	}
	return Vm(std::move(state));
}

} // namespace virtkit
