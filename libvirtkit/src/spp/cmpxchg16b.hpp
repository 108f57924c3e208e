// SPDX-License-Identifier: MIT
/*
 * Internal: decoding `[lock] cmpxchg16b m128`, the one store that KVM's
 * instruction emulator refuses (em_cmpxchg8b: 16-byte operands are
 * "unhandleable"). On a page whose writes trap that ends the run with an
 * emulation failure, so sub-page protection completes it itself.
 */
#pragma once

#include <virtkit/kvm.h>

#include <cstdint>
#include <optional>
#include <span>

namespace virtkit::detail {

struct Cmpxchg16bInsn {
	std::uint64_t gva;	/* the m128 operand, with FS/GS base applied */
	std::uint8_t length;	/* bytes of the instruction */
};

/*
 * The instruction at the start of insn, if it is cmpxchg16b with a memory
 * operand in 64-bit mode (REX.W, 0F C7 /1). Address-size overrides and
 * anything else give nullopt.
 */
std::optional<Cmpxchg16bInsn> decode_cmpxchg16b(std::span<const std::uint8_t> insn,
						const kvm_regs &regs,
						const kvm_sregs &sregs);

} // namespace virtkit::detail
