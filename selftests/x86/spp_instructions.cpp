// SPDX-License-Identifier: MIT
/*
 * Sub-page protection against every kind of guest store KVM emulates: each
 * instruction runs on an unprotected reference page, on a writable sub-page
 * of a protected page and on a write-protected sub-page, from identical
 * memory and registers. On the writable sub-page it must leave exactly what
 * it leaves on the reference page (memory, result registers, flags); on the
 * protected one memory stays as it was, the violation is reported, and -
 * the default decision being drop - the instruction otherwise completes, so
 * its registers again match the reference.
 *
 * Also: rep movs/stos checked per element, push and call onto a protected
 * stack, lock cmpxchg16b, dirty logging of allowed writes, and reads and
 * instruction fetches from protected pages never exiting.
 */
#include "test.hpp"

#include <algorithm>
#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_probes.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <climits>
#include <cstring>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint64_t spp_gpa = 0x40000000; /* 1 GiB */
static constexpr std::uint64_t spp_pages = 8;
static constexpr std::uint64_t spp_gfn = spp_gpa / 4096;
/* The reference page: not protected and not next to a protected page. */
static constexpr std::uint64_t ref_page = spp_gpa;
/* The protected page: sub-pages 0..15 writable, 16..31 protected. */
static constexpr std::uint64_t prot_page = spp_gpa + 2 * 4096;
static constexpr std::uint32_t prot_map = 0x0000ffffu;
static constexpr std::uint64_t denied_half = 2048;

/* What an instruction starts with and leaves (offsets used by the stubs). */
struct Io {
	std::uint64_t in[4];	/* rax, rdx, rbx, rcx (and xmm0 = in[0..1]) */
	std::uint64_t out[4];	/* rax, rdx, rbx, rcx afterwards */
	std::uint64_t flags;	/* rflags afterwards */
	std::uint64_t pad[7];
};
static_assert(sizeof(Io) == 128);

static constexpr std::uint64_t arith_flags = 0x8d5; /* CF PF AF ZF SF OF */

/*
 * stub(addr = %rdi, io = %rsi): load rax, rdx, rbx, rcx and xmm0 from io,
 * clear the arithmetic flags, run the instruction on (%rdi), save the
 * registers and flags. "_after" labels the instruction the guest continues
 * with: the RIP a violation reports.
 */
#define SPP_OP(name, insn)                                                     \
	".globl spp_op_" name ", spp_op_" name "_after\n"                      \
	"spp_op_" name ":\n"                                                   \
	"	push %rbx\n"                                                   \
	"	mov 0(%rsi), %rax\n"                                           \
	"	mov 8(%rsi), %rdx\n"                                           \
	"	mov 16(%rsi), %rbx\n"                                          \
	"	mov 24(%rsi), %rcx\n"                                          \
	"	movups 0(%rsi), %xmm0\n"                                       \
	"	pushfq\n"                                                      \
	"	andq $~0x8d5, (%rsp)\n"                                        \
	"	popfq\n"                                                       \
	"	" insn "\n"                                                    \
	"spp_op_" name "_after:\n"                                             \
	"	pushfq\n"                                                      \
	"	popq 64(%rsi)\n"                                               \
	"	mov %rax, 32(%rsi)\n"                                          \
	"	mov %rdx, 40(%rsi)\n"                                          \
	"	mov %rbx, 48(%rsi)\n"                                          \
	"	mov %rcx, 56(%rsi)\n"                                          \
	"	pop %rbx\n"                                                    \
	"	ret\n"

asm(".pushsection .text\n"
    SPP_OP("mov1", "movb %al, (%rdi)")
    SPP_OP("mov2", "movw %ax, (%rdi)")
    SPP_OP("mov4", "movl %eax, (%rdi)")
    SPP_OP("mov8", "movq %rax, (%rdi)")
    SPP_OP("mov1_imm", "movb $0xa5, (%rdi)")
    SPP_OP("mov8_imm", "movq $-0x789abcdf, (%rdi)")
    SPP_OP("movnti", "movnti %rax, (%rdi)")
    SPP_OP("movups", "movups %xmm0, (%rdi)")
    SPP_OP("movdqa", "movdqa %xmm0, (%rdi)")
    SPP_OP("setcc", "cmp %rdx, %rax\n\tsete (%rdi)")
    SPP_OP("xchg1", "xchg %al, (%rdi)")
    SPP_OP("xchg2", "xchg %ax, (%rdi)")
    SPP_OP("xchg8", "xchg %rax, (%rdi)")
    SPP_OP("cmpxchg8", "cmpxchg %rdx, (%rdi)")
    SPP_OP("lock_cmpxchg8", "lock cmpxchg %rdx, (%rdi)")
    SPP_OP("lock_cmpxchg4", "lock cmpxchg %edx, (%rdi)")
    SPP_OP("lock_cmpxchg8b", "lock cmpxchg8b (%rdi)")
    SPP_OP("lock_cmpxchg16b", "lock cmpxchg16b (%rdi)")
    SPP_OP("lock_add8", "lock add %rax, (%rdi)")
    SPP_OP("lock_xadd8", "lock xadd %rax, (%rdi)")
    SPP_OP("lock_xadd2", "lock xadd %ax, (%rdi)")
    SPP_OP("lock_or8", "lock or %rax, (%rdi)")
    SPP_OP("lock_and1", "lock andb %al, (%rdi)")
    SPP_OP("lock_inc8", "lock incq (%rdi)")
    SPP_OP("lock_inc2", "lock incw (%rdi)")
    SPP_OP("lock_bts8", "lock btsq %rax, (%rdi)")
    SPP_OP("add4", "addl %eax, (%rdi)")
    SPP_OP("sub8", "subq %rax, (%rdi)")
    SPP_OP("inc4", "incl (%rdi)")
    SPP_OP("not2", "notw (%rdi)")
    SPP_OP("neg8", "negq (%rdi)")
    SPP_OP("shl8", "shlq $3, (%rdi)")
    ".popsection\n");

/*
 * rep string stubs: rdi = destination, io->in = {rax, rsi, rcx}; io->out =
 * {rcx, rdi, rsi} afterwards. "_insn" labels the rep instruction.
 */
#define SPP_REP(name, insn)                                                    \
	".globl spp_rep_" name ", spp_rep_" name "_insn\n"                      \
	"spp_rep_" name ":\n"                                                  \
	"	mov %rsi, %r8\n"                                               \
	"	mov 0(%r8), %rax\n"                                            \
	"	mov 8(%r8), %rsi\n"                                            \
	"	mov 16(%r8), %rcx\n"                                           \
	"	cld\n"                                                         \
	"spp_rep_" name "_insn:\n"                                             \
	"	" insn "\n"                                                    \
	"	mov %rcx, 32(%r8)\n"                                           \
	"	mov %rdi, 40(%r8)\n"                                           \
	"	mov %rsi, 48(%r8)\n"                                           \
	"	ret\n"

asm(".pushsection .text\n"
    SPP_REP("movsq", "rep movsq")
    SPP_REP("movsb", "rep movsb")
    SPP_REP("stosq", "rep stosq")
    SPP_REP("stosb", "rep stosb")
    /*
     * Stack stubs: %rdi is the stack top to switch to. push: push io->in[0],
     * then pop it back; call: call a label, which pops the return address.
     * io->out = {the popped value, rsp right after the push or call}.
     */
    ".globl spp_stack_push, spp_stack_push_after\n"
    "spp_stack_push:\n"
    "	mov %rsp, %r9\n"
    "	mov 0(%rsi), %rax\n"
    "	mov %rdi, %rsp\n"
    "	push %rax\n"
    "spp_stack_push_after:\n"
    "	mov %rsp, 40(%rsi)\n"
    "	pop %rdx\n"
    "	mov %r9, %rsp\n"
    "	mov %rdx, 32(%rsi)\n"
    "	ret\n"
    ".globl spp_stack_call, spp_stack_call_ret, spp_stack_call_target\n"
    "spp_stack_call:\n"
    "	mov %rsp, %r9\n"
    "	mov %rdi, %rsp\n"
    "	call spp_stack_call_target\n"
    "spp_stack_call_ret:\n"
    "	ud2\n"
    "spp_stack_call_target:\n"
    "	mov %rsp, 40(%rsi)\n"
    "	pop %rdx\n"
    "	mov %r9, %rsp\n"
    "	mov %rdx, 32(%rsi)\n"
    "	ret\n"
    ".popsection\n");

/*
 * Code for a protected page, copied there by the host: read a qword at
 * (%rdi) and add %rsi; and a store to (%rdi) from code on the page.
 */
asm(".pushsection .rodata\n"
    ".globl spp_blob, spp_blob_store, spp_blob_store_after, spp_blob_end\n"
    "spp_blob:\n"
    "	mov (%rdi), %rax\n"
    "	add %rsi, %rax\n"
    "	ret\n"
    "spp_blob_store:\n"
    "	mov %rsi, (%rdi)\n"
    "spp_blob_store_after:\n"
    "	ret\n"
    "spp_blob_end:\n"
    ".popsection\n");

#define SPP_DECLARE(name) \
	void spp_op_##name(std::uint64_t, std::uint64_t); \
	extern const char spp_op_##name##_after[];
#define SPP_DECLARE_REP(name) \
	void spp_rep_##name(std::uint64_t, std::uint64_t); \
	extern const char spp_rep_##name##_insn[];

extern "C" {
SPP_DECLARE(mov1) SPP_DECLARE(mov2) SPP_DECLARE(mov4) SPP_DECLARE(mov8)
SPP_DECLARE(mov1_imm) SPP_DECLARE(mov8_imm) SPP_DECLARE(movnti)
SPP_DECLARE(movups) SPP_DECLARE(movdqa) SPP_DECLARE(setcc)
SPP_DECLARE(xchg1) SPP_DECLARE(xchg2) SPP_DECLARE(xchg8)
SPP_DECLARE(cmpxchg8) SPP_DECLARE(lock_cmpxchg8) SPP_DECLARE(lock_cmpxchg4)
SPP_DECLARE(lock_cmpxchg8b) SPP_DECLARE(lock_cmpxchg16b)
SPP_DECLARE(lock_add8) SPP_DECLARE(lock_xadd8) SPP_DECLARE(lock_xadd2)
SPP_DECLARE(lock_or8) SPP_DECLARE(lock_and1) SPP_DECLARE(lock_inc8)
SPP_DECLARE(lock_inc2) SPP_DECLARE(lock_bts8)
SPP_DECLARE(add4) SPP_DECLARE(sub8) SPP_DECLARE(inc4) SPP_DECLARE(not2)
SPP_DECLARE(neg8) SPP_DECLARE(shl8)
SPP_DECLARE_REP(movsq) SPP_DECLARE_REP(movsb) SPP_DECLARE_REP(stosq) SPP_DECLARE_REP(stosb)
void spp_stack_push(std::uint64_t, std::uint64_t);
void spp_stack_call(std::uint64_t, std::uint64_t);
extern const char spp_stack_push_after[], spp_stack_call_ret[], spp_stack_call_target[];
extern const char spp_blob[], spp_blob_store[], spp_blob_store_after[], spp_blob_end[];
}

/* One call the guest makes: fn(addr, io). */
struct Call {
	std::uint64_t fn;
	std::uint64_t addr;
	std::uint64_t io;	/* guest address of an Io */
};

static constexpr std::uint64_t max_calls = 120;

struct Batch {
	std::uint64_t n;
	Call calls[max_calls];
};

/* Make every call of the batch, sync, and wait for the next batch (n == 0: done). */
static void guest_call_loop(std::uint64_t batch_gva)
{
	auto *b = (volatile Batch *)batch_gva;

	for (;;) {
		std::uint64_t n = b->n;
		if (!n)
			return;
		for (std::uint64_t k = 0; k < n; k++) {
			auto fn = (void (*)(std::uint64_t, std::uint64_t))b->calls[k].fn;
			fn(b->calls[k].addr, b->calls[k].io);
		}
		GUEST_SYNC(n);
	}
}

struct InsnGuest {
	GuestVm g{vkt::kvm()};
	RegionId region;
	SubpageProtection &spp;
	std::uint64_t batch_gva = g.alloc_vaddr(sizeof(Batch));
	std::uint64_t io_gva = g.alloc_vaddr(max_calls * sizeof(Io));
	Vcpu *vcpu = nullptr;
	std::vector<SppViolation> seen;

	explicit InsnGuest(bool dirty_log = false)
		: region(g.memory().add(spp_gpa, spp_pages * 4096,
					{.dirty_log = dirty_log, .name = "spp"})),
		  spp(SubpageProtection::enable(g.vm()))
	{
		g.identity_map(spp_gpa, spp_pages * 4096);
		spp.set_access(prot_page / 4096, {prot_map});
		spp.on_violation([this](Vcpu &, const SppViolation &v) {
			seen.push_back(v);
			return SppDecision::drop;
		});
		vcpu = &g.add_vcpu(guest_call_loop, batch_gva);
	}

	/* Run the calls with the given Io inputs; returns the Ios afterwards. */
	std::vector<Io> run(const std::vector<Call> &calls, const std::vector<Io> &ios)
	{
		TEST_ASSERT(calls.size() == ios.size() && calls.size() <= max_calls);
		static Batch batch;
		batch.n = calls.size();
		for (std::size_t k = 0; k < calls.size(); k++) {
			batch.calls[k] = calls[k];
			batch.calls[k].io = io_gva + k * sizeof(Io);
		}
		g.write_gva(io_gva, ios.data(), ios.size() * sizeof(Io));
		g.write_gva(batch_gva, &batch, sizeof(batch));
		seen.clear();
		Ucall uc = g.run(*vcpu);
		TEST_ASSERT(uc.kind == Ucall::Kind::sync && uc.args.size() == 1 &&
			    uc.args[0] == calls.size());
		std::vector<Io> out(ios.size());
		g.read_gva(io_gva, out.data(), out.size() * sizeof(Io));
		return out;
	}

	void finish()
	{
		static Batch batch;
		batch.n = 0;
		g.write_gva(batch_gva, &batch, sizeof(batch.n));
		g.run_to_done(*vcpu);
	}

	std::vector<std::uint8_t> read(std::uint64_t gpa, std::uint64_t n)
	{
		std::vector<std::uint8_t> v(n);
		g.memory().read(gpa, std::as_writable_bytes(std::span(v)));
		return v;
	}

	void write(std::uint64_t gpa, const std::vector<std::uint8_t> &v)
	{
		g.memory().write(gpa, std::as_bytes(std::span(v)));
	}
};

static std::uint64_t load64(const std::vector<std::uint8_t> &v, std::size_t off)
{
	std::uint64_t x;
	std::memcpy(&x, &v[off], 8);
	return x;
}

/* An instruction with its inputs; it writes `size` bytes at the target. */
struct Op {
	const char *name;
	void (*fn)(std::uint64_t, std::uint64_t);
	const char *after;
	std::uint32_t size;
	/*
	 * Io inputs, given the 32-byte window the instruction works on (its
	 * target at offset 16).
	 */
	Io (*inputs)(const std::vector<std::uint8_t> &window);
};

static constexpr std::uint64_t slot = 64;	/* bytes of memory per op and target */
static constexpr std::uint64_t window = 32;	/* checked bytes, target at +16 */

static std::vector<std::uint8_t> initial_window(std::size_t j)
{
	std::vector<std::uint8_t> w(window);
	for (std::size_t k = 0; k < window; k++)
		w[k] = static_cast<std::uint8_t>(0x11 + 29 * j + 13 * k + (k * k >> 3));
	return w;
}

static Io io_of(std::uint64_t rax, std::uint64_t rdx = 0, std::uint64_t rbx = 0,
		std::uint64_t rcx = 0)
{
	Io io{};
	io.in[0] = rax;
	io.in[1] = rdx;
	io.in[2] = rbx;
	io.in[3] = rcx;
	return io;
}

static constexpr std::uint64_t k1 = 0x8877665544332211ull, k2 = 0x0123456789abcdefull;

#define OP(n, sz, in) {#n, spp_op_##n, spp_op_##n##_after, sz, in}
#define IN(...) [](const std::vector<std::uint8_t> &w) { (void)w; return io_of(__VA_ARGS__); }

static const Op store_ops[] = {
	OP(mov1, 1, IN(k1)),
	OP(mov2, 2, IN(k1)),
	OP(mov4, 4, IN(k1)),
	OP(mov8, 8, IN(k1)),
	OP(mov1_imm, 1, IN(0)),
	OP(mov8_imm, 8, IN(0)),
	OP(movnti, 8, IN(k2)),
	OP(movups, 16, IN(k1, k2)),
	OP(movdqa, 16, IN(k2, k1)),
	OP(setcc, 1, IN(5, 5)),		/* sete: 1 */
	OP(setcc, 1, IN(5, 6)),		/* sete: 0 */
	OP(xchg1, 1, IN(k1)),
	OP(xchg2, 2, IN(k2)),
	OP(xchg8, 8, IN(k1)),
};

static const Op rmw_ops[] = {
	/* cmpxchg: success (rax == memory) and failure. */
	OP(cmpxchg8, 8, IN(load64(w, 16), k1)),
	OP(cmpxchg8, 8, IN(load64(w, 16) + 1, k1)),
	OP(lock_cmpxchg8, 8, IN(load64(w, 16), k2)),
	OP(lock_cmpxchg8, 8, IN(~load64(w, 16), k2)),
	OP(lock_cmpxchg4, 4, IN(load64(w, 16) & 0xffffffff, k1)),
	OP(lock_cmpxchg4, 4, IN(0, k1)),
	/* cmpxchg8b: edx:eax against memory, ecx:ebx stored. */
	OP(lock_cmpxchg8b, 8, IN(load64(w, 16) & 0xffffffff, load64(w, 16) >> 32, k1, k2)),
	OP(lock_cmpxchg8b, 8, IN(load64(w, 16) & 0xffffffff, 0, k1, k2)),
	OP(lock_add8, 8, IN(k1)),
	OP(lock_xadd8, 8, IN(k2)),
	OP(lock_xadd2, 2, IN(0x7fff)),
	OP(lock_or8, 8, IN(k1)),
	OP(lock_and1, 1, IN(0x5a)),
	OP(lock_inc8, 8, IN(0)),
	OP(lock_inc2, 2, IN(0)),
	OP(lock_bts8, 8, IN(37)),
	OP(lock_bts8, 8, IN(2)),
	OP(add4, 4, IN(k2)),
	OP(sub8, 8, IN(k1)),
	OP(inc4, 4, IN(0)),
	OP(not2, 2, IN(0)),
	OP(neg8, 8, IN(0)),
	OP(shl8, 8, IN(0)),
};

static std::uint64_t ref_target(std::size_t j) { return ref_page + j * slot + 16; }
static std::uint64_t allowed_target(std::size_t j) { return prot_page + j * slot + 16; }
static std::uint64_t denied_target(std::size_t j) { return prot_page + denied_half + j * slot + 16; }

/*
 * Run each op on the reference page, a writable and a protected sub-page,
 * in that order, and compare.
 */
static void check_ops(std::span<const Op> ops)
{
	TEST_ASSERT(ops.size() <= denied_half / slot);
	InsnGuest t;
	/* Background everywhere, then each op's window at its three targets. */
	std::vector<std::uint8_t> bg(spp_pages * 4096);
	for (std::size_t k = 0; k < bg.size(); k++)
		bg[k] = static_cast<std::uint8_t>(k * 7 + 3);
	t.write(spp_gpa, bg);
	std::vector<Call> calls;
	std::vector<Io> ios;
	for (std::size_t j = 0; j < ops.size(); j++) {
		auto w = initial_window(j);
		Io io = ops[j].inputs(w);
		for (std::uint64_t target : {ref_target(j), allowed_target(j), denied_target(j)}) {
			t.write(target - 16, w);
			calls.push_back({(std::uint64_t)ops[j].fn, target, 0});
			ios.push_back(io);
		}
	}
	std::vector<std::uint8_t> prot_before = t.read(prot_page, 4096);
	SppStats before = t.spp.stats();
	std::vector<Io> out = t.run(calls, ios);
	SppStats after = t.spp.stats();

	std::vector<std::uint8_t> prot_want = prot_before;
	std::size_t vi = 0;
	for (std::size_t j = 0; j < ops.size(); j++) {
		const Op &op = ops[j];
		const std::string opname = vkt::format("%s (op %zu)", op.name, j);
		const char *name = opname.c_str();
		const Io &ref = out[3 * j], &allowed = out[3 * j + 1], &denied = out[3 * j + 2];
		auto w0 = initial_window(j);
		auto wr = t.read(ref_target(j) - 16, window);
		/* The reference did write (else the comparison proves nothing). */
		TEST_ASSERT(op.fn == spp_op_lock_cmpxchg8 || op.fn == spp_op_cmpxchg8 ||
				    op.fn == spp_op_lock_cmpxchg4 || op.fn == spp_op_lock_cmpxchg8b ||
				    op.fn == spp_op_lock_bts8 || op.fn == spp_op_setcc ||
				    op.fn == spp_op_lock_cmpxchg16b ||
				    wr != w0,
			    "%s: the reference run did not change memory", name);
		/* Only the op's own bytes change. */
		for (std::size_t k = 0; k < window; k++)
			TEST_ASSERT(k - 16 < op.size || wr[k] == w0[k],
				    "%s: the reference wrote byte %zu", name, k);

		for (int r = 0; r < 4; r++) {
			TEST_ASSERT(allowed.out[r] == ref.out[r],
				    "%s, writable sub-page: register %d is 0x%llx, reference 0x%llx",
				    name, r, (unsigned long long)allowed.out[r],
				    (unsigned long long)ref.out[r]);
			TEST_ASSERT(denied.out[r] == ref.out[r],
				    "%s, protected sub-page: register %d is 0x%llx, reference 0x%llx",
				    name, r, (unsigned long long)denied.out[r],
				    (unsigned long long)ref.out[r]);
		}
		TEST_ASSERT((allowed.flags & arith_flags) == (ref.flags & arith_flags),
			    "%s, writable sub-page: flags 0x%llx, reference 0x%llx", name,
			    (unsigned long long)allowed.flags, (unsigned long long)ref.flags);
		TEST_ASSERT((denied.flags & arith_flags) == (ref.flags & arith_flags),
			    "%s, protected sub-page: flags 0x%llx, reference 0x%llx", name,
			    (unsigned long long)denied.flags, (unsigned long long)ref.flags);

		/* Memory: the writable sub-page as the reference, the protected unchanged. */
		std::memcpy(&prot_want[allowed_target(j) - 16 - prot_page], wr.data(), window);

		/* Exactly one violation, for the protected target's run. */
		TEST_ASSERT(vi < t.seen.size(), "%s: write to a protected sub-page not reported",
			    name);
		const SppViolation &v = t.seen[vi++];
		const std::uint64_t d = denied_target(j);
		TEST_ASSERT(v.gpa == d && v.write_gpa == d && v.size == op.size &&
				    v.write_size == op.size,
			    "%s: reported gpa=0x%llx write_gpa=0x%llx size=%u write_size=%u, "
			    "want 0x%llx, %u",
			    name, (unsigned long long)v.gpa, (unsigned long long)v.write_gpa,
			    v.size, v.write_size, (unsigned long long)d, op.size);
		TEST_ASSERT(std::memcmp(v.data().data(), &wr[16], op.size) == 0,
			    "%s: reported data differ from what the reference wrote", name);
		TEST_ASSERT(v.rip == (std::uint64_t)op.after,
			    "%s: reported rip 0x%llx, want 0x%llx", name,
			    (unsigned long long)v.rip, (unsigned long long)op.after);
	}
	TEST_ASSERT(vi == t.seen.size(), "%zu violations for %zu protected runs", t.seen.size(), vi);

	auto prot_got = t.read(prot_page, 4096);
	for (std::size_t k = 0; k < 4096; k++)
		TEST_ASSERT(prot_got[k] == prot_want[k],
			    "protected page byte 0x%zx is 0x%02x, want 0x%02x (%s)", k, prot_got[k],
			    prot_want[k], k < denied_half ? "writable half" : "protected half");
	/* Nothing else in the region changed but the reference windows. */
	auto all = t.read(spp_gpa, spp_pages * 4096);
	for (std::size_t k = 0; k < all.size(); k++) {
		std::uint64_t gpa = spp_gpa + k;
		if (gpa >= prot_page && gpa < prot_page + 4096)
			continue;
		if (gpa >= ref_page && gpa < ref_page + ops.size() * slot)
			continue;
		TEST_ASSERT(all[k] == bg[k], "stray write at gpa 0x%llx", (unsigned long long)gpa);
	}
	TEST_ASSERT_EQ(after.violations - before.violations, ops.size());
	/*
	 * Every write the backend performed is counted: the writes to the
	 * writable sub-pages, and also the reference runs' writes where KVM
	 * hands the instruction to the VMM on any RAM (a lock cmpxchg16b that
	 * ends in an emulation failure: platform::guest_cmpxchg16b()).
	 */
	std::size_t ref_by_vmm = 0;
	if (std::any_of(ops.begin(), ops.end(),
			[](const Op &op) { return op.fn == spp_op_lock_cmpxchg16b; })) {
		const Probe &p = platform::guest_cmpxchg16b(vkt::kvm());
		TEST_REQUIRE(p.result != Probe::Result::unknown,
			     "the lock cmpxchg16b platform probe: " + p.describe());
		if (p.no())
			ref_by_vmm = std::count_if(ops.begin(), ops.end(), [](const Op &op) {
				return op.fn == spp_op_lock_cmpxchg16b;
			});
		vkt::diag("lock cmpxchg16b on guest RAM (probed): %s", p.describe().c_str());
	}
	TEST_ASSERT_EQ(after.allowed_writes - before.allowed_writes, ops.size() + ref_by_vmm);
	t.finish();
}

VK_TEST(spp_insn_stores)
{
	check_ops(store_ops);
}

VK_TEST(spp_insn_read_modify_write)
{
	check_ops(rmw_ops);
}

/*
 * lock cmpxchg16b, alone: on a writable sub-page of a protected page it must
 * work as on any memory; on a protected one, be blocked whole.
 */
static const Op cmpxchg16b_ops[] = {
	OP(lock_cmpxchg16b, 16, IN(load64(w, 16), load64(w, 24), k1, k2)),	/* succeeds */
	OP(lock_cmpxchg16b, 16, IN(load64(w, 16), 0, k1, k2)),		/* fails */
};

/* Run fn, naming an emulation failure as what it is. */
template <class Fn> static void expect_emulated(const char *what, Fn fn)
{
	try {
		fn();
	} catch (const GuestFailure &e) {
		vkt::fail(__FILE__, __LINE__,
			  vkt::format("%s: %s - KVM's emulator could not run the instruction on "
				      "a page whose writes trap", what, e.what()));
	}
}

/*
 * KVM's x86 emulator does not implement cmpxchg16b (em_cmpxchg8b() returns
 * X86EMUL_UNHANDLEABLE for 16 bytes): on a page that traps writes it reports
 * an emulation failure, and the user backend completes the instruction itself.
 */
VK_TEST(spp_insn_lock_cmpxchg16b)
{
	expect_emulated("lock cmpxchg16b", [] { check_ops(cmpxchg16b_ops); });
}

/*
 * The page after a page whose last sub-page is protected is not protected
 * itself, but traps writes (a store could straddle into it): lock cmpxchg16b
 * there must work as anywhere.
 */
VK_TEST(spp_insn_lock_cmpxchg16b_beside_protected_page)
{
	InsnGuest t;
	const std::uint64_t beside = prot_page + 4096 + 0x40;
	TEST_ASSERT(t.spp.get_access(beside / 4096, 1) ==
		    std::vector<std::uint32_t>{SubpageProtection::all_writable});
	for (const Op &op : cmpxchg16b_ops) {
		auto w = initial_window(0);
		t.write(ref_target(0) - 16, w);
		t.write(beside - 16, w);
		Io io = op.inputs(w);
		std::vector<Io> out;
		expect_emulated("lock cmpxchg16b beside a protected page", [&] {
			out = t.run({{(std::uint64_t)op.fn, ref_target(0), 0},
				     {(std::uint64_t)op.fn, beside, 0}},
				    {io, io});
		});
		TEST_ASSERT(t.read(beside - 16, window) == t.read(ref_target(0) - 16, window));
		for (int r = 0; r < 4; r++)
			TEST_ASSERT_EQ(out[1].out[r], out[0].out[r]);
		TEST_ASSERT_EQ(out[1].flags & arith_flags, out[0].flags & arith_flags);
		TEST_ASSERT(t.seen.empty());
	}
	t.finish();
}

/*
 * rep movs and rep stos of 64 bytes whose destination runs from a writable
 * sub-page into a protected one, or lies in the protected one: checked
 * element by element, the elements before the protected sub-page land, the
 * others are dropped and reported - the element KVM reports on its own, the
 * ones the library decides after it in runs of up to 64 bytes; the
 * instruction completes (rcx, rdi, rsi as on normal memory).
 */
VK_TEST(spp_insn_rep_string_per_element)
{
	struct RepOp {
		const char *name;
		void (*fn)(std::uint64_t, std::uint64_t);
		const char *insn;
		std::uint32_t elem;
		bool movs;
	};
	static const RepOp rep_ops[] = {
		{"rep movsq", spp_rep_movsq, spp_rep_movsq_insn, 8, true},
		{"rep movsb", spp_rep_movsb, spp_rep_movsb_insn, 1, true},
		{"rep stosq", spp_rep_stosq, spp_rep_stosq_insn, 8, false},
		{"rep stosb", spp_rep_stosb, spp_rep_stosb_insn, 1, false},
	};
	InsnGuest t;
	const std::uint64_t bytes = 64;
	const std::uint64_t src = spp_gpa + 5 * 4096 + 8; /* unprotected */
	std::vector<std::uint8_t> srcdata(bytes);
	for (std::size_t k = 0; k < bytes; k++)
		srcdata[k] = static_cast<std::uint8_t>(0xc0 + k);
	t.write(src, srcdata);
	const std::uint64_t fill = 0xf1e2d3c4b5a69788ull;

	/* 32 bytes land before sub-page 16, or none. */
	for (const std::uint64_t before : {32ull, 0ull}) {
		for (const RepOp &op : rep_ops) {
			const std::uint64_t ref_dst = ref_page + denied_half - before;
			const std::uint64_t dst = prot_page + denied_half - before;
			std::vector<std::uint8_t> bg(256);
			for (std::size_t k = 0; k < bg.size(); k++)
				bg[k] = static_cast<std::uint8_t>(k * 3 + 1);
			t.write(ref_dst - 64, bg);
			t.write(dst - 64, bg);
			std::vector<std::uint8_t> data = srcdata;
			if (!op.movs)
				for (std::size_t k = 0; k < bytes; k++)
					data[k] = static_cast<std::uint8_t>(fill >> (k % op.elem * 8));
			Io io = io_of(fill, src, bytes / op.elem);
			SppStats s0 = t.spp.stats();
			auto out = t.run({{(std::uint64_t)op.fn, ref_dst, 0}, {(std::uint64_t)op.fn, dst, 0}},
					 {io, io});
			SppStats s1 = t.spp.stats();

			/* Registers: the instruction completed on both. */
			for (const auto &[o, d] : {std::pair{out[0], ref_dst}, std::pair{out[1], dst}}) {
				TEST_ASSERT(o.out[0] == 0 && o.out[1] == d + bytes &&
						    (!op.movs || o.out[2] == src + bytes),
					    "%s at 0x%llx: rcx=%llu rdi=0x%llx rsi=0x%llx", op.name,
					    (unsigned long long)d, (unsigned long long)o.out[0],
					    (unsigned long long)o.out[1], (unsigned long long)o.out[2]);
			}
			/* Memory: the reference got everything; the protected page the first half. */
			std::vector<std::uint8_t> want_ref = bg, want = bg;
			std::memcpy(&want_ref[64], data.data(), bytes);
			std::memcpy(&want[64], data.data(), before);
			TEST_ASSERT(t.read(ref_dst - 64, bg.size()) == want_ref, "%s: reference memory",
				    op.name);
			auto got = t.read(dst - 64, bg.size());
			for (std::size_t k = 0; k < got.size(); k++)
				TEST_ASSERT(got[k] == want[k], "%s: byte at dst%+lld is 0x%02x, want 0x%02x",
					    op.name, (long long)k - 64, got[k], want[k]);

			/*
			 * The protected elements, in order: the first, which the
			 * library decides on its own when nothing before it reached
			 * the library (none landed before it, or virtkit.ko completed
			 * those), or in a run; then runs of up to
			 * SppViolation::max_write bytes.
			 */
			const std::uint64_t max = SppViolation::max_write;
			std::uint64_t at = before, n = 0;
			for (const SppViolation &v : t.seen) {
				const std::uint64_t a = dst + at;
				const std::uint64_t run = std::min(max, bytes - at);
				const bool ok_size = (v.size == run || (n == 0 && v.size == op.elem)) &&
						     v.write_size == v.size;
				TEST_ASSERT(v.gpa == a && v.write_gpa == a && ok_size,
					    "%s, %llu bytes before: violation %llu at 0x%llx/0x%llx size "
					    "%u, want 0x%llx size %llu",
					    op.name, (unsigned long long)before, (unsigned long long)n,
					    (unsigned long long)v.gpa, (unsigned long long)v.write_gpa,
					    v.size, (unsigned long long)a, (unsigned long long)run);
				TEST_ASSERT(std::memcmp(v.data().data(), &data[at], v.size) == 0,
					    "%s: violation %llu: wrong data", op.name,
					    (unsigned long long)n);
				/*
				 * The rep instruction, also for the last element: KVM's
				 * emulator leaves RIP on it with RCX now 0 and retires it
				 * when the guest re-executes it.
				 */
				std::uint64_t rip = (std::uint64_t)op.insn;
				TEST_ASSERT(v.rip == rip, "%s: violation %llu: rip 0x%llx, want 0x%llx",
					    op.name, (unsigned long long)n, (unsigned long long)v.rip,
					    (unsigned long long)rip);
				at += v.size;
				n++;
			}
			TEST_ASSERT(at == bytes, "%s, %llu bytes before: violations cover %llu of %llu "
				    "protected bytes", op.name, (unsigned long long)before,
				    (unsigned long long)(at - before), (unsigned long long)(bytes - before));
			TEST_ASSERT_EQ(s1.violations - s0.violations, n);
			TEST_ASSERT_EQ(s1.allowed_writes - s0.allowed_writes, before / op.elem);
		}
	}
	t.finish();
}

/*
 * push and call with the stack on a protected page: on a writable sub-page
 * the value or return address lands; on a protected one it does not, the
 * violation is reported, and the instruction otherwise completes (rsp moves;
 * call jumps), so the pop that follows reads the old memory.
 */
VK_TEST(spp_insn_push_and_call_on_protected_stack)
{
	InsnGuest t;
	const std::uint64_t value = 0x5eed5eed12345678ull;
	const std::uint64_t tops[] = {ref_page + 1024, prot_page + 1024,
				      prot_page + denied_half + 512};
	const std::uint64_t old[] = {0x1111111111111111ull, 0x2222222222222222ull,
				     0x3333333333333333ull};
	struct StackOp {
		const char *name;
		void (*fn)(std::uint64_t, std::uint64_t);
		std::uint64_t pushed;	/* what lands at rsp - 8 */
		std::uint64_t rip;	/* where the guest continues */
	} ops[] = {
		{"push", spp_stack_push, value, (std::uint64_t)spp_stack_push_after},
		{"call", spp_stack_call, (std::uint64_t)spp_stack_call_ret,
		 (std::uint64_t)spp_stack_call_target},
	};
	for (const StackOp &op : ops) {
		std::vector<Call> calls;
		for (int i = 0; i < 3; i++) {
			t.g.memory().write_obj(tops[i] - 16, ~0ull);
			t.g.memory().write_obj(tops[i] - 8, old[i]);
			t.g.memory().write_obj(tops[i], ~0ull);
			calls.push_back({(std::uint64_t)op.fn, tops[i], 0});
		}
		auto out = t.run(calls, {io_of(value), io_of(value), io_of(value)});
		for (int i = 0; i < 3; i++) {
			const bool denied = i == 2;
			const std::uint64_t want = denied ? old[i] : op.pushed;
			TEST_ASSERT(out[i].out[0] == want && out[i].out[1] == tops[i] - 8,
				    "%s with rsp=0x%llx: popped 0x%llx, rsp 0x%llx; want 0x%llx",
				    op.name, (unsigned long long)tops[i],
				    (unsigned long long)out[i].out[0],
				    (unsigned long long)out[i].out[1], (unsigned long long)want);
			TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(tops[i] - 8), want);
			TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(tops[i] - 16), ~0ull);
			TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(tops[i]), ~0ull);
		}
		TEST_ASSERT(t.seen.size() == 1, "%s: %zu violations", op.name, t.seen.size());
		const SppViolation &v = t.seen[0];
		TEST_ASSERT_EQ(v.gpa, tops[2] - 8);
		TEST_ASSERT_EQ(v.write_gpa, tops[2] - 8);
		TEST_ASSERT_EQ(v.size, 8u);
		std::uint64_t data;
		std::memcpy(&data, v.data().data(), 8);
		TEST_ASSERT_EQ(data, op.pushed);
		TEST_ASSERT(v.rip == op.rip, "%s: rip 0x%llx, want 0x%llx", op.name,
			    (unsigned long long)v.rip, (unsigned long long)op.rip);
	}
	t.finish();
}

/*
 * Dirty logging: allowed writes to a protected page are logged (the library
 * performs them), blocked ones are not, and harvesting the log does not lift
 * the protection.
 */
VK_TEST(spp_dirty_log_with_protection)
{
	InsnGuest t(true);
	const std::uint64_t allowed = prot_page + 0x100, denied = prot_page + denied_half + 0x100;
	const std::uint64_t plain = spp_gpa + 5 * 4096 + 0x40;
	const std::uint64_t prot_pfn = (prot_page - spp_gpa) / 4096, plain_pfn = 5;
	auto mov8 = (std::uint64_t)spp_op_mov8;
	auto dirty = [&] {
		DirtyBitmap bm = t.g.memory().dirty_log(t.region);
		std::vector<std::uint64_t> pages;
		for (std::uint64_t p = 0; p < bm.pages; p++)
			if (bm.test(p))
				pages.push_back(p);
		return pages;
	};
	using Pages = std::vector<std::uint64_t>;
	TEST_ASSERT(dirty().empty());

	/* An allowed write to the protected page, one to a plain page. */
	t.run({{mov8, allowed, 0}, {mov8, plain, 0}}, {io_of(1), io_of(2)});
	TEST_ASSERT(t.seen.empty());
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(allowed), 1u);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(plain), 2u);
	TEST_ASSERT(dirty() == (Pages{prot_pfn, plain_pfn}));
	TEST_ASSERT(dirty().empty());

	/* After harvesting: a blocked write is still blocked, and not logged. */
	const std::uint64_t denied_old = t.g.memory().read_obj<std::uint64_t>(denied);
	t.run({{mov8, denied, 0}}, {io_of(3)});
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	TEST_ASSERT_EQ(t.seen[0].gpa, denied);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(denied), denied_old);
	TEST_ASSERT(dirty().empty());
	TEST_ASSERT(t.spp.get_access(prot_page / 4096, 1) == std::vector<std::uint32_t>{prot_map});

	/* Both again, in one batch: only the allowed one lands and is logged. */
	t.run({{mov8, denied, 0}, {mov8, allowed, 0}}, {io_of(4), io_of(5)});
	TEST_ASSERT_EQ(t.seen.size(), 1u);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(denied), denied_old);
	TEST_ASSERT_EQ(t.g.memory().read_obj<std::uint64_t>(allowed), 5u);
	TEST_ASSERT(dirty() == (Pages{prot_pfn}));
	TEST_ASSERT_EQ(t.spp.stats().protected_pages, 1u);
	t.finish();
}

/* Read a protected page and run code that lives on it. */
static void guest_read_and_fetch(std::uint64_t code, std::uint64_t data, std::uint64_t bytes)
{
	auto read_plus = (std::uint64_t (*)(std::uint64_t, std::uint64_t))code;
	std::uint64_t sum = 0;
	for (std::uint64_t off = 0; off < bytes; off += 8) {
		sum += *(volatile std::uint64_t *)(data + off);
		sum += read_plus(data + off, off);
	}
	GUEST_SYNC(sum);
	/* Now code on a protected page stores into it. */
	auto store = (void (*)(std::uint64_t, std::uint64_t))(code + (spp_blob_store - spp_blob));
	store(data, 0xabcdef);
	GUEST_SYNC(0);
}

/*
 * Reads and instruction fetches from protected pages never exit: count
 * every MMIO exit (the counter runs before the SPP handler) and the writes
 * the SPP backend checked, while the guest reads two fully protected pages
 * and calls code copied onto one of them.
 */
VK_TEST(spp_reads_and_fetches_never_exit)
{
	GuestVm g(vkt::kvm());
	g.memory().add(spp_gpa, spp_pages * 4096, {.name = "spp"});
	g.identity_map(spp_gpa, spp_pages * 4096); /* executable */
	int mmio = 0;
	auto reg = g.vm().add_exit_handler(
		[&](Vcpu &, Exit &e) {
			mmio += std::holds_alternative<MmioExit>(e);
			return ExitAction::pass;
		},
		INT_MIN);
	auto &spp = SubpageProtection::enable(g.vm());
	std::vector<SppViolation> seen;
	spp.on_violation([&](Vcpu &, const SppViolation &v) {
		seen.push_back(v);
		return SppDecision::drop;
	});

	const std::uint64_t code = spp_gpa + 3 * 4096 + 0x200;
	const std::uint64_t data = spp_gpa + 3 * 4096 + 0x800, bytes = 4096 + 0x800;
	g.memory().write(code, std::as_bytes(std::span(spp_blob, spp_blob_end - spp_blob)));
	std::uint64_t want = 0;
	for (std::uint64_t off = 0; off < bytes; off += 8) {
		std::uint64_t x = 0x9e3779b97f4a7c15ull * (off + 1);
		g.memory().write_obj(data + off, x);
		want += 2 * x + off;
	}
	spp.set_access(spp_gfn + 3, {0u, 0u});

	Vcpu &v = g.add_vcpu(guest_read_and_fetch, code, data, bytes);
	TEST_ASSERT_EQ(g.run(v).args[0], want);
	TEST_ASSERT_EQ(mmio, 0);
	TEST_ASSERT_EQ(spp.stats().checked_writes, 0u);
	TEST_ASSERT(seen.empty());

	/* The counter does see a write: the store from the protected page. */
	TEST_ASSERT_EQ(g.run(v).args[0], 0u);
	TEST_ASSERT_EQ(mmio, 1);
	TEST_ASSERT_EQ(spp.stats().checked_writes, 1u);
	TEST_ASSERT_EQ(seen.size(), 1u);
	TEST_ASSERT_EQ(seen[0].gpa, data);
	TEST_ASSERT_EQ(seen[0].rip, code + (spp_blob_store_after - spp_blob));
	TEST_ASSERT_EQ(g.memory().read_obj<std::uint64_t>(data), 0x9e3779b97f4a7c15ull);
	g.run_to_done(v);
}
