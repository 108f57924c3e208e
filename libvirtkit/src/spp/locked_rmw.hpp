// SPDX-License-Identifier: MIT
/*
 * Internal: locked read-modify-writes on pages whose writes trap.
 *
 * KVM's emulator runs `lock add/or/xadd/cmpxchg/...` and `xchg` on a
 * read-only memslot as a read when it emulates the instruction and a plain
 * write that reaches the VMM afterwards ("emulating exchange as write"): its
 * result is computed from a value another vCPU may have changed since, and a
 * failed compare-exchange writes the stale value back. The write exit comes
 * with the instruction already retired (RIP after it, registers and flags
 * committed), so sub-page protection finds the instruction that ended at RIP
 * (decode_rmw() at each possible start, kept only when its operand, size,
 * the data KVM wrote and the flags and registers KVM left all agree), works
 * out its operands as they were before it ran, and performs it again with
 * LOCK on the VMM's mapping of the same memory: atomic with respect to the
 * guest's own locked accesses on other vCPUs, with the architectural results
 * of that execution.
 */
#pragma once

#include <virtkit/kvm.h>

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "spp/x86_decode.hpp"

namespace virtkit::detail {

/* The instructions LOCK may prefix, plus XCHG (locked without it). */
enum class RmwOp : std::uint8_t {
	add, or_, adc, sbb, and_, sub, xor_, /* in the order of the ALU opcodes */
	inc, dec, not_, neg, bts, btr, btc, xadd, xchg, cmpxchg, cmpxchg8b,
};

/* One such instruction with a memory destination, decoded. */
struct RmwInsn {
	RmwOp op;
	std::uint8_t size;	/* operand bytes: 1, 2, 4 or 8 */
	std::uint8_t length;	/* instruction bytes */
	bool src_imm;		/* the source is imm; else register src_reg, if any */
	bool high8;		/* the source is AH, CH, DH or BH: bits 8-15 of src_reg 0..3 */
	std::uint8_t src_reg;	/* 0..15: rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8.. */
	std::uint64_t imm;	/* sign-extended to size, masked to it */
	MemOperand mem;		/* the destination */
};

/*
 * The instruction at the start of code, if it is one of the above with a
 * memory operand; in 64-bit mode (long64) or in 32-bit code (CS.D = 1).
 */
std::optional<RmwInsn> decode_rmw(std::span<const std::uint8_t> code, bool long64);

/* A trapped write explained as a lockable read-modify-write. */
struct RmwPlan {
	RmwInsn insn;
	std::uint64_t gva;	/* of the destination (after a bit-offset adjustment) */
	std::uint64_t src;	/* the source value (register or immediate), masked */
	std::uint64_t rax, rdx, rbx, rcx; /* before it, for cmpxchg/cmpxchg8b */
	std::uint64_t flags_in;	/* rflags before it, as far as they matter */
	/*
	 * false for a compare-exchange whose compare failed when KVM ran it:
	 * the instruction took effect as an atomic read then, and its write
	 * (of the value read) must not be performed now.
	 */
	bool store;
	/* The value KVM read, where the data and registers tell (not or/and). */
	std::optional<std::uint64_t> m0;
};

/*
 * Explain the write KVM reported - data at the (first) piece's gpa, the
 * vCPU's registers after the instruction - as the lockable RMW that ended
 * at post.rip, if it was one. Reads the vCPU's registers, translations and
 * guest memory; does not change anything.
 */
std::optional<RmwPlan> find_locked_rmw(Vcpu &vcpu, const PrecedingCode &code, const kvm_regs &post,
				       std::uint64_t gpa, std::span<const std::uint8_t> data);

/*
 * The stores - plain (decode_store()) or one of the above - that end
 * exactly where code ends, one per possible start: what the instruction
 * that ended at RIP may have been. rmw_elsewhere: an RMW whose operand
 * the registers after it do not locate (a bit offset in a register moves
 * it; xadd, xchg, cmpxchg may change a register of its address).
 */
struct StoreCandidate {
	MemOperand mem;
	std::uint32_t size;
	std::size_t length;
	enum class Kind { store, rmw, rmw_elsewhere } kind;
};
/* Valid until the next call on the same thread (the answer is kept per thread). */
const std::vector<StoreCandidate> &stores_ending_here(std::span<const std::uint8_t> code,
						      bool long64);

/*
 * What the instruction that ended at post.rip may be, given KVM's first
 * piece of its write (len bytes at gpa); the defaults when it cannot be
 * told.
 */
struct StoreShape {
	/* It stores just this piece: KVM has no further piece to report. */
	bool one_piece = false;
	/* It may be a lockable read-modify-write (see find_locked_rmw()). */
	bool may_be_rmw = true;
};
StoreShape store_shape(Vcpu &vcpu, const PrecedingCode &code, const kvm_regs &post,
		       std::uint64_t gpa, std::uint32_t len);

/*
 * Perform plan atomically on the host bytes of its destination, host (its
 * operand size long; may be unaligned): returns the registers the guest
 * must continue with, given post, the registers KVM left.
 */
kvm_regs perform_rmw(const RmwPlan &plan, void *host, const kvm_regs &post);

} // namespace virtkit::detail
