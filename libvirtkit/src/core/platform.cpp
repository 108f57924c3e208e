// SPDX-License-Identifier: MIT
/*
 * The platform probes (virtkit/platform.hpp) that need only libvirtkit; the
 * ones that run a 64-bit guest are in the guest environment
 * (guest/src/guest_probes.cpp).
 */
#include <virtkit/platform.hpp>

#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include <virtkit/error.hpp>
#include <virtkit/exit.hpp>
#include <virtkit/system.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>

#include "core/ioctl.hpp"
#include "core/probe.hpp"

namespace virtkit {

std::string Probe::describe() const
{
	const char *r = result == Result::yes ? "yes" : result == Result::no ? "no" : "unknown";
	return detail.empty() ? r : std::string(r) + ": " + detail;
}

namespace platform {

namespace {

using namespace probe;

constexpr std::uint64_t bp_vector = 3;

/*
 * A real-mode guest with KVM_GUESTDBG_USE_SW_BP: INT3 at 0x100, and a #BP
 * handler (IVT entry 3) that halts. Intercepted: KVM_EXIT_DEBUG. Not
 * intercepted: HLT (the guest took #BP). Anything else: no.
 */
Probe probe_debug_int3(const System &sys)
{
	if (!sys.has(KVM_CAP_SET_GUEST_DEBUG))
		return no("KVM has no KVM_CAP_SET_GUEST_DEBUG");
	Vm vm = sys.create_vm();
	vm.memory().add(0, 0x1000, {.name = "int3 probe"});
	const std::uint8_t code[] = {0xcc, 0xf4};	/* int3; hlt */
	const std::uint16_t ivt3[] = {0x200, 0};	/* offset, segment */
	const std::uint8_t handler[] = {0xf4};		/* hlt */
	vm.memory().write(0x100, std::as_bytes(std::span(code)));
	vm.memory().write(4 * bp_vector, std::as_bytes(std::span(ivt3)));
	vm.memory().write(0x200, std::as_bytes(std::span(handler)));
	Vcpu v = vm.create_vcpu(0);
	auto s = v.sregs();
	s.cs.base = 0;
	s.cs.selector = 0;
	v.set_sregs(s);
	kvm_regs r{};
	r.rip = 0x100;
	r.rsp = 0xf00;
	r.rflags = 2;
	v.set_regs(r);
	kvm_guest_debug d{};
	d.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
	v.set_guest_debug(d);
	Exit e = run_bounded(v);
	if (auto *dbg = std::get_if<DebugExit>(&e); dbg && dbg->exception == bp_vector)
		return yes("with KVM_GUESTDBG_USE_SW_BP an INT3 in a guest exits to the VMM "
			   "(KVM_EXIT_DEBUG)");
	if (std::holds_alternative<HltExit>(e))
		return no("with KVM_GUESTDBG_USE_SW_BP an INT3 in a guest raised #BP in the guest "
			  "instead of exiting to the VMM");
	if (std::holds_alternative<InternalErrorExit>(e))
		return no("with KVM_GUESTDBG_USE_SW_BP an INT3 in a guest ended in " +
			  internal_error(e));
	return no("with KVM_GUESTDBG_USE_SW_BP an INT3 in a guest: " + describe(e));
}

} // namespace

const Probe &guest_debug_int3(const System &sys)
{
	return once<probe_debug_int3>("guest-debug INT3", sys);
}

bool tdp_enabled()
{
	for (const char *p : {"/sys/module/kvm_amd/parameters/npt",
			      "/sys/module/kvm_intel/parameters/ept"}) {
		std::ifstream f(p);
		char c;
		if (f >> c)
			return c == 'Y' || c == 'y' || c == '1';
	}
	return false;
}

/*
 * KVM_GET_STATS_FD (Documentation/virt/kvm/api.rst 4.133): a header, then
 * num_desc descriptors of sizeof(kvm_stats_desc) + name_size bytes each,
 * then the data, u64 each, at data_offset + desc->offset.
 */
std::optional<std::uint64_t> vm_stat(const Vm &vm, std::string_view name)
{
	if (vm.check_extension(KVM_CAP_BINARY_STATS_FD) <= 0)
		return std::nullopt;
	const int fd = ::ioctl(vm.fd(), KVM_GET_STATS_FD, nullptr);
	if (fd < 0)
		return std::nullopt;
	struct Closer {
		int fd;
		~Closer() { ::close(fd); }
	} closer{fd};

	kvm_stats_header h;
	if (::pread(fd, &h, sizeof(h), 0) != static_cast<ssize_t>(sizeof(h)))
		return std::nullopt;
	constexpr std::size_t head = offsetof(kvm_stats_desc, name);
	const std::size_t desc_size = head + h.name_size;
	std::vector<char> descs(desc_size * h.num_desc);
	if (::pread(fd, descs.data(), descs.size(), h.desc_offset) !=
	    static_cast<ssize_t>(descs.size()))
		return std::nullopt;
	for (std::uint32_t i = 0; i < h.num_desc; i++) {
		const char *d = descs.data() + i * desc_size;
		if (strnlen(d + head, h.name_size) != name.size() ||
		    std::memcmp(d + head, name.data(), name.size()) != 0)
			continue;
		std::uint32_t offset;
		std::memcpy(&offset, d + offsetof(kvm_stats_desc, offset), sizeof(offset));
		std::uint64_t v;
		if (::pread(fd, &v, sizeof(v), h.data_offset + offset) != static_cast<ssize_t>(sizeof(v)))
			return std::nullopt;
		return v;
	}
	return std::nullopt;
}

} // namespace platform

} // namespace virtkit
