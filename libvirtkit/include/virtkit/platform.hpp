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
 * same answer) in a VM of its own, built with x86::GuestVm: the probing
 * program must be linked like GuestVm requires (libvirtkit statically, so
 * the guest runtime is in the executable). `virtkit info` prints them all.
 * A probe that could not run (no usable /dev/kvm, no free huge pages) says
 * unknown and why; it does not throw.
 */
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

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
 * An INT3 in a 64-bit guest (no guest debugging) raises #BP through the
 * guest's IDT. No: KVM ended the run instead (KVM_EXIT_INTERNAL_ERROR, an
 * emulation failure, on kvm_pvm).
 */
const Probe &guest_int3(const System &sys);

/*
 * With KVM_GUESTDBG_USE_SW_BP, an INT3 in a (real-mode) guest exits to the
 * VMM with KVM_EXIT_DEBUG. No: the guest took #BP itself (QEMU's nested
 * SVM does not intercept INT3) or the run failed (kvm_pvm). KVMI's
 * BREAKPOINT event is offered only where this says yes.
 */
const Probe &guest_debug_int3(const System &sys);

/*
 * XGETBV (XCR0) in a 64-bit guest with CR4.OSXSAVE runs. No: KVM ended the
 * run instead. Unknown where the vCPU's CPUID has no XSAVE (1:ECX[26]).
 */
const Probe &guest_xgetbv(const System &sys);

/*
 * KVM maps guest memory backed by 2 MiB huge pages with 2 MiB pages: its
 * VM statistic pages_2m grows when a guest touches such a region (no SPP,
 * nothing write-protected). Needs free huge pages
 * (/proc/sys/vm/nr_hugepages); unknown without them or without the
 * statistic.
 */
const Probe &large_mappings(const System &sys);

/*
 * A lock cmpxchg16b on ordinary guest RAM (a page the guest has written
 * before) runs in the guest. No: KVM ended the run with
 * KVM_EXIT_INTERNAL_ERROR (kvm_pvm hands the instruction to its emulator,
 * which cannot run it), so only a VMM that completes the instruction itself
 * (virtkit's user SPP backend, inside its regions) gets past it.
 */
const Probe &guest_cmpxchg16b(const System &sys);

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
