// SPDX-License-Identifier: MIT
/*
 * Internal: the pieces of x86 instruction decoding that sub-page protection
 * needs to complete a guest instruction itself (locked_rmw.hpp,
 * system_writes.hpp, cmpxchg16b.hpp): prefixes, a ModRM memory operand and
 * its linear address, and the guest's code bytes. 64-bit mode and 32-bit
 * code (CS.D = 1) only; 16-bit addressing is not decoded.
 */
#pragma once

#include <virtkit/kvm.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>

namespace virtkit {
class Vcpu;
}

namespace virtkit::detail {

/* Legacy prefixes and REX, and where the opcode starts. */
struct Prefixes {
	bool opsize = false;	/* 0x66 */
	bool addrsize = false;	/* 0x67 */
	std::int8_t seg = -1;	/* 0 es 1 cs 2 ss 3 ds 4 fs 5 gs; -1 none */
	std::uint8_t rex = 0;	/* 64-bit mode only, right before the opcode */
	std::size_t length = 0;	/* bytes of prefixes */
};
Prefixes decode_prefixes(std::span<const std::uint8_t> code, bool long64);

/* A memory operand: seg:[base + index * 2^scale + disp], or rip + disp. */
struct MemOperand {
	std::int8_t base = -1, index = -1; /* 0..15: rax, rcx, ... r15; -1 none */
	std::uint8_t scale = 0;
	bool rip_relative = false;
	std::uint8_t addr_bytes = 8;	/* 8, or 4 (32-bit addressing) */
	std::int8_t seg = -1;
	std::int64_t disp = 0;
};

/*
 * The ModRM byte at code[at] and what follows it (SIB, displacement) as a
 * memory operand: returns the index after them; nullopt for a register
 * operand (mod = 3), 16-bit addressing, or bytes missing. *reg gets the
 * ModRM reg field (without REX.R).
 */
std::optional<std::size_t> decode_mem_operand(std::span<const std::uint8_t> code, std::size_t at,
					      const Prefixes &p, bool long64, MemOperand &mem,
					      unsigned &reg);

/* A plain store through a ModRM memory operand (mov, movnti, SSE moves, setcc). */
struct StoreInsn {
	std::uint8_t size;	/* bytes stored */
	std::uint8_t length;	/* instruction bytes */
	MemOperand mem;
};
/* The instruction at the start of code, if it is such a store (not VEX-encoded). */
std::optional<StoreInsn> decode_store(std::span<const std::uint8_t> code, bool long64);

/* rep stos / rep movs: element size, direction of the source (movs). */
struct RepString {
	bool movs;		/* else stos */
	std::uint8_t size;	/* element bytes */
	std::uint8_t length;	/* instruction bytes */
	std::uint8_t addr_bytes;	/* 8, or 4 */
};
/* The instruction at the start of code, if it is rep stos or rep movs (f3, or f2). */
std::optional<RepString> decode_rep_string(std::span<const std::uint8_t> code, bool long64);

/* Its linear address with the registers before the instruction and rip after it. */
std::uint64_t linear_address(const MemOperand &mem, const kvm_regs &regs, const kvm_sregs &sregs,
			     bool long64, std::uint64_t rip_after);

/* General-purpose register n (0 rax, 1 rcx, ... 15 r15) of regs. */
__u64 &gpr(kvm_regs &regs, unsigned n);
__u64 gpr(const kvm_regs &regs, unsigned n);

/* Whether the vCPU runs 64-bit code; nullopt for 16-bit code (not decoded). */
std::optional<bool> code_is_64bit(const kvm_sregs &sregs);

/*
 * Guest-virtual bytes [gva, gva + out.size()) as the vCPU translates them,
 * as far as they are mapped guest RAM: returns how many were read.
 */
std::size_t read_guest_virtual(Vcpu &vcpu, std::uint64_t gva, std::span<std::uint8_t> out);

/* A T at gva as the vCPU translates it; nullopt if any byte is not mapped RAM. */
template <class T> std::optional<T> read_guest_object(Vcpu &vcpu, std::uint64_t gva)
{
	std::array<std::uint8_t, sizeof(T)> b;
	if (read_guest_virtual(vcpu, gva, b) != b.size())
		return std::nullopt;
	T v;
	std::memcpy(&v, b.data(), sizeof(T));
	return v;
}

/*
 * The code around RIP, read once per exit and shared by every decoder, with
 * the vCPU's mode: the up to 15 bytes before RIP, from which the
 * instruction that ended there is decoded (KVM reports a trapped write
 * after it), as far as they are mapped (those in RIP's own page at least,
 * when the page before is not); and the up to 15 bytes at RIP (a rep string
 * instruction stays at RIP until its count runs out).
 */
struct PrecedingCode {
	kvm_sregs sregs;
	bool long64;
	std::array<std::uint8_t, 30> buf{}; /* RIP is at buf[15] */
	std::size_t before = 0, after = 0;

	std::span<const std::uint8_t> bytes() const noexcept
	{
		return {buf.data() + 15 - before, before};
	}
	std::span<const std::uint8_t> at_rip() const noexcept { return {buf.data() + 15, after}; }
};
/* nullopt for 16-bit code (not decoded). */
std::optional<PrecedingCode> preceding_code(Vcpu &vcpu, std::uint64_t rip);

/* The segment register a descriptor loads (a code or data segment in the GDT). */
kvm_segment segment_from_descriptor(std::uint16_t selector, std::uint64_t desc);

} // namespace virtkit::detail
