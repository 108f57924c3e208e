// SPDX-License-Identifier: MIT
/*
 * The platform probes that run a tiny 64-bit guest of a few instruction
 * bytes (<virtkit/x86/guest_probes.hpp>), each once per process in an
 * x86::GuestVm of its own.
 */
#include <virtkit/x86/guest_probes.hpp>

#include <cpuid.h>

#include <cstdint>
#include <fstream>
#include <span>
#include <string>

#include <virtkit/error.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include "core/ioctl.hpp"
#include "core/probe.hpp"

namespace virtkit::platform {

namespace {

using namespace probe;
using x86::GuestVm;

constexpr std::uint64_t MiB = 1ull << 20;
constexpr std::uint64_t bp_vector = 3;
/* Guest-physical and guest-virtual places GuestVm does not use. */
constexpr std::uint64_t probe_gpa = 2ull << 30;
constexpr std::uint64_t probe_gva = 0x520000000000ull;

/* A GuestVm with the code at a fresh executable page and one vCPU starting there. */
struct Tiny {
	GuestVm g;
	Vcpu *v;

	Tiny(const System &sys, std::span<const std::uint8_t> code)
		: g(sys, {.memory_size = 16 * MiB})
	{
		const std::uint64_t at = g.alloc_vaddr(4096);
		g.write_gva(at, code.data(), code.size());
		v = &g.add_vcpu_raw(at, {});
	}

	/* Move the stack onto a read-only page: KVM cannot push a frame there. */
	void stack_on_readonly_page()
	{
		g.memory().add(probe_gpa, 4096, {.readonly = true, .name = "delivery probe"});
		g.map(probe_gva, probe_gpa, 4096);
		auto r = v->regs();
		r.rsp = probe_gva + 4096;
		v->set_regs(r);
	}
};

Probe probe_int3(const System &sys)
{
	static const std::uint8_t code[] = {0xcc, 0xf4}; /* int3; hlt */
	Tiny t(sys, code);
	Exit e = run_bounded(*t.v);
	if (auto uc = t.g.ucall(*t.v, e); uc && uc->kind == x86::Ucall::Kind::unhandled_exception &&
					      !uc->args.empty() && uc->args[0] == bp_vector)
		return yes("INT3 in a 64-bit guest raised #BP in the guest");
	if (std::holds_alternative<InternalErrorExit>(e))
		return no("INT3 in a 64-bit guest ended in " + internal_error(e) +
			  " instead of raising #BP in the guest");
	return no("INT3 in a 64-bit guest: " + describe(e) + " instead of #BP in the guest");
}

Probe probe_xgetbv(const System &sys)
{
	/* xor %ecx,%ecx; xgetbv; hlt */
	static const std::uint8_t code[] = {0x31, 0xc9, 0x0f, 0x01, 0xd0, 0xf4};
	Tiny t(sys, code);
	bool xsave = false;
	for (auto &e : t.v->cpuid())
		if (e.function == 1)
			xsave = e.ecx >> 26 & 1;
	if (!xsave)
		return unknown("the vCPU's CPUID (KVM_GET_CPUID2) has no XSAVE (1:ECX[26])");
	auto s = t.v->sregs();
	s.cr4 |= 1ull << 18; /* OSXSAVE */
	t.v->set_sregs(s);
	Exit e = run_bounded(*t.v);
	if (std::holds_alternative<HltExit>(e)) {
		const std::uint64_t xcr0 = t.v->regs().rax;
		if (xcr0 & 1)
			return yes("XGETBV in a 64-bit guest returned XCR0 " + detail::hex(xcr0));
		return no("XGETBV in a 64-bit guest returned " + detail::hex(xcr0) +
			  " (XCR0 bit 0 is always set)");
	}
	if (std::holds_alternative<InternalErrorExit>(e))
		return no("XGETBV in a 64-bit guest ended in " + internal_error(e));
	return no("XGETBV in a 64-bit guest: " + describe(e));
}

std::uint64_t free_huge_pages()
{
	std::ifstream f("/proc/meminfo");
	std::string key;
	std::uint64_t n;
	while (f >> key >> n) {
		if (key == "HugePages_Free:")
			return n;
		f.ignore(256, '\n');
	}
	return 0;
}

Probe probe_large(const System &sys)
{
	constexpr std::uint64_t size = 4 * MiB;
	if (free_huge_pages() < size / (2 * MiB))
		return unknown("needs " + std::to_string(size / (2 * MiB)) +
			       " free 2 MiB huge pages (/proc/sys/vm/nr_hugepages), " +
			       std::to_string(free_huge_pages()) + " free");
	/* 1: movb $1,(%rdi); add $4096,%rdi; dec %ecx; jnz 1b; hlt */
	static const std::uint8_t code[] = {0xc6, 0x07, 0x01, 0x48, 0x81, 0xc7, 0x00, 0x10, 0x00,
					    0x00, 0xff, 0xc9, 0x75, 0xf2, 0xf4};
	Tiny t(sys, code);
	t.g.memory().add(probe_gpa, size, {.name = "large-mapping probe", .huge_pages = true});
	t.g.map(probe_gva, probe_gpa, size, {}, x86::PageSize::m2);
	auto before = vm_stat(t.g.vm(), "pages_2m");
	if (!before)
		return unknown("KVM has no VM statistic pages_2m (KVM_GET_STATS_FD)");
	auto r = t.v->regs();
	r.rdi = probe_gva;
	r.rcx = size / 4096;
	t.v->set_regs(r);
	Exit e = run_bounded(*t.v);
	if (!std::holds_alternative<HltExit>(e))
		return unknown("the guest touching a 2 MiB-backed region: " + describe(e));
	const std::uint64_t after = *vm_stat(t.g.vm(), "pages_2m");
	const std::string d = "a guest touching 4 MiB backed by 2 MiB huge pages: KVM's pages_2m " +
			      std::to_string(*before) + " -> " + std::to_string(after);
	return after > *before ? yes(d) : no(d + " (KVM never mapped a 2 MiB page)");
}

Probe probe_cmpxchg16b(const System &sys)
{
	/* movb %al,(%rdi); lock cmpxchg16b (%rdi); hlt */
	static const std::uint8_t code[] = {0x88, 0x07, 0xf0, 0x48, 0x0f, 0xc7, 0x0f, 0xf4};
	Tiny t(sys, code);
	const std::uint64_t at = t.g.alloc_vaddr(4096);
	auto r = t.v->regs();
	r.rdi = at + 16;
	r.rax = r.rdx = 0; /* the memory: the compare succeeds, rcx:rbx is written */
	r.rbx = 0x1111111111111111ull;
	r.rcx = 0x2222222222222222ull;
	t.v->set_regs(r);
	Exit e = run_bounded(*t.v);
	if (std::holds_alternative<HltExit>(e)) {
		std::uint64_t got[2];
		t.g.read_gva(at + 16, got, sizeof(got));
		if (got[0] == r.rbx && got[1] == r.rcx)
			return yes("lock cmpxchg16b on guest RAM ran in the guest");
		return no("lock cmpxchg16b on guest RAM completed without writing rcx:rbx");
	}
	if (std::holds_alternative<InternalErrorExit>(e))
		return no("lock cmpxchg16b on guest RAM ended in " + internal_error(e));
	return no("lock cmpxchg16b on guest RAM: " + describe(e));
}

/* SVM's exit information in emulation-failure data (AuthenticAMD, HygonGenuine). */
bool host_has_svm_exit_info()
{
	unsigned a, b, c, d;
	__cpuid(0, a, b, c, d);
	return (b == 0x68747541 && c == 0x444d4163 && d == 0x69746e65) ||
	       (b == 0x6f677948 && c == 0x656e6975 && d == 0x6e65476e);
}

Probe probe_delivery(const System &sys)
{
	/* ud2, with the stack on a read-only page: KVM cannot push the #UD frame. */
	static const std::uint8_t code[] = {0x0f, 0x0b};
	Tiny t(sys, code);
	t.stack_on_readonly_page();
	Exit e = run_bounded(*t.v);
	const std::string what = "a #UD whose frame lands on a read-only memslot";
	if (auto *ie = std::get_if<InternalErrorExit>(&e)) {
		if (ie->suberror == KVM_INTERNAL_ERROR_DELIVERY_EV)
			return yes(what + " ends in KVM_INTERNAL_ERROR_DELIVERY_EV with the event queued");
		const std::size_t info =
			!ie->data.empty() && (ie->data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
				? 3
				: 1;
		const std::size_t at = info + (host_has_svm_exit_info() ? 3 : 2);
		if (ie->suberror == KVM_INTERNAL_ERROR_EMULATION && ie->data.size() > at &&
		    (ie->data[at] >> 31 & 1) && (ie->data[at] & 0xff) == 6)
			return yes(what + " ends in an emulation failure that names the event (" +
				   (host_has_svm_exit_info() ? "EXITINTINFO" : "IDT-vectoring info") + ")");
		return no(what + " ends in " + internal_error(e) + ", which does not name the event");
	}
	return no(what + ": " + describe(e) + " (KVM does not report the event it failed to deliver)");
}

Probe probe_queued_delivery(const System &sys)
{
	/* mov %eax,%ds with a selector past the GDT: #GP(0xfff8), which KVM can emulate. */
	static const std::uint8_t code[] = {0x8e, 0xd8};
	Tiny t(sys, code);
	t.stack_on_readonly_page();
	auto r = t.v->regs();
	r.rax = 0xfff8;
	t.v->set_regs(r);
	Exit e = run_bounded(*t.v);
	const std::string what = "a #GP (from an instruction KVM emulates) whose frame lands on a "
				 "read-only memslot";
	if (auto *ie = std::get_if<InternalErrorExit>(&e); ie && ie->suberror == KVM_INTERNAL_ERROR_DELIVERY_EV)
		return yes(what + " ends in KVM_INTERNAL_ERROR_DELIVERY_EV");
	const kvm_vcpu_events ev = t.v->events();
	if (std::holds_alternative<InterruptedExit>(e) && (ev.exception.injected || ev.exception.pending) &&
	    ev.exception.nr == 13)
		return yes(what + " stays queued while KVM re-runs the instruction (a kick finds it)");
	return no(what + ": " + describe(e) + ", exception " +
		  (ev.exception.injected || ev.exception.pending ? "queued" : "not queued") +
		  " (KVM keeps no trace of the event)");
}

} // namespace

const Probe &failed_delivery_queued(const System &sys)
{
	return once<probe_queued_delivery>("queued event delivery", sys);
}

const Probe &failed_delivery_reported(const System &sys)
{
	return once<probe_delivery>("event delivery", sys);
}

const Probe &guest_int3(const System &sys)
{
	return once<probe_int3>("INT3", sys);
}

const Probe &guest_xgetbv(const System &sys)
{
	return once<probe_xgetbv>("XGETBV", sys);
}

const Probe &large_mappings(const System &sys)
{
	return once<probe_large>("large-mapping", sys);
}

const Probe &guest_cmpxchg16b(const System &sys)
{
	return once<probe_cmpxchg16b>("cmpxchg16b", sys);
}

} // namespace virtkit::platform
