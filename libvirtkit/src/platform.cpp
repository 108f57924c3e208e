// SPDX-License-Identifier: MIT
/*
 * The platform probes (virtkit/platform.hpp): each one a tiny 64-bit guest
 * of a few instruction bytes, run once per process in an x86::GuestVm of
 * its own.
 */
#include <virtkit/platform.hpp>

#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include <virtkit/error.hpp>
#include <virtkit/exit.hpp>
#include <virtkit/system.hpp>
#include <virtkit/vcpu.hpp>
#include <virtkit/vm.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include "ioctl.hpp"

namespace virtkit {

std::string Probe::describe() const
{
	const char *r = result == Result::yes ? "yes" : result == Result::no ? "no" : "unknown";
	return detail.empty() ? r : std::string(r) + ": " + detail;
}

namespace platform {

namespace {

using x86::GuestVm;

constexpr std::uint64_t MiB = 1ull << 20;
constexpr std::uint64_t bp_vector = 3;
/* Guest-physical and guest-virtual places GuestVm does not use. */
constexpr std::uint64_t probe_gpa = 2ull << 30;
constexpr std::uint64_t probe_gva = 0x520000000000ull;

Probe yes(std::string d)
{
	return {Probe::Result::yes, std::move(d)};
}
Probe no(std::string d)
{
	return {Probe::Result::no, std::move(d)};
}
Probe unknown(std::string d)
{
	return {Probe::Result::unknown, std::move(d)};
}

/*
 * One KVM_RUN, kicked after two seconds (a guest that loops instead of
 * exiting is a finding, not a hang).
 */
Exit run_bounded(Vcpu &v)
{
	std::mutex mu;
	std::condition_variable cv;
	bool done = false;
	std::thread watchdog([&] {
		std::unique_lock lock(mu);
		if (!cv.wait_for(lock, std::chrono::seconds(2), [&] { return done; }))
			v.kick();
	});
	struct Stop {
		std::mutex &mu;
		std::condition_variable &cv;
		bool &done;
		std::thread &t;
		~Stop()
		{
			{
				std::lock_guard lock(mu);
				done = true;
			}
			cv.notify_all();
			t.join();
		}
	} stop{mu, cv, done, watchdog};
	return v.run();
}

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
};

std::string internal_error(const Exit &e)
{
	auto *ie = std::get_if<InternalErrorExit>(&e);
	return "KVM_EXIT_INTERNAL_ERROR (suberror " + std::to_string(ie->suberror) +
	       (ie->suberror == KVM_INTERNAL_ERROR_EMULATION ? ": emulation failure)" : ")");
}

/* Run probe, turning anything it throws into unknown. */
Probe guarded(const char *what, const std::function<Probe()> &probe)
{
	try {
		return probe();
	} catch (const std::exception &e) {
		return unknown(std::string("the ") + what + " probe could not run: " + e.what());
	}
}

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

/*
 * A real-mode guest with KVM_GUESTDBG_USE_SW_BP: INT3 at 0x100, and a #BP
 * handler (IVT entry 3) that halts. Intercepted: KVM_EXIT_DEBUG. Not
 * intercepted: HLT (the guest took #BP). Anything else: no.
 */
Probe probe_debug_int3(const System &sys)
{
	if (!sys.has(KVM_CAP_SET_GUEST_DEBUG))
		return no("KVM has no KVM_CAP_SET_GUEST_DEBUG");
	Vm vm = sys.create_vm();
	vm.memory().add(0, 0x1000, {.name = "int3 probe"});
	const std::uint8_t code[] = {0xcc, 0xf4};	/* int3; hlt */
	const std::uint16_t ivt3[] = {0x200, 0};	/* offset, segment */
	const std::uint8_t handler[] = {0xf4};		/* hlt */
	vm.memory().write(0x100, std::as_bytes(std::span(code)));
	vm.memory().write(4 * bp_vector, std::as_bytes(std::span(ivt3)));
	vm.memory().write(0x200, std::as_bytes(std::span(handler)));
	Vcpu v = vm.create_vcpu(0);
	auto s = v.sregs();
	s.cs.base = 0;
	s.cs.selector = 0;
	v.set_sregs(s);
	kvm_regs r{};
	r.rip = 0x100;
	r.rsp = 0xf00;
	r.rflags = 2;
	v.set_regs(r);
	kvm_guest_debug d{};
	d.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
	v.set_guest_debug(d);
	Exit e = run_bounded(v);
	if (auto *dbg = std::get_if<DebugExit>(&e); dbg && dbg->exception == bp_vector)
		return yes("with KVM_GUESTDBG_USE_SW_BP an INT3 in a guest exits to the VMM "
			   "(KVM_EXIT_DEBUG)");
	if (std::holds_alternative<HltExit>(e))
		return no("with KVM_GUESTDBG_USE_SW_BP an INT3 in a guest raised #BP in the guest "
			  "instead of exiting to the VMM");
	if (std::holds_alternative<InternalErrorExit>(e))
		return no("with KVM_GUESTDBG_USE_SW_BP an INT3 in a guest ended in " +
			  internal_error(e));
	return no("with KVM_GUESTDBG_USE_SW_BP an INT3 in a guest: " + describe(e));
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

/* A probe's answer, found once per process. */
template <Probe (*probe)(const System &)>
const Probe &once(const char *what, const System &sys)
{
	static std::once_flag flag;
	static Probe result;
	std::call_once(flag, [&] { result = guarded(what, [&] { return probe(sys); }); });
	return result;
}

} // namespace

const Probe &guest_int3(const System &sys)
{
	return once<probe_int3>("INT3", sys);
}

const Probe &guest_debug_int3(const System &sys)
{
	return once<probe_debug_int3>("guest-debug INT3", sys);
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

bool tdp_enabled()
{
	for (const char *p : {"/sys/module/kvm_amd/parameters/npt",
			      "/sys/module/kvm_intel/parameters/ept"}) {
		std::ifstream f(p);
		char c;
		if (f >> c)
			return c == 'Y' || c == 'y' || c == '1';
	}
	return false;
}

/*
 * KVM_GET_STATS_FD (Documentation/virt/kvm/api.rst 4.133): a header, then
 * num_desc descriptors of sizeof(kvm_stats_desc) + name_size bytes each,
 * then the data, u64 each, at data_offset + desc->offset.
 */
std::optional<std::uint64_t> vm_stat(const Vm &vm, std::string_view name)
{
	if (vm.check_extension(KVM_CAP_BINARY_STATS_FD) <= 0)
		return std::nullopt;
	const int fd = ::ioctl(vm.fd(), KVM_GET_STATS_FD, nullptr);
	if (fd < 0)
		return std::nullopt;
	struct Closer {
		int fd;
		~Closer() { ::close(fd); }
	} closer{fd};

	kvm_stats_header h;
	if (::pread(fd, &h, sizeof(h), 0) != static_cast<ssize_t>(sizeof(h)))
		return std::nullopt;
	constexpr std::size_t head = offsetof(kvm_stats_desc, name);
	const std::size_t desc_size = head + h.name_size;
	std::vector<char> descs(desc_size * h.num_desc);
	if (::pread(fd, descs.data(), descs.size(), h.desc_offset) !=
	    static_cast<ssize_t>(descs.size()))
		return std::nullopt;
	for (std::uint32_t i = 0; i < h.num_desc; i++) {
		const char *d = descs.data() + i * desc_size;
		if (strnlen(d + head, h.name_size) != name.size() ||
		    std::memcmp(d + head, name.data(), name.size()) != 0)
			continue;
		std::uint32_t offset;
		std::memcpy(&offset, d + offsetof(kvm_stats_desc, offset), sizeof(offset));
		std::uint64_t v;
		if (::pread(fd, &v, sizeof(v), h.data_offset + offset) != static_cast<ssize_t>(sizeof(v)))
			return std::nullopt;
		return v;
	}
	return std::nullopt;
}

} // namespace platform

} // namespace virtkit
