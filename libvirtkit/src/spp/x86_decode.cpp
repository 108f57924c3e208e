// SPDX-License-Identifier: MIT
#include "spp/x86_decode.hpp"

#include <algorithm>
#include <cstring>

#include <virtkit/memory.hpp>
#include <virtkit/vcpu.hpp>

#include "core/run_control.hpp"

namespace virtkit::detail {

Prefixes decode_prefixes(std::span<const std::uint8_t> code, bool long64)
{
	Prefixes p;
	const std::size_t n = std::min<std::size_t>(code.size(), 15);
	std::size_t i = 0;
	for (; i < n; i++) {
		switch (code[i]) {
		case 0xf0: case 0xf2: case 0xf3: continue;
		case 0x66: p.opsize = true; continue;
		case 0x67: p.addrsize = true; continue;
		case 0x26: p.seg = 0; continue;
		case 0x2e: p.seg = 1; continue;
		case 0x36: p.seg = 2; continue;
		case 0x3e: p.seg = 3; continue;
		case 0x64: p.seg = 4; continue;
		case 0x65: p.seg = 5; continue;
		}
		break;
	}
	if (long64 && i < n && (code[i] & 0xf0) == 0x40)
		p.rex = code[i++];
	p.length = i;
	return p;
}

std::optional<std::size_t> decode_mem_operand(std::span<const std::uint8_t> code, std::size_t i,
					      const Prefixes &p, bool long64, MemOperand &d,
					      unsigned &reg)
{
	const std::size_t n = std::min<std::size_t>(code.size(), 15);
	if (i >= n)
		return std::nullopt;
	const std::uint8_t modrm = code[i++];
	const unsigned mod = modrm >> 6, rm = modrm & 7;
	reg = modrm >> 3 & 7;
	if (mod == 3)
		return std::nullopt;
	if (long64)
		d.addr_bytes = p.addrsize ? 4 : 8;
	else if (p.addrsize)
		return std::nullopt; /* 16-bit addressing */
	else
		d.addr_bytes = 4;
	d.seg = p.seg;
	bool disp32 = mod == 2;
	if (rm == 4) {
		if (i >= n)
			return std::nullopt;
		const std::uint8_t sib = code[i++];
		d.scale = sib >> 6;
		const unsigned idx = (sib >> 3 & 7) | (p.rex & 2) << 2;
		if (idx != 4)
			d.index = static_cast<std::int8_t>(idx);
		if ((sib & 7) == 5 && mod == 0)
			disp32 = true;
		else
			d.base = static_cast<std::int8_t>((sib & 7) | (p.rex & 1) << 3);
	} else if (rm == 5 && mod == 0) {
		disp32 = true;
		d.rip_relative = long64;
	} else {
		d.base = static_cast<std::int8_t>(rm | (p.rex & 1) << 3);
	}
	if (mod == 1) {
		if (i >= n)
			return std::nullopt;
		d.disp = static_cast<std::int8_t>(code[i++]);
	} else if (disp32) {
		if (i + 4 > n)
			return std::nullopt;
		std::int32_t v;
		std::memcpy(&v, &code[i], 4);
		d.disp = v;
		i += 4;
	}
	return i;
}

std::optional<StoreInsn> decode_store(std::span<const std::uint8_t> code, bool long64)
{
	const std::size_t n = std::min<std::size_t>(code.size(), 15);
	Prefixes p = decode_prefixes(code, long64);
	std::size_t i = p.length;
	if (i + 1 >= n)
		return std::nullopt;
	/* Mandatory prefixes of SSE moves (66, f3) are legacy prefixes here. */
	bool f2 = false, f3 = false;
	for (std::size_t k = 0; k < p.length; k++) {
		f2 |= code[k] == 0xf2;
		f3 |= code[k] == 0xf3;
	}
	const unsigned opsize = p.rex & 8 ? 8 : p.opsize ? 2 : 4;
	std::uint8_t op = code[i++];
	unsigned size = 0, imm = 0;
	if (op == 0x0f) {
		op = code[i++];
		if (op == 0xc3)
			size = p.rex & 8 ? 8 : 4;			/* movnti */
		else if (op == 0x11 || op == 0x29 || op == 0x2b || op == 0xe7)
			size = 16;	/* movups/movupd/movss..., movaps/movapd, movntps, movntdq */
		else if (op == 0x7f && (p.opsize || f3))
			size = 16;					/* movdqa, movdqu */
		else if (op == 0xd6 && p.opsize)
			size = 8;					/* movq xmm */
		else if (op == 0x7e && !f3)
			size = p.rex & 8 ? 8 : 4;			/* movd/movq r/m, (x)mm */
		else if (op >= 0x90 && op <= 0x9f)
			size = 1;					/* setcc */
		else
			return std::nullopt;
		if (op == 0x11 && f3)
			size = 4;					/* movss */
		else if (op == 0x11 && f2)
			size = 8;					/* movsd */
	} else if (op == 0x88) {
		size = 1;
	} else if (op == 0x89) {
		size = opsize;
	} else if (op == 0xc6) {
		size = 1;
		imm = 1;
	} else if (op == 0xc7) {
		size = opsize;
		imm = opsize == 2 ? 2 : 4;
	} else {
		return std::nullopt;
	}
	StoreInsn s{};
	unsigned reg;
	auto end = decode_mem_operand(code, i, p, long64, s.mem, reg);
	if (!end || ((op == 0xc6 || op == 0xc7) && reg != 0) || *end + imm > n)
		return std::nullopt;
	s.size = static_cast<std::uint8_t>(size);
	s.length = static_cast<std::uint8_t>(*end + imm);
	return s;
}

std::optional<RepString> decode_rep_string(std::span<const std::uint8_t> code, bool long64)
{
	const Prefixes p = decode_prefixes(code, long64);
	bool rep = false;
	for (std::size_t k = 0; k < p.length; k++)
		rep |= code[k] == 0xf3 || code[k] == 0xf2; /* f2 is rep too for stos/movs */
	if (!rep || p.length >= code.size() || (p.seg >= 0 && p.seg != 3 && long64))
		return std::nullopt; /* a segment override moves movs' source: not modelled */
	const std::uint8_t op = code[p.length];
	if (op != 0xaa && op != 0xab && op != 0xa4 && op != 0xa5)
		return std::nullopt;
	RepString r{};
	r.movs = op == 0xa4 || op == 0xa5;
	r.size = (op & 1) ? (p.rex & 8 ? 8 : p.opsize ? 2 : 4) : 1;
	r.length = static_cast<std::uint8_t>(p.length + 1);
	r.addr_bytes = long64 && !p.addrsize ? 8 : 4;
	if (!long64 && p.addrsize)
		return std::nullopt;
	return r;
}

__u64 &gpr(kvm_regs &r, unsigned n)
{
	__u64 *v[16] = {&r.rax, &r.rcx, &r.rdx, &r.rbx, &r.rsp, &r.rbp, &r.rsi, &r.rdi,
			&r.r8,	&r.r9,	&r.r10, &r.r11, &r.r12, &r.r13, &r.r14, &r.r15};
	return *v[n & 15];
}

__u64 gpr(const kvm_regs &r, unsigned n)
{
	return gpr(const_cast<kvm_regs &>(r), n);
}

std::uint64_t linear_address(const MemOperand &d, const kvm_regs &regs, const kvm_sregs &s,
			     bool long64, std::uint64_t rip_after)
{
	std::uint64_t ea = static_cast<std::uint64_t>(d.disp);
	if (d.base >= 0)
		ea += gpr(regs, d.base);
	if (d.index >= 0)
		ea += gpr(regs, d.index) << d.scale;
	if (d.rip_relative)
		ea += rip_after;
	if (d.addr_bytes == 4)
		ea &= 0xffffffff;
	if (long64) {
		if (d.seg == 4)
			ea += s.fs.base;
		else if (d.seg == 5)
			ea += s.gs.base;
		return ea;
	}
	const kvm_segment *segs[] = {&s.es, &s.cs, &s.ss, &s.ds, &s.fs, &s.gs};
	const int seg = d.seg >= 0 ? d.seg : (d.base == 4 || d.base == 5) ? 2 : 3;
	return (segs[seg]->base + ea) & 0xffffffff;
}

std::optional<bool> code_is_64bit(const kvm_sregs &s)
{
	if ((s.efer & (1u << 10)) && s.cs.l)
		return true;
	if (s.cs.db)
		return false;
	return std::nullopt;
}

std::size_t read_guest_virtual(Vcpu &vcpu, std::uint64_t gva, std::span<std::uint8_t> out)
{
	std::size_t got = 0;
	while (got < out.size()) {
		const std::uint64_t va = gva + got;
		const auto gpa = RunControl::guest_physical(vcpu, va);
		if (!gpa)
			break;
		const std::size_t n = std::min<std::uint64_t>(out.size() - got, 4096 - va % 4096);
		if (!vcpu.memory().contains(*gpa, n))
			break;
		vcpu.memory().read(*gpa,
				   std::as_writable_bytes(out.subspan(got, n)));
		got += n;
	}
	return got;
}

std::optional<PrecedingCode> preceding_code(Vcpu &vcpu, std::uint64_t rip)
{
	PrecedingCode c;
	c.sregs = vcpu.sregs();
	const auto long64 = code_is_64bit(c.sregs);
	if (!long64)
		return std::nullopt;
	c.long64 = *long64;
	auto read = [&](std::uint64_t gva, std::span<std::uint8_t> out) {
		return RunControl::read_code(vcpu, c.sregs, gva, out);
	};
	/* Usually one page: one translation for both. */
	const std::size_t got = read(rip - 15, c.buf);
	if (got >= 15) {
		c.before = 15;
		c.after = got - 15;
		return c;
	}
	/* The page before rip's is not mapped: only rip's own page. */
	const std::size_t want = std::min<std::uint64_t>(rip - ((rip - 1) & ~4095ull), 15);
	const std::size_t got2 = read(rip - want, std::span(c.buf).subspan(15 - want, want + 15));
	if (got2 >= want) {
		c.before = want;
		c.after = got2 - want;
	} else {
		c.after = read(rip, std::span(c.buf).subspan(15));
	}
	return c;
}

kvm_segment segment_from_descriptor(std::uint16_t selector, std::uint64_t desc)
{
	kvm_segment s{};
	s.selector = selector;
	s.base = (desc >> 16 & 0xffffff) | (desc >> 56 & 0xff) << 24;
	s.limit = static_cast<std::uint32_t>((desc & 0xffff) | (desc >> 32 & 0xf0000));
	s.type = desc >> 40 & 0xf;
	s.s = desc >> 44 & 1;
	s.dpl = desc >> 45 & 3;
	s.present = desc >> 47 & 1;
	s.avl = desc >> 52 & 1;
	s.l = desc >> 53 & 1;
	s.db = desc >> 54 & 1;
	s.g = desc >> 55 & 1;
	if (s.g)
		s.limit = s.limit << 12 | 0xfff;
	return s;
}

} // namespace virtkit::detail
