// SPDX-License-Identifier: MIT
/*
 * virtkit platform probes - what this host's KVM does where KVM
 * implementations differ, found by running a tiny guest, never assumed:
 * whether its instruction emulator handles INT3 and XGETBV, whether it maps
 * guest memory with 2 MiB pages, and whether a lock cmpxchg16b on ordinary
 * guest RAM runs in the guest or is handed to KVM's emulator. KVM on Intel and AMD silicon does all
 * of these one way, a KVM that runs guests with shadow paging (kvm_pvm) or
 * nested KVM under QEMU's TCG another.
 *
 *	auto p = virtkit::platform::guest_int3(sys);
 *	if (!p)
 *		skip(p.detail);		// "INT3 in a long-mode guest ended in ..."
 *
 * Each probe runs once per process (the first call; later calls return the
 * same answer) in a VM of its own. The probes that need a 64-bit guest are
 * in the guest environment (<virtkit/x86/guest_probes.hpp>, built with
 * x86::GuestVm); those here need only libvirtkit. `virtkit info` prints
 * them all.
 * A probe that could not run (no usable /dev/kvm, no free huge pages) says
 * unknown and why; it does not throw.
 */
#pragma once

#if __cplusplus < 202002L
#error "libvirtkit's headers need C++20: compile with -std=c++20 (or later)"
#endif

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

/* What this header declares is libvirtkit's API (built with -fvisibility=hidden). */
#pragma GCC visibility push(default)

namespace virtkit {

class System;
class Vm;

struct Probe {
	enum class Result { yes, no, unknown };
	Result result = Result::unknown;
	/* What the tiny guest did, one line: the reason a test skips. */
	std::string detail;

	explicit operator bool() const noexcept { return result == Result::yes; }
	bool no() const noexcept { return result == Result::no; }
	/* "yes: ...", "no: ...", "unknown: ..." */
	std::string describe() const;
};

namespace platform {

/*
 * With KVM_GUESTDBG_USE_SW_BP, an INT3 in a (real-mode) guest exits to the
 * VMM with KVM_EXIT_DEBUG. No: the guest took #BP itself (QEMU's nested
 * SVM does not intercept INT3) or the run failed (kvm_pvm). KVMI's
 * BREAKPOINT event is offered only where this says yes.
 */
const Probe &guest_debug_int3(const System &sys);

/*
 * Whether KVM lets the processor walk the guest's page tables (two-
 * dimensional paging: kvm_amd's npt or kvm_intel's ept parameter is Y),
 * read from /sys/module. False where KVM shadows the guest's tables (no
 * NPT/EPT, kvm_pvm): then KVM's own walker decides every guest #PF. With
 * it, 1 GiB guest pages follow the host processor, not the vCPU's CPUID
 * (KVM's guest_can_use_gbpages()).
 */
bool tdp_enabled();

/*
 * A VM statistic by name from KVM's binary statistics (KVM_GET_STATS_FD);
 * nullopt if KVM has no such statistic or no binary statistics.
 */
std::optional<std::uint64_t> vm_stat(const Vm &vm, std::string_view name);

} // namespace platform

} // namespace virtkit

#pragma GCC visibility pop
