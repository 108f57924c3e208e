// SPDX-License-Identifier: MIT
#include "spp/locked_rmw.hpp"

#include <algorithm>
#include <array>
#include <cstring>

#include <virtkit/memory.hpp>
#include <virtkit/vcpu.hpp>

#include "core/run_control.hpp"

namespace virtkit::detail {

static constexpr std::uint64_t arith = 0x8d5; /* CF PF AF ZF SF OF */
static constexpr std::uint64_t cf = 0x1, zf = 0x40;

static std::uint64_t size_mask(unsigned size)
{
	return size == 8 ? ~0ull : (1ull << 8 * size) - 1;
}

/* --- decoding --------------------------------------------------------- */

std::optional<RmwInsn> decode_rmw(std::span<const std::uint8_t> code, bool long64)
{
	const std::size_t n = std::min<std::size_t>(code.size(), 15);
	const Prefixes pre = decode_prefixes(code, long64);
	const std::uint8_t rex = pre.rex;
	std::size_t i = pre.length;
	if (i + 1 >= n)
		return std::nullopt;
	std::uint8_t opc = code[i++];
	const bool two = opc == 0x0f;
	if (two)
		opc = code[i++];
	RmwInsn d{};
	unsigned reg;
	auto after = decode_mem_operand(code, i, pre, long64, d.mem, reg);
	if (!after)
		return std::nullopt;
	i = *after;

	enum { none, by_reg, imm8, immz } src = none;
	bool byte = false;
	if (!two) {
		if (opc < 0x40 && (opc & 7) < 2 && opc >> 3 != 7) {
			d.op = static_cast<RmwOp>(opc >> 3);
			byte = !(opc & 1);
			src = by_reg;
		} else if (opc == 0x80 || opc == 0x81 || opc == 0x83) {
			if (reg == 7) /* cmp */
				return std::nullopt;
			d.op = static_cast<RmwOp>(reg);
			byte = opc == 0x80;
			src = opc == 0x81 ? immz : imm8;
		} else if (opc == 0x86 || opc == 0x87) {
			d.op = RmwOp::xchg;
			byte = opc == 0x86;
			src = by_reg;
		} else if ((opc == 0xf6 || opc == 0xf7) && (reg == 2 || reg == 3)) {
			d.op = reg == 2 ? RmwOp::not_ : RmwOp::neg;
			byte = opc == 0xf6;
		} else if ((opc == 0xfe || opc == 0xff) && reg < 2) {
			d.op = reg == 0 ? RmwOp::inc : RmwOp::dec;
			byte = opc == 0xfe;
		} else {
			return std::nullopt;
		}
	} else {
		switch (opc) {
		case 0xab: d.op = RmwOp::bts; src = by_reg; break;
		case 0xb3: d.op = RmwOp::btr; src = by_reg; break;
		case 0xbb: d.op = RmwOp::btc; src = by_reg; break;
		case 0xba:
			if (reg < 5)
				return std::nullopt; /* bt (no write), or undefined */
			d.op = static_cast<RmwOp>(static_cast<unsigned>(RmwOp::bts) + reg - 5);
			src = imm8;
			break;
		case 0xb0: case 0xb1:
			d.op = RmwOp::cmpxchg;
			byte = opc == 0xb0;
			src = by_reg;
			break;
		case 0xc0: case 0xc1:
			d.op = RmwOp::xadd;
			byte = opc == 0xc0;
			src = by_reg;
			break;
		case 0xc7:
			if (reg != 1 || rex & 8) /* cmpxchg16b is completed elsewhere */
				return std::nullopt;
			d.op = RmwOp::cmpxchg8b;
			break;
		default:
			return std::nullopt;
		}
	}
	if (d.op == RmwOp::cmpxchg8b)
		d.size = 8;
	else
		d.size = byte ? 1 : rex & 8 ? 8 : pre.opsize ? 2 : 4;
	if (src == by_reg) {
		d.src_reg = static_cast<std::uint8_t>(reg | (rex & 4) << 1);
		d.high8 = byte && !rex && reg >= 4;
		if (d.high8)
			d.src_reg = static_cast<std::uint8_t>(reg - 4);
	}

	if (src == imm8 || src == immz) {
		const unsigned bytes = src == imm8 || byte ? 1 : d.size == 2 ? 2 : 4;
		if (i + bytes > n)
			return std::nullopt;
		std::int64_t v = 0;
		if (bytes == 1)
			v = static_cast<std::int8_t>(code[i]);
		else if (bytes == 2)
			v = static_cast<std::int16_t>(code[i] | code[i + 1] << 8);
		else
			v = static_cast<std::int32_t>(code[i] | code[i + 1] << 8 | code[i + 2] << 16 |
						      static_cast<std::uint32_t>(code[i + 3]) << 24);
		i += bytes;
		d.src_imm = true;
		/* A bit number is not sign-extended; an ALU immediate is. */
		d.imm = d.op >= RmwOp::bts && d.op <= RmwOp::btc ? code[i - 1]
								  : static_cast<std::uint64_t>(v) & size_mask(d.size);
	}
	d.length = static_cast<std::uint8_t>(i);
	return d;
}

/* --- the instruction on the host --------------------------------------- */

/* The source register's value (size bytes), and writing one back as the CPU does. */
static std::uint64_t read_reg(const kvm_regs &r, const RmwInsn &d)
{
	if (d.high8)
		return gpr(r, d.src_reg) >> 8 & 0xff;
	return gpr(r, d.src_reg) & size_mask(d.size);
}

static void write_reg(kvm_regs &r, unsigned n, bool high8, unsigned size, std::uint64_t v)
{
	__u64 &x = gpr(r, n);
	if (high8)
		x = (x & ~0xff00ull) | (v & 0xff) << 8;
	else if (size == 4)
		x = v & 0xffffffff; /* 32-bit writes zero-extend */
	else
		x = (x & ~size_mask(size)) | (v & size_mask(size));
}

struct HostResult {
	std::uint64_t flags;
	std::uint64_t src;	/* xadd/xchg: the old value; cmpxchg: rax */
	std::uint64_t rdx;	/* cmpxchg8b: edx */
};

/*
 * Run the instruction natively on m with the arithmetic flags flags_in,
 * returning the flags it leaves. The stack moves past the red zone around
 * pushfq/popfq: the compiler may keep locals there.
 */
#define FLAGS_IN "lea -128(%%rsp), %%rsp\n\tpushfq\n\tandq $~0x8d5, (%%rsp)\n\t" \
		 "orq %[fin], (%%rsp)\n\tpopfq\n\t"
#define FLAGS_OUT "\n\tpushfq\n\tpopq %[fout]\n\tlea 128(%%rsp), %%rsp"

template <class T> static HostResult host_binary(RmwOp op, T *m, T s, std::uint64_t fin)
{
	HostResult r{};
#define BIN(insn)                                                                          \
	asm volatile(FLAGS_IN insn " %[s], %[m]" FLAGS_OUT                                 \
		     : [m] "+m"(*m), [fout] "=&r"(r.flags)                                 \
		     : [s] "r"(s), [fin] "r"(fin)                                          \
		     : "cc", "memory")
	switch (op) {
	case RmwOp::add: BIN("lock add"); break;
	case RmwOp::or_: BIN("lock or"); break;
	case RmwOp::adc: BIN("lock adc"); break;
	case RmwOp::sbb: BIN("lock sbb"); break;
	case RmwOp::and_: BIN("lock and"); break;
	case RmwOp::sub: BIN("lock sub"); break;
	case RmwOp::xor_: BIN("lock xor"); break;
	case RmwOp::xadd:
		asm volatile(FLAGS_IN "lock xadd %[s], %[m]" FLAGS_OUT
			     : [m] "+m"(*m), [fout] "=&r"(r.flags), [s] "+r"(s)
			     : [fin] "r"(fin)
			     : "cc", "memory");
		r.src = s;
		break;
	case RmwOp::xchg:
		asm volatile("xchg %[s], %[m]" : [m] "+m"(*m), [s] "+r"(s) : : "memory");
		r.flags = fin;
		r.src = s;
		break;
	default:
		break;
	}
#undef BIN
	return r;
}

template <class T> static HostResult host_cmpxchg(T *m, T rax, T s, std::uint64_t fin)
{
	HostResult r{};
	asm volatile(FLAGS_IN "lock cmpxchg %[s], %[m]" FLAGS_OUT
		     : [m] "+m"(*m), [fout] "=&r"(r.flags), "+a"(rax)
		     : [s] "r"(s), [fin] "r"(fin)
		     : "cc", "memory");
	r.src = rax;
	return r;
}

template <class T> static HostResult host_bit(RmwOp op, T *m, T bit, std::uint64_t fin)
{
	HostResult r{};
#define BIT(insn)                                                                          \
	asm volatile(FLAGS_IN insn " %[b], %[m]" FLAGS_OUT                                 \
		     : [m] "+m"(*m), [fout] "=&r"(r.flags)                                 \
		     : [b] "r"(bit), [fin] "r"(fin)                                        \
		     : "cc", "memory")
	if (op == RmwOp::bts)
		BIT("lock bts");
	else if (op == RmwOp::btr)
		BIT("lock btr");
	else
		BIT("lock btc");
#undef BIT
	return r;
}

#define UNARY(T, S)                                                                        \
	static HostResult host_unary(RmwOp op, T *m, std::uint64_t fin)                    \
	{                                                                                  \
		HostResult r{};                                                            \
		switch (op) {                                                              \
		case RmwOp::inc: UN("lock inc" S); break;                                  \
		case RmwOp::dec: UN("lock dec" S); break;                                  \
		case RmwOp::not_: UN("lock not" S); break;                                 \
		default: UN("lock neg" S); break;                                          \
		}                                                                          \
		return r;                                                                  \
	}
#define UN(insn)                                                                           \
	asm volatile(FLAGS_IN insn " %[m]" FLAGS_OUT                                       \
		     : [m] "+m"(*m), [fout] "=&r"(r.flags)                                 \
		     : [fin] "r"(fin)                                                      \
		     : "cc", "memory")
UNARY(std::uint8_t, "b")
UNARY(std::uint16_t, "w")
UNARY(std::uint32_t, "l")
UNARY(std::uint64_t, "q")
#undef UN
#undef UNARY

static HostResult host_cmpxchg8b(std::uint64_t *m, std::uint32_t eax, std::uint32_t edx,
				 std::uint32_t ebx, std::uint32_t ecx, std::uint64_t fin)
{
	HostResult r{};
	asm volatile(FLAGS_IN "lock cmpxchg8b %[m]" FLAGS_OUT
		     : [m] "+m"(*m), [fout] "=&r"(r.flags), "+a"(eax), "+d"(edx)
		     : "b"(ebx), "c"(ecx), [fin] "r"(fin)
		     : "cc", "memory");
	r.src = eax;
	r.rdx = edx;
	return r;
}
#undef FLAGS_IN
#undef FLAGS_OUT

template <class T> static HostResult host_exec(const RmwPlan &p, void *host)
{
	T *m = static_cast<T *>(host);
	const T s = static_cast<T>(p.src);
	switch (p.insn.op) {
	case RmwOp::inc: case RmwOp::dec: case RmwOp::not_: case RmwOp::neg:
		return host_unary(p.insn.op, m, p.flags_in);
	case RmwOp::bts: case RmwOp::btr: case RmwOp::btc:
		if constexpr (sizeof(T) > 1)
			return host_bit(p.insn.op, m, static_cast<T>(p.src & (8 * sizeof(T) - 1)),
					p.flags_in);
		return {};
	case RmwOp::cmpxchg:
		return host_cmpxchg(m, static_cast<T>(p.rax), s, p.flags_in);
	case RmwOp::cmpxchg8b:
		if constexpr (sizeof(T) == 8)
			return host_cmpxchg8b(m, static_cast<std::uint32_t>(p.rax),
					      static_cast<std::uint32_t>(p.rdx),
					      static_cast<std::uint32_t>(p.rbx),
					      static_cast<std::uint32_t>(p.rcx), p.flags_in);
		return {};
	default:
		return host_binary(p.insn.op, m, s, p.flags_in);
	}
}

static HostResult execute(const RmwPlan &p, void *host)
{
	switch (p.insn.size) {
	case 1: return host_exec<std::uint8_t>(p, host);
	case 2: return host_exec<std::uint16_t>(p, host);
	case 4: return host_exec<std::uint32_t>(p, host);
	default: return host_exec<std::uint64_t>(p, host);
	}
}

/* The flags an instruction sets (the others it leaves as they were). */
static std::uint64_t flags_written(RmwOp op)
{
	switch (op) {
	case RmwOp::inc: case RmwOp::dec: return arith & ~cf;
	case RmwOp::not_: case RmwOp::xchg: return 0;
	case RmwOp::bts: case RmwOp::btr: case RmwOp::btc: return cf;
	case RmwOp::cmpxchg8b: return zf;
	default: return arith;
	}
}

/* The flags an instruction sets that are defined (and., or., xor. leave AF undefined). */
static std::uint64_t flags_defined(RmwOp op)
{
	if (op == RmwOp::and_ || op == RmwOp::or_ || op == RmwOp::xor_)
		return arith & ~0x10ull;
	return flags_written(op);
}

kvm_regs perform_rmw(const RmwPlan &p, void *host, const kvm_regs &post)
{
	kvm_regs r = post;
	if (!p.store)
		return r;
	const HostResult h = execute(p, host);
	const std::uint64_t w = flags_written(p.insn.op);
	r.rflags = (post.rflags & ~w) | (h.flags & w);
	const RmwInsn &d = p.insn;
	switch (d.op) {
	case RmwOp::xadd: case RmwOp::xchg:
		write_reg(r, d.src_reg, d.high8, d.size, h.src);
		break;
	case RmwOp::cmpxchg:
		if (!(h.flags & zf))
			write_reg(r, 0, false, d.size, h.src);
		break;
	case RmwOp::cmpxchg8b:
		if (!(h.flags & zf)) {
			r.rax = h.src & 0xffffffff;
			r.rdx = h.rdx & 0xffffffff;
		}
		break;
	default:
		break;
	}
	return r;
}

/* --- explaining a trapped write ---------------------------------------- */

/*
 * The plan for insn given the registers KVM left and the data it wrote, if
 * they agree with it: KVM ran the instruction on some value m0 it read; the
 * data must be what the instruction makes of m0 and the flags what it sets.
 * Where m0 follows from them, the instruction is re-run on m0 natively to
 * check; and. and or. only constrain the data.
 */
static std::optional<RmwPlan> explain(const RmwInsn &d, const kvm_regs &post, std::uint64_t data)
{
	const std::uint64_t mask = size_mask(d.size);
	RmwPlan p{};
	p.insn = d;
	p.store = true;
	p.flags_in = post.rflags & arith;
	p.src = d.src_imm ? d.imm : read_reg(post, d);
	std::uint64_t m0 = 0;

	auto check = [&](std::uint64_t m0_try, std::uint64_t fin) {
		RmwPlan t = p;
		t.flags_in = fin;
		std::uint64_t local = m0_try;
		const HostResult h = execute(t, &local);
		const std::uint64_t f = flags_defined(d.op);
		return (local & mask) == data && (h.flags & f) == (post.rflags & f);
	};

	switch (d.op) {
	case RmwOp::add: m0 = data - p.src; break;
	case RmwOp::sub: m0 = data + p.src; break;
	case RmwOp::xor_: m0 = data ^ p.src; break;
	case RmwOp::or_: case RmwOp::and_: m0 = data; break; /* same result and flags */
	case RmwOp::adc: case RmwOp::sbb:
		/* The carry it consumed is gone from the flags: the one that fits. */
		for (std::uint64_t c : {0ull, 1ull}) {
			std::uint64_t m = d.op == RmwOp::adc ? data - p.src - c : data + p.src + c;
			if (check(m & mask, (post.rflags & arith & ~cf) | c)) {
				p.flags_in = (post.rflags & arith & ~cf) | c;
				p.m0 = m & mask;
				return p;
			}
		}
		return std::nullopt;
	case RmwOp::inc: m0 = data - 1; break;
	case RmwOp::dec: m0 = data + 1; break;
	case RmwOp::not_: m0 = ~data; break;
	case RmwOp::neg: m0 = -data; break;
	case RmwOp::bts: case RmwOp::btr: case RmwOp::btc: {
		const std::uint64_t bit = 1ull << (p.src & (8 * d.size - 1));
		const bool was = post.rflags & cf;
		m0 = was ? data | bit : data & ~bit;
		if (d.op == RmwOp::btc)
			m0 = data ^ bit;
		break;
	}
	case RmwOp::xadd:
		m0 = read_reg(post, d);
		p.src = (data - m0) & mask;
		break;
	case RmwOp::xchg:
		p.src = data;
		p.m0 = read_reg(post, d);
		return p;
	case RmwOp::cmpxchg:
		p.rax = post.rax & mask;
		p.m0 = p.rax; /* equal, or loaded into rax */
		if (!(post.rflags & zf)) {
			/* Failed: KVM wrote back what it read, which is now in rax. */
			if (data != p.rax)
				return std::nullopt;
			p.store = false;
			return p;
		}
		return data == p.src ? std::optional(p) : std::nullopt;
	case RmwOp::cmpxchg8b:
		p.rax = post.rax & 0xffffffff;
		p.rdx = post.rdx & 0xffffffff;
		p.rbx = post.rbx & 0xffffffff;
		p.rcx = post.rcx & 0xffffffff;
		p.m0 = p.rdx << 32 | p.rax;
		if (!(post.rflags & zf)) {
			if (data != (p.rdx << 32 | p.rax))
				return std::nullopt;
			p.store = false;
			return p;
		}
		return data == (p.rcx << 32 | p.rbx) ? std::optional(p) : std::nullopt;
	}
	if (!check(m0 & mask, p.flags_in))
		return std::nullopt;
	if (d.op != RmwOp::or_ && d.op != RmwOp::and_)
		p.m0 = m0 & mask;
	return p;
}

/*
 * The registers before the instruction, as far as its address depends on
 * them: xadd and xchg changed their source register, a failed
 * compare-exchange rax (and rdx); nullopt when the address uses one whose
 * old value cannot be worked out.
 */
static std::optional<kvm_regs> regs_before(const RmwPlan &p, const kvm_regs &post)
{
	const RmwInsn &d = p.insn;
	auto in_address = [&](int r) { return d.mem.base == r || d.mem.index == r; };
	switch (d.op) {
	case RmwOp::xadd:
	case RmwOp::xchg: {
		if (!in_address(d.src_reg))
			return post;
		if (d.size == 4)
			return std::nullopt; /* its upper half was cleared */
		kvm_regs pre = post;
		write_reg(pre, d.src_reg, d.high8, d.size, p.src);
		return pre;
	}
	case RmwOp::cmpxchg:
	case RmwOp::cmpxchg8b:
		/* A failed one loaded memory into them: the old values are gone. */
		if (!p.store && (in_address(0) || (d.op == RmwOp::cmpxchg8b && in_address(2))))
			return std::nullopt;
		return post;
	default:
		return post;
	}
}

static std::uint64_t operand_gva(const RmwPlan &p, const kvm_regs &pre, const kvm_sregs &s,
				 bool long64)
{
	const RmwInsn &d = p.insn;
	MemOperand mem = d.mem;
	if (d.op >= RmwOp::bts && d.op <= RmwOp::btc && !d.src_imm) {
		/* A bit offset in a register also selects the operand. */
		const unsigned bits = 8 * d.size;
		std::int64_t off = static_cast<std::int64_t>(p.src << (64 - bits)) >> (64 - bits);
		mem.disp += (off & ~static_cast<std::int64_t>(bits - 1)) >> 3;
	}
	return linear_address(mem, pre, s, long64, pre.rip);
}

/*
 * Whether the registers after the instruction do not give its operand's
 * address: a bit offset in a register moves the operand; xadd, xchg and a
 * failed compare-exchange change a register the address may use.
 */
static bool address_needs_pre_regs(const RmwInsn &d)
{
	auto in_address = [&](int r) { return d.mem.base == r || d.mem.index == r; };
	switch (d.op) {
	case RmwOp::bts:
	case RmwOp::btr:
	case RmwOp::btc:
		return !d.src_imm;
	case RmwOp::xadd:
	case RmwOp::xchg:
		return in_address(d.src_reg);
	case RmwOp::cmpxchg:
		return in_address(0);
	case RmwOp::cmpxchg8b:
		return in_address(0) || in_address(2);
	default:
		return false;
	}
}

const std::vector<StoreCandidate> &stores_ending_here(std::span<const std::uint8_t> code,
						      bool long64)
{
	/*
	 * A pure function of the bytes, asked again each time a guest loop
	 * stores through the same instruction: the last answer is kept per
	 * thread (each vCPU runs on its own).
	 */
	thread_local struct {
		std::array<std::uint8_t, 15> bytes;
		std::size_t size = ~std::size_t{0};
		bool long64;
		std::vector<StoreCandidate> out;
	} last;
	if (code.size() <= last.bytes.size() && code.size() == last.size && long64 == last.long64 &&
	    std::equal(code.begin(), code.end(), last.bytes.begin()))
		return last.out;
	std::vector<StoreCandidate> &out = last.out;
	out.clear();
	last.size = ~std::size_t{0}; /* until out is complete */
	for (std::size_t n = 2; n <= code.size() && n <= 15; n++) {
		const auto tail = code.last(n);
		if (auto st = decode_store(tail, long64); st && st->length == n) {
			out.push_back({st->mem, st->size, n, StoreCandidate::Kind::store});
		} else if (auto rmw = decode_rmw(tail, long64); rmw && rmw->length == n) {
			out.push_back({rmw->mem, rmw->size, n,
				       address_needs_pre_regs(*rmw) ? StoreCandidate::Kind::rmw_elsewhere
								    : StoreCandidate::Kind::rmw});
		}
	}
	if (code.size() <= last.bytes.size()) {
		std::copy(code.begin(), code.end(), last.bytes.begin());
		last.size = code.size();
		last.long64 = long64;
	}
	return out;
}

StoreShape store_shape(Vcpu &vcpu, const PrecedingCode &code, const kvm_regs &post,
		       std::uint64_t gpa, std::uint32_t len)
{
	/*
	 * The instruction KVM ran is one of the candidates that end at rip,
	 * store at gpa and would have made a first piece of len bytes (KVM
	 * reports up to 8 bytes of a page per exit). Others - a prefix left
	 * out (REX.W, 66) or a byte in front read as one - cannot be it. Every
	 * one that can must store just len bytes inside the page for a single
	 * piece; any disagreement, and the pieces are collected as usual.
	 * Bytes on an unmapped page before rip's cannot start it
	 * (preceding_code()). An RMW whose address the registers after it do not
	 * give may be it too: then nothing is known.
	 */
	const auto &candidates = stores_ending_here(code.bytes(), code.long64);
	auto shape = [&](bool walk) -> StoreShape {
		bool consistent = false, one_piece = true, rmw = false;
		std::optional<std::uint64_t> last_gva; /* candidates often share an operand */
		bool last_maps = false;
		for (const StoreCandidate &c : candidates) {
			if (c.kind == StoreCandidate::Kind::rmw_elsewhere)
				return {};
			const std::uint64_t gva =
				linear_address(c.mem, post, code.sregs, code.long64, post.rip);
			if (gva % 4096 != gpa % 4096)
				continue;
			if (walk && gva != last_gva) {
				last_gva = gva;
				last_maps = RunControl::guest_physical(vcpu, gva) == gpa;
			}
			if (walk && !last_maps)
				continue;
			if (std::min<std::uint64_t>({8, c.size, 4096 - gva % 4096}) != len)
				continue;
			consistent = true;
			one_piece &= c.size == len;
			rmw |= c.kind == StoreCandidate::Kind::rmw;
		}
		if (!consistent)
			return {};
		return {one_piece, rmw};
	};
	/*
	 * The page offset alone rules out nearly every candidate that does not
	 * store at gpa. When those left agree on a single plain store, the
	 * page walks that would rule out more cannot change the answer (they
	 * would only find that none maps to gpa, if the real instruction is
	 * one not decoded here); else they narrow it down.
	 */
	if (const StoreShape quick = shape(false); quick.one_piece && !quick.may_be_rmw)
		return quick;
	return shape(true);
}

std::optional<RmwPlan> find_locked_rmw(Vcpu &vcpu, const PrecedingCode &pc, const kvm_regs &post,
				       std::uint64_t gpa, std::span<const std::uint8_t> data)
{
	const std::size_t size = data.size();
	if (size != 1 && size != 2 && size != 4 && size != 8)
		return std::nullopt;
	const kvm_sregs &s = pc.sregs;
	const bool long64 = pc.long64;
	const std::span<const std::uint8_t> code = pc.bytes();
	const std::size_t have = code.size();

	std::uint64_t value = 0;
	std::memcpy(&value, data.data(), size);
	/*
	 * Every instruction that ends at rip and explains the write. The bytes
	 * before the real one may read as prefixes (a longer candidate), and
	 * its own prefixes may be left out (a shorter one): with REX.R, say,
	 * both can explain it with different registers. Choose the one that
	 * starts with LOCK (the real locked instruction does; bytes in front
	 * of it cannot change it), else one that all candidates agree with,
	 * else the one whose operand KVM read matches memory now.
	 */
	struct Candidate {
		RmwPlan plan;
		std::size_t len;
	};
	std::vector<Candidate> found;
	for (std::size_t len = 2; len <= have; len++) {
		auto d = decode_rmw(code.last(len), long64);
		if (!d || d->length != len || d->size != size)
			continue;
		auto p = explain(*d, post, value);
		if (!p)
			continue;
		auto pre = regs_before(*p, post);
		if (!pre)
			continue;
		const std::uint64_t gva = operand_gva(*p, *pre, s, long64);
		if (RunControl::guest_physical(vcpu, gva) != gpa)
			continue;
		p->gva = gva;
		found.push_back({*p, len});
	}
	if (found.empty())
		return std::nullopt;
	for (const Candidate &c : found)
		if (code[code.size() - c.len] == 0xf0)
			return c.plan;
	auto same = [](const RmwInsn &a, const RmwInsn &b) {
		return a.op == b.op && a.size == b.size && a.src_imm == b.src_imm &&
		       a.high8 == b.high8 && (a.src_imm ? a.imm == b.imm : a.src_reg == b.src_reg);
	};
	if (std::all_of(found.begin(), found.end(),
			[&](const Candidate &c) { return same(c.plan.insn, found[0].plan.insn); }))
		return found[0].plan;
	std::uint64_t now = 0;
	if (vcpu.memory().contains(gpa, size))
		vcpu.memory().read(gpa, std::as_writable_bytes(std::span(&now, 1)).first(size));
	const Candidate *match = nullptr;
	for (const Candidate &c : found)
		if (c.plan.m0 == now) {
			if (match)
				return std::nullopt; /* cannot tell: see spp.rst */
			match = &c;
		}
	if (match)
		return match->plan;
	return std::nullopt;
}

} // namespace virtkit::detail
