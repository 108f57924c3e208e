// SPDX-License-Identifier: MIT
/*
 * Internal: writes that KVM cannot complete on a page whose writes trap.
 *
 * KVM's emulator performs some writes as "system" accesses that fail on a
 * read-only memslot instead of exiting as MMIO, and then restarts the
 * instruction: the vCPU spins inside KVM_RUN for ever. They are the store
 * of sgdt/sidt and of fxsave in 32-bit code (em_fxsave), and the CPU's own
 * update of a segment descriptor when a segment load sets its accessed bit,
 * or ltr its busy bit. Sub-page protection's stall check
 * (core/stall_watch.hpp) finds such an instruction at a vCPU that made no
 * progress, and completes or blocks the write itself. fxsave in 64-bit code
 * KVM refuses to emulate at all (check_fxsr: an emulation failure); that
 * exit is completed the same way (find_fxsave).
 */
#pragma once

#include <virtkit/kvm.h>

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

namespace virtkit {
class Vcpu;
}

namespace virtkit::detail {

struct SystemWrite {
	/*
	 * store: the instruction's own store (sgdt, sidt, fxsave): done, the guest
	 * continues after it (rip + length). descriptor: the CPU's update of a
	 * descriptor's type byte: done, the guest runs the instruction again
	 * and finds the bit set.
	 */
	enum class Kind { store, descriptor } kind;
	std::uint64_t gva;
	std::uint32_t size;
	std::array<std::uint8_t, 512> bytes;
	std::uint8_t length; /* of the instruction */
	/* For a descriptor: the bits the CPU sets in its type byte. */
	std::uint8_t set_bits;
};

/*
 * The writes the instruction at regs.rip would make that KVM cannot
 * complete on trapping pages: its store, or descriptors whose accessed
 * (busy) bit it must set. Reads guest memory; changes nothing.
 */
std::vector<SystemWrite> find_system_writes(Vcpu &vcpu, const kvm_regs &regs,
					    const kvm_sregs &sregs);

/*
 * fxsave/fxsave64 (0f ae /0) at regs.rip: its store, the image built from
 * the vCPU's x87/SSE state as the instruction would store it. nullopt for
 * any other instruction, or a misaligned operand (the CPU raised #GP
 * before it could write).
 */
std::optional<SystemWrite> find_fxsave(Vcpu &vcpu, const kvm_regs &regs, const kvm_sregs &sregs);

} // namespace virtkit::detail
