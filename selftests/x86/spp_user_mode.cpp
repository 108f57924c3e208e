// SPDX-License-Identifier: MIT
/*
 * Sub-page protection under writers in user mode (CPL 3). KVM's emulator
 * refuses some instructions on a page whose writes trap (cmpxchg16b,
 * fxsave in 64-bit code) and the library completes them from the emulation
 * failure KVM reports. But KVM reports one only at CPL 0: at CPL 3 it
 * queues a #UD of its own and re-enters the guest (handle_emulation_failure),
 * so a user program would fault where the processor never faults. With
 * sub-page protection on, the library asks KVM to report emulation failures
 * at every CPL (KVM_CAP_EXIT_ON_EMULATION_FAILURE) and completes them as at
 * CPL 0.
 *
 * The user code is assembly copied onto a user page; it ends with INT3,
 * whose DPL 3 gate brings guest_catch() back at CPL 0.
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <cstring>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

extern "C" {
extern const char user_cmpxchg16b_start[], user_cmpxchg16b_end[];
extern const char user_fxsave64_start[], user_fxsave64_end[];
extern const char user_store_start[], user_store_end[];
}

/*
 * rdi: the target; rsi: the I/O block (user page): in [0..31] the
 * expected (rax:rdx) and desired (rbx:rcx) values, out [32..47] rax:rdx,
 * [48] ZF.
 */
asm(".pushsection .text, \"ax\"\n"
    "user_cmpxchg16b_start:\n"
    "	mov (%rsi), %rax\n"
    "	mov 8(%rsi), %rdx\n"
    "	mov 16(%rsi), %rbx\n"
    "	mov 24(%rsi), %rcx\n"
    "	lock cmpxchg16b (%rdi)\n"
    "	mov %rax, 32(%rsi)\n"
    "	mov %rdx, 40(%rsi)\n"
    "	setz 48(%rsi)\n"
    "	int3\n"
    "user_cmpxchg16b_end:\n"
    /* rdi: the target of fxsave64. */
    "user_fxsave64_start:\n"
    "	fxsave64 (%rdi)\n"
    "	int3\n"
    "user_fxsave64_end:\n"
    /* rsi: the I/O block; stores 1 at [56] and CS at [64] (the user-mode probe). */
    "user_store_start:\n"
    "	movq $1, 56(%rsi)\n"
    "	mov %cs, %eax\n"
    "	mov %rax, 64(%rsi)\n"
    "	int3\n"
    "user_store_end:\n"
    ".popsection");

namespace {

constexpr std::uint64_t page = 4096;
/* Sub-page 1 of the target page is protected, the other 31 writable. */
constexpr std::uint32_t map = ~(1u << 1);

struct UserRun {
	std::uint64_t rip, rsp, rdi, rsi;
};

void enter_user(void *p)
{
	auto *u = static_cast<UserRun *>(p);
	guest_enter_user(u->rip, u->rsp, u->rdi, u->rsi);
}

/* Run user code at rip; report what brought it back (vector + 1, 0 for none) and where. */
void guest_user(std::uint64_t rip, std::uint64_t rsp, std::uint64_t rdi, std::uint64_t rsi)
{
	UserRun u{rip, rsp, rdi, rsi};
	struct virtkit_exception ex = {};
	std::uint64_t r = guest_catch(enter_user, &u, &ex);
	GUEST_SYNC(r, ex.vector, ex.rip, ex.error_code);
}

struct UserGuest {
	GuestVm g{vkt::kvm()};
	SubpageProtection &spp;
	std::vector<SppViolation> seen;
	std::uint64_t code, stack, io, target, target_gpa;

	UserGuest() : spp(SubpageProtection::enable(g.vm()))
	{
		code = g.alloc_vaddr(page, {.writable = false, .user = true});
		stack = g.alloc_vaddr(page, {.user = true, .executable = false});
		io = g.alloc_vaddr(page, {.user = true, .executable = false});
		target = g.alloc_vaddr(page, {.user = true, .executable = false});
		target_gpa = *g.gva_to_gpa(target);
		std::vector<std::uint8_t> fill(page, 0xee);
		g.write_gva(target, fill.data(), page);
		spp.on_violation([this](Vcpu &, const SppViolation &v) {
			seen.push_back(v);
			return SppDecision::drop;
		});
	}

	void protect() { spp.set_access(target_gpa / page, {map}); }

	/* Copy [start, end) onto the code page and run it at CPL 3. */
	Ucall run_user(const char *start, const char *end, std::uint64_t rdi)
	{
		g.write_gva(code, start, static_cast<std::uint64_t>(end - start));
		if (!g.vcpu_count())
			return g.run(g.add_vcpu(guest_user, code, stack + page, rdi, io));
		g.set_entry(g.vcpu(0), guest_user, code, stack + page, rdi, io);
		return g.run(g.vcpu(0));
	}

	std::vector<std::uint8_t> read(std::uint64_t gva, std::size_t n)
	{
		std::vector<std::uint8_t> v(n);
		g.read_gva(gva, v.data(), n);
		return v;
	}

	/*
	 * The guest environment runs user code here: a store at CPL 3 and
	 * INT3 come back to guest_catch() as #BP (kvm_pvm, for one, has no
	 * guest user mode).
	 */
	void require_user_mode()
	{
		std::string why;
		try {
			Ucall uc = run_user(user_store_start, user_store_end, 0);
			std::uint64_t stored[2] = {};
			g.read_gva(io + 56, stored, sizeof(stored));
			if (uc.kind != Ucall::Kind::sync || uc.args.at(0) != BP_VECTOR + 1 ||
			    stored[0] != 1 || stored[1] != VIRTKIT_SEL_USER_CS)
				why = uc.describe() +
				      vkt::format(", stored %llu, CS 0x%llx",
						  (unsigned long long)stored[0],
						  (unsigned long long)stored[1]);
		} catch (const std::exception &e) {
			why = e.what();
		}
		TEST_REQUIRE(why.empty(), "a KVM that runs guest code at CPL 3 (probe: a store "
					  "and INT3 at CPL 3 ended with " + why + ")");
	}
};

/* The user code came back through its INT3, not through a fault. */
void expect_int3(const Ucall &uc, const char *what)
{
	TEST_ASSERT(uc.kind == Ucall::Kind::sync, "%s: %s", what, uc.describe().c_str());
	TEST_ASSERT(uc.args.at(0) == BP_VECTOR + 1,
		    "%s at CPL 3: vector %llu at rip 0x%llx (error code 0x%llx), not the INT3 "
		    "after it%s",
		    what, (unsigned long long)uc.args.at(1), (unsigned long long)uc.args.at(2),
		    (unsigned long long)uc.args.at(3),
		    uc.args.at(1) == UD_VECTOR ? " (KVM's #UD for an emulation failure at CPL > 0)"
					       : "");
}

void cmpxchg16b_test(std::uint64_t offset, bool blocked)
{
	UserGuest t;
	t.require_user_mode();
	t.protect();
	const std::uint64_t old_v[2] = {0xeeeeeeeeeeeeeeeeull, 0xeeeeeeeeeeeeeeeeull};
	const std::uint64_t new_v[2] = {0x1111222233334444ull, 0x5555666677778888ull};
	std::uint64_t in[4] = {old_v[0], old_v[1], new_v[0], new_v[1]};
	t.g.write_gva(t.io, in, sizeof(in));
	const SppStats before = t.spp.stats();
	Ucall uc = t.run_user(user_cmpxchg16b_start, user_cmpxchg16b_end, t.target + offset);
	expect_int3(uc, "lock cmpxchg16b");

	std::uint64_t out[3] = {};
	t.g.read_gva(t.io + 32, out, sizeof(out));
	TEST_ASSERT(out[0] == old_v[0] && out[1] == old_v[1] && (out[2] & 0xff) == 1,
		    "rdx:rax 0x%llx:0x%llx, ZF %llu: the compare must succeed",
		    (unsigned long long)out[1], (unsigned long long)out[0],
		    (unsigned long long)(out[2] & 0xff));
	std::uint64_t now[2];
	t.g.read_gva(t.target + offset, now, sizeof(now));
	const std::uint64_t *want = blocked ? old_v : new_v;
	TEST_ASSERT(now[0] == want[0] && now[1] == want[1], "memory 0x%llx:0x%llx, want 0x%llx:0x%llx",
		    (unsigned long long)now[1], (unsigned long long)now[0],
		    (unsigned long long)want[1], (unsigned long long)want[0]);
	TEST_ASSERT_EQ(t.seen.size(), blocked ? 1u : 0u);
	if (blocked) {
		const SppViolation &v = t.seen[0];
		TEST_ASSERT(v.gpa == t.target_gpa + offset && v.write_gpa == v.gpa && v.size == 16,
			    "violation gpa 0x%llx write_gpa 0x%llx size %u",
			    (unsigned long long)v.gpa, (unsigned long long)v.write_gpa, v.size);
	} else {
		TEST_ASSERT(t.spp.stats().allowed_writes > before.allowed_writes,
			    "the library did not complete the write (allowed_writes unchanged)");
	}
}

} // namespace

VK_TEST(spp_user_mode_cmpxchg16b_on_a_writable_sub_page_completes)
{
	cmpxchg16b_test(0x100, false);
}

VK_TEST(spp_user_mode_cmpxchg16b_on_a_protected_sub_page_is_reported)
{
	cmpxchg16b_test(0x80, true);
}

/*
 * fxsave64 at CPL 3 onto sub-pages 4..7 of the trapping page: stored whole
 * (a vCPU's state after reset: FCW 0x37f, MXCSR 0x1f80), the protected
 * sub-page 1 untouched.
 */
VK_TEST(spp_user_mode_fxsave64_on_writable_sub_pages_completes)
{
	UserGuest t;
	t.require_user_mode();
	t.protect();
	Ucall uc = t.run_user(user_fxsave64_start, user_fxsave64_end, t.target + 0x200);
	expect_int3(uc, "fxsave64");
	auto image = t.read(t.target + 0x200, 512);
	std::uint16_t fcw;
	std::uint32_t mxcsr;
	std::memcpy(&fcw, &image[0], 2);
	std::memcpy(&mxcsr, &image[24], 4);
	TEST_ASSERT(fcw == 0x37f && (mxcsr & 0xffbf) == 0x1f80,
		    "fxsave64 image: FCW 0x%x MXCSR 0x%x, want 0x37f 0x1f80", fcw, mxcsr);
	TEST_ASSERT(t.read(t.target + 0x80, 128) == std::vector<std::uint8_t>(128, 0xee),
		    "the protected sub-page changed");
	TEST_ASSERT_EQ(t.seen.size(), 0u);
}
