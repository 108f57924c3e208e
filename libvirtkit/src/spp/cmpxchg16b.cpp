// SPDX-License-Identifier: MIT
#include "spp/cmpxchg16b.hpp"

#include "spp/x86_decode.hpp"

namespace virtkit::detail {

std::optional<Cmpxchg16bInsn> decode_cmpxchg16b(std::span<const std::uint8_t> insn,
						const kvm_regs &regs,
						const kvm_sregs &sregs)
{
	if (code_is_64bit(sregs) != true)
		return std::nullopt;
	const Prefixes p = decode_prefixes(insn, true);
	if (p.opsize || p.addrsize || !(p.rex & 8))
		return std::nullopt; /* 32-bit addressing, or another instruction */
	for (std::size_t k = 0; k < p.length; k++)
		if (insn[k] == 0xf2 || insn[k] == 0xf3)
			return std::nullopt;
	std::size_t i = p.length;
	if (i + 2 > insn.size() || insn[i] != 0x0f || insn[i + 1] != 0xc7)
		return std::nullopt;
	MemOperand mem;
	unsigned reg;
	auto end = decode_mem_operand(insn, i + 2, p, true, mem, reg);
	if (!end || reg != 1)
		return std::nullopt;
	return Cmpxchg16bInsn{linear_address(mem, regs, sregs, true, regs.rip + *end),
			      static_cast<std::uint8_t>(*end)};
}

} // namespace virtkit::detail
