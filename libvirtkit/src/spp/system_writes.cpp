// SPDX-License-Identifier: MIT
#include "spp/system_writes.hpp"

#include <virtkit/error.hpp>
#include <virtkit/vcpu.hpp>

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

/*
 * The vCPU's x87/SSE state as fxsave64 stores it: the legacy region of
 * KVM_GET_XSAVE (the host saved it with fxsave64/xsave64, and the kernel
 * fills in components in their initial state), or, where KVM has no XSAVE
 * ioctls, built from KVM_GET_FPU (which lacks MXCSR_MASK: the host's is
 * the guest's, KVM does not change it).
 */
std::array<std::uint8_t, 512> fx_state(Vcpu &vcpu)
{
	std::array<std::uint8_t, 512> fx{};
	try {
		const Xsave x = vcpu.xsave();
		if (x.region.size() * 4 >= fx.size()) {
			std::memcpy(fx.data(), x.region.data(), fx.size());
			return fx;
		}
	} catch (const Error &) {
	}
	const kvm_fpu f = vcpu.fpu();
	alignas(16) std::array<std::uint8_t, 512> host{};
	asm volatile("fxsave64 %0" : "=m"(host));
	auto put = [&](std::size_t at, const auto &v) { std::memcpy(fx.data() + at, &v, sizeof(v)); };
	put(0, f.fcw);
	put(2, f.fsw);
	put(4, f.ftwx);
	put(6, f.last_opcode);
	put(8, f.last_ip);
	put(16, f.last_dp);
	put(24, f.mxcsr);
	std::memcpy(fx.data() + 28, host.data() + 28, 4);
	put(32, f.fpr);
	put(160, f.xmm);
	return fx;
}

} // namespace

std::optional<SystemWrite> find_fxsave(Vcpu &vcpu, const kvm_regs &regs, const kvm_sregs &s)
{
	const auto long64 = code_is_64bit(s);
	if (!long64)
		return std::nullopt;
	std::array<std::uint8_t, 15> buf{};
	const std::size_t have = read_guest_virtual(vcpu, regs.rip, buf);
	const std::span<const std::uint8_t> code(buf.data(), have);
	const Prefixes p = decode_prefixes(code, *long64);
	const std::size_t i = p.length;
	if (i + 2 >= have || code[i] != 0x0f || code[i + 1] != 0xae)
		return std::nullopt;
	MemOperand m;
	unsigned reg = 0;
	const auto end = decode_mem_operand(code, i + 2, p, *long64, m, reg);
	if (!end || reg != 0)
		return std::nullopt;
	SystemWrite w{};
	w.kind = SystemWrite::Kind::store;
	w.gva = linear_address(m, regs, s, *long64, regs.rip + *end);
	/* Misaligned: #GP before any access, so it never traps. */
	if (w.gva % 16)
		return std::nullopt;
	w.length = static_cast<std::uint8_t>(*end);
	w.bytes = fx_state(vcpu);
	if (!(p.rex & 8)) {
		/*
		 * The 32-bit layout: FIP[31:0], FCS, FDP[31:0], FDS. KVM keeps
		 * no FCS/FDS (its state has the 64-bit layout); they are
		 * stored as 0, as processors that deprecate them
		 * (CPUID.(7,0):EBX[13]) do, and as KVM's own em_fxsave does.
		 */
		std::memset(w.bytes.data() + 12, 0, 4);
		std::memset(w.bytes.data() + 20, 0, 4);
	}
	/*
	 * What the instruction stores: the header and ST0-7; XMM0-7 (XMM0-15
	 * in 64-bit mode) only with CR4.OSFXSR, and not with AMD's fast
	 * FXSAVE (EFER.FFXSR) at CPL 0 in 64-bit mode. Bytes 416..511 are
	 * never written.
	 */
	const bool osfxsr = s.cr4 & (1u << 9);
	const bool ffxsr = *long64 && (s.efer & (1u << 14)) && (s.cs.selector & 3) == 0;
	w.size = !osfxsr || ffxsr ? 160 : *long64 ? 416 : 288;
	std::memset(w.bytes.data() + w.size, 0, w.bytes.size() - w.size);
	return w;
}

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
		} else if (op2 == 0xae) {
			/* fxsave: in 32-bit code KVM emulates it and its store fails (em_fxsave) */
			if (auto w = find_fxsave(vcpu, regs, s))
				out.push_back(*w);
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
