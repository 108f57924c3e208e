// SPDX-License-Identifier: MIT
/*
 * Platform probes that run a tiny 64-bit guest (see <virtkit/platform.hpp>
 * for the Probe type and the probes that need only libvirtkit). Part of the
 * guest environment (libvirtkit-guest.a): each probe builds an
 * x86::GuestVm, so the probing program is linked like GuestVm requires.
 */
#pragma once

#include <virtkit/platform.hpp>

namespace virtkit::platform {

/*
 * An INT3 in a 64-bit guest (no guest debugging) raises #BP through the
 * guest's IDT. No: KVM ended the run instead (KVM_EXIT_INTERNAL_ERROR, an
 * emulation failure, on kvm_pvm).
 */
const Probe &guest_int3(const System &sys);

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
 * Whether KVM reports an event (exception, interrupt) it could not deliver
 * because the frame lands on a read-only memslot, naming the event:
 * KVM_INTERNAL_ERROR_DELIVERY_EV (Linux 6.14 and later), or an emulation
 * failure with the IDT-vectoring information in its data (older kernels,
 * when the faulting instruction cannot be emulated). Sub-page protection
 * delivers such an event itself; where KVM reports neither (a triple fault,
 * or KVM re-executing the instruction), it cannot.
 */
const Probe &failed_delivery_reported(const System &sys);

/*
 * The same for an exception raised by an instruction KVM's emulator can
 * run (a #GP from mov to a segment register): KVM before 6.14 re-runs the
 * instruction for ever; where it keeps the exception queued meanwhile (a
 * kick finds it in KVM_GET_VCPU_EVENTS), sub-page protection's stall watch
 * delivers it. Linux 6.1 keeps no trace of it.
 */
const Probe &failed_delivery_queued(const System &sys);

} // namespace virtkit::platform
