// SPDX-License-Identifier: MIT
#include "spp/system_writes.hpp"

#include <cstring>
#include <optional>

#include "spp/x86_decode.hpp"

namespace virtkit::detail {

namespace {

/*
 * The descriptor a segment load of `selector` reads, if the CPU must set
 * bits in its type byte (the accessed bit of a code or data segment; for
 * ltr, the busy bit of an available TSS).
 */
std::optional<SystemWrite> descriptor_update(Vcpu &vcpu, const kvm_sregs &s, std::uint16_t selector,
					     bool tss, std::uint8_t length)
{
	const bool ldt = selector & 4;
	if (!ldt && selector < 8)
		return std::nullopt; /* the null selector reads nothing */
	const std::uint64_t base = ldt ? s.ldt.base : s.gdt.base;
	const std::uint32_t limit = ldt ? s.ldt.limit : s.gdt.limit;
	const std::uint32_t off = selector & ~7u;
	if (off + 7 > limit)
		return std::nullopt;
	auto type = read_guest_object<std::uint8_t>(vcpu, base + off + 5);
	if (!type || !(*type & 0x80))
		return std::nullopt; /* not present: the load faults instead */
	std::uint8_t bits;
	if (tss) {
		if ((*type & 0x1f) != 0x09)
			return std::nullopt; /* only an available 64/32-bit TSS turns busy */
		bits = 0x02;
	} else {
		if (!(*type & 0x10) || (*type & 0x01))
			return std::nullopt; /* a system descriptor, or accessed already */
		bits = 0x01;
	}
	SystemWrite w{};
	w.kind = SystemWrite::Kind::descriptor;
	w.gva = base + off + 5;
	w.size = 1;
	w.bytes[0] = *type | bits;
	w.set_bits = bits;
	w.length = length;
	return w;
}

} // namespace

std::vector<SystemWrite> find_system_writes(Vcpu &vcpu, const kvm_regs &regs,
					    const kvm_sregs &s)
{
	std::vector<SystemWrite> out;
	const auto long64 = code_is_64bit(s);
	if (!long64)
		return out;
	std::array<std::uint8_t, 15> buf{};
	const std::size_t have = read_guest_virtual(vcpu, regs.rip, buf);
	const std::span<const std::uint8_t> code(buf.data(), have);
	const Prefixes p = decode_prefixes(code, *long64);
	std::size_t i = p.length;
	if (i >= have)
		return out;
	const unsigned opsize = p.rex & 8 ? 8 : p.opsize ? 2 : 4;
	const std::uint64_t sp = *long64 ? regs.rsp : s.ss.base + (regs.rsp & 0xffffffff);
	auto load = [&](std::optional<std::uint16_t> sel, std::size_t len, bool tss = false) {
		if (sel)
			if (auto w = descriptor_update(vcpu, s, *sel, tss, static_cast<std::uint8_t>(len)))
				out.push_back(*w);
	};
	/* The memory operand at code[at] (the ModRM byte): its address and the bytes after it. */
	auto mem_at = [&](std::size_t at, unsigned &reg) -> std::optional<std::pair<std::uint64_t, std::size_t>> {
		MemOperand m;
		auto end = decode_mem_operand(code, at, p, *long64, m, reg);
		if (!end)
			return std::nullopt;
		return std::pair(linear_address(m, regs, s, *long64, regs.rip + *end), *end);
	};

	const std::uint8_t op = code[i++];
	if (op == 0x0f && i < have) {
		const std::uint8_t op2 = code[i++];
		unsigned reg = 0;
		if (op2 == 0x01) {
			/* sgdt, sidt */
			auto m = mem_at(i, reg);
			if (!m || reg > 1)
				return out;
			const kvm_dtable &t = reg == 0 ? s.gdt : s.idt;
			SystemWrite w{};
			w.kind = SystemWrite::Kind::store;
			w.gva = m->first;
			w.size = *long64 ? 10 : 6;
			std::memcpy(w.bytes.data(), &t.limit, 2);
			std::memcpy(w.bytes.data() + 2, &t.base, w.size - 2);
			w.length = static_cast<std::uint8_t>(m->second);
			out.push_back(w);
		} else if (op2 == 0x00 && i < have && (code[i] >> 3 & 7) == 3) {
			/* ltr r/m16 */
			if (code[i] >> 6 == 3)
				load(static_cast<std::uint16_t>(gpr(regs, (code[i] & 7) | (p.rex & 1) << 3)),
				     i + 1, true);
			else if (auto m = mem_at(i, reg))
				load(read_guest_object<std::uint16_t>(vcpu, m->first), m->second, true);
		} else if (op2 == 0xa1 || op2 == 0xa9) {
			/* pop fs, pop gs */
			load(read_guest_object<std::uint16_t>(vcpu, sp), i);
		} else if (op2 == 0xb2 || op2 == 0xb4 || op2 == 0xb5) {
			/* lss, lfs, lgs m16:xx: the selector after the offset */
			if (auto m = mem_at(i, reg))
				load(read_guest_object<std::uint16_t>(vcpu, m->first + opsize), m->second);
		}
		return out;
	}
	unsigned reg = 0;
	switch (op) {
	case 0x8e: /* mov sreg, r/m16 */
		if (i >= have || (code[i] >> 3 & 7) == 1)
			break;
		if (code[i] >> 6 == 3)
			load(static_cast<std::uint16_t>(gpr(regs, (code[i] & 7) | (p.rex & 1) << 3)), i + 1);
		else if (auto m = mem_at(i, reg))
			load(read_guest_object<std::uint16_t>(vcpu, m->first), m->second);
		break;
	case 0xff: /* far call, far jmp m16:xx */
		if (i < have && ((code[i] >> 3 & 7) == 3 || (code[i] >> 3 & 7) == 5))
			if (auto m = mem_at(i, reg))
				load(read_guest_object<std::uint16_t>(vcpu, m->first + opsize), m->second);
		break;
	case 0xca: case 0xcb: /* far ret: cs above the return address */
		load(read_guest_object<std::uint16_t>(vcpu, sp + opsize), i);
		break;
	case 0xcf: /* iret: cs, and ss in 64-bit mode */
		load(read_guest_object<std::uint16_t>(vcpu, sp + opsize), i);
		if (*long64)
			load(read_guest_object<std::uint16_t>(vcpu, sp + 4 * opsize), i);
		break;
	case 0x07: case 0x17: case 0x1f: /* pop es, ss, ds (32-bit code) */
		if (!*long64)
			load(read_guest_object<std::uint16_t>(vcpu, sp), i);
		break;
	}
	return out;
}

} // namespace virtkit::detail
