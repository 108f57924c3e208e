// SPDX-License-Identifier: MIT
#include "spp/cmpxchg16b.hpp"

namespace virtkit::detail {

static std::uint64_t gpr(const kvm_regs &r, unsigned n)
{
	const std::uint64_t v[16] = {r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi,
				     r.r8,  r.r9,  r.r10, r.r11, r.r12, r.r13, r.r14, r.r15};
	return v[n & 15];
}

std::optional<Cmpxchg16bInsn> decode_cmpxchg16b(std::span<const std::uint8_t> insn,
						const kvm_regs &regs,
						const kvm_sregs &sregs)
{
	if (!(sregs.efer & (1u << 10)) || !sregs.cs.l) /* LMA and a 64-bit CS */
		return std::nullopt;
	std::size_t i = 0;
	std::uint64_t seg_base = 0;
	auto more = [&](std::size_t n) { return i + n <= insn.size() && i + n <= 15; };

	/* Legacy prefixes. */
	for (; more(1); i++) {
		std::uint8_t p = insn[i];
		if (p == 0x64)
			seg_base = sregs.fs.base;
		else if (p == 0x65)
			seg_base = sregs.gs.base;
		else if (p == 0x67 || p == 0x66 || p == 0xf2 || p == 0xf3)
			return std::nullopt; /* 32-bit addressing, or another insn */
		else if (p != 0xf0 && p != 0x2e && p != 0x3e && p != 0x26 && p != 0x36)
			break;
	}
	if (!more(1) || (insn[i] & 0xf8) != 0x48) /* REX with W */
		return std::nullopt;
	std::uint8_t rex = insn[i++];
	if (!more(3) || insn[i] != 0x0f || insn[i + 1] != 0xc7)
		return std::nullopt;
	i += 2;
	std::uint8_t modrm = insn[i++];
	unsigned mod = modrm >> 6, reg = modrm >> 3 & 7, rm = modrm & 7;
	if (mod == 3 || reg != 1)
		return std::nullopt;

	/* A sign-extended 32-bit displacement at i, if the bytes are there. */
	auto disp32 = [&](std::uint64_t &to) {
		if (!more(4))
			return false;
		std::int32_t d;
		__builtin_memcpy(&d, &insn[i], 4);
		i += 4;
		to += static_cast<std::int64_t>(d);
		return true;
	};

	std::uint64_t ea = 0;
	bool rip_relative = false;
	if (rm == 4) {
		if (!more(1))
			return std::nullopt;
		std::uint8_t sib = insn[i++];
		unsigned scale = sib >> 6, index = (sib >> 3 & 7) | (rex & 2) << 2;
		unsigned base = (sib & 7) | (rex & 1) << 3;
		if (index != 4)
			ea += gpr(regs, index) << scale;
		if ((sib & 7) == 5 && mod == 0) {
			if (!disp32(ea))
				return std::nullopt;
		} else {
			ea += gpr(regs, base);
		}
	} else if (rm == 5 && mod == 0) {
		rip_relative = true;
	} else {
		ea = gpr(regs, rm | (rex & 1) << 3);
	}
	if (mod == 1) {
		if (!more(1))
			return std::nullopt;
		ea += static_cast<std::int64_t>(static_cast<std::int8_t>(insn[i++]));
	} else if ((mod == 2 || rip_relative) && !disp32(ea)) {
		return std::nullopt;
	}
	if (rip_relative)
		ea += regs.rip + i;
	return Cmpxchg16bInsn{ea + seg_base, static_cast<std::uint8_t>(i)};
}

} // namespace virtkit::detail
