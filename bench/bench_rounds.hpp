// SPDX-License-Identifier: MIT
/*
 * The fair comparison every benchmark case makes: a baseline that issues raw
 * KVM ioctls on fds it opened itself (no libvirtkit in its loop) and the
 * subject (libvirtkit) run the SAME guest machine code, alternately, for
 * `rounds` rounds of n operations each; we print the median and the min-max
 * spread of both, and the ratio of the medians. Alternating rounds spread
 * the host's noise (other jobs on a shared 2-CPU machine) over both sides
 * instead of charging a burst to one of them.
 *
 * The guest code is a few hand-assembled 64-bit instructions (blob_*),
 * placed at code_gpa in both VMs, whose vCPUs are set up identically by
 * setup_long_mode(): 4-level paging identity-mapping the first 1 GiB in
 * 2 MiB pages, tables at 0x2000-0x4fff.
 *
 * Goals: goal() prints one "goal:" line per goal; `make run-bench` collects
 * them from every benchmark into one table at the end.
 */
#pragma once

#include "bench_util.hpp"

#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace rounds {

static constexpr std::uint64_t ram_gpa = 0, ram_size = 0x10000;
static constexpr std::uint64_t code_gpa = 0x1000;
static constexpr std::uint64_t pml4_gpa = 0x2000, pdpt_gpa = 0x3000, pd_gpa = 0x4000;
/* The page the write loops write to: a memslot of its own. */
static constexpr std::uint64_t page_gpa = 0x200000;
static constexpr std::uint32_t msr_index = 0x174; /* IA32_SYSENTER_CS: no side effects */

/*
 * rdi = address, rax = first value, rcx = count:
 *	1: mov [rdi], rax ; inc rax ; dec rcx ; jnz 1b ; hlt
 * One 8-byte write per iteration, the value counting up from rax.
 */
static constexpr std::uint8_t blob_write[] = {
	0x48, 0x89, 0x07,	/* mov [rdi], rax */
	0x48, 0xff, 0xc0,	/* inc rax */
	0x48, 0xff, 0xc9,	/* dec rcx */
	0x75, 0xf5,		/* jnz -11 */
	0xf4,			/* hlt */
};

/*
 * ecx = MSR, edx:eax = first value, rsi = count:
 *	1: wrmsr ; inc eax ; dec rsi ; jnz 1b ; hlt
 */
static constexpr std::uint8_t blob_wrmsr[] = {
	0x0f, 0x30,		/* wrmsr */
	0xff, 0xc0,		/* inc eax */
	0x48, 0xff, 0xce,	/* dec rsi */
	0x75, 0xf7,		/* jnz -9 */
	0xf4,			/* hlt */
};

/*
 * rsi = count:
 *	1: dec rsi ; jnz 1b ; out 0x80, al ; hlt
 * For single-stepping: two instructions per iteration. It ends with a port
 * write (an I/O exit to userspace) because a single-stepped HLT reports a
 * debug exit and the vCPU would step on past it.
 */
static constexpr std::uint16_t step_end_port = 0x80;
static constexpr std::uint8_t blob_step[] = {
	0x48, 0xff, 0xce,	/* dec rsi */
	0x75, 0xfb,		/* jnz -5 */
	0xe6, 0x80,		/* out 0x80, al */
	0xf4,			/* hlt */
};

inline int xioctl(int fd, unsigned long req, const void *arg, const char *what)
{
	int r = ::ioctl(fd, req, arg);
	if (r < 0) /* strerror only on failure: the loops time this */
		check(false, "%s: %s", what, std::strerror(errno));
	return r;
}

/* The guest RAM image: page tables and the code blob. ram has ram_size bytes. */
inline void write_image(std::uint8_t *ram, const std::uint8_t *code, std::size_t len)
{
	std::memset(ram, 0, ram_size);
	auto *pml4 = reinterpret_cast<std::uint64_t *>(ram + pml4_gpa);
	auto *pdpt = reinterpret_cast<std::uint64_t *>(ram + pdpt_gpa);
	auto *pd = reinterpret_cast<std::uint64_t *>(ram + pd_gpa);
	pml4[0] = pdpt_gpa | 3;	/* present, writable */
	pdpt[0] = pd_gpa | 3;
	for (std::uint64_t i = 0; i < 512; i++)
		pd[i] = (i << 21) | 0x83; /* 2 MiB page, present, writable */
	std::memcpy(ram + code_gpa, code, len);
}

/* CPUID (KVM refuses EFER.LME without CPUID's LM bit) and 64-bit sregs. */
inline void setup_long_mode(int kvm_fd, int vcpu_fd)
{
	struct {
		kvm_cpuid2 head;
		kvm_cpuid_entry2 e[256];
	} cpuid{};
	cpuid.head.nent = 256;
	xioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, &cpuid, "KVM_GET_SUPPORTED_CPUID");
	xioctl(vcpu_fd, KVM_SET_CPUID2, &cpuid, "KVM_SET_CPUID2");
	kvm_sregs s{};
	xioctl(vcpu_fd, KVM_GET_SREGS, &s, "KVM_GET_SREGS");
	kvm_segment code{};
	code.base = 0;
	code.limit = 0xffffffff;
	code.selector = 0x8;
	code.type = 11; /* execute/read, accessed */
	code.present = 1;
	code.s = 1;
	code.l = 1;
	code.g = 1;
	kvm_segment data = code;
	data.selector = 0x10;
	data.type = 3; /* read/write, accessed */
	data.l = 0;
	data.db = 1;
	s.cs = code;
	s.ds = s.es = s.fs = s.gs = s.ss = data;
	s.cr3 = pml4_gpa;
	s.cr4 = 1u << 5;			/* PAE */
	s.cr0 = 0x80000001u | (1u << 16);	/* PG, PE, WP */
	s.efer = (1u << 8) | (1u << 10);	/* LME, LMA */
	xioctl(vcpu_fd, KVM_SET_SREGS, &s, "KVM_SET_SREGS");
}

/* Registers for one run of a blob: rip at its start, the rest as given. */
inline kvm_regs blob_regs(std::uint64_t rax, std::uint64_t rcx, std::uint64_t rdx,
			  std::uint64_t rsi, std::uint64_t rdi)
{
	kvm_regs r{};
	r.rip = code_gpa;
	r.rflags = 2;
	r.rsp = ram_size;
	r.rax = rax;
	r.rcx = rcx;
	r.rdx = rdx;
	r.rsi = rsi;
	r.rdi = rdi;
	return r;
}

/* A VM made of raw fds: no libvirtkit anywhere. */
struct RawVm {
	int kvm = -1, vm = -1, vcpu = -1;
	kvm_run *run = nullptr;
	std::size_t run_size = 0;
	std::uint8_t *ram = nullptr;
	std::uint8_t *page = nullptr; /* page_gpa's backing */

	/* readonly: page_gpa's slot is KVM_MEM_READONLY (its writes exit as MMIO). */
	RawVm(const std::uint8_t *code, std::size_t len, bool readonly)
	{
		kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
		check(kvm >= 0, "open /dev/kvm: %s", std::strerror(errno));
		vm = xioctl(kvm, KVM_CREATE_VM, nullptr, "KVM_CREATE_VM");
		ram = static_cast<std::uint8_t *>(::mmap(nullptr, ram_size + 4096,
							  PROT_READ | PROT_WRITE,
							  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
		check(ram != MAP_FAILED, "mmap: %s", std::strerror(errno));
		page = ram + ram_size;
		write_image(ram, code, len);
		kvm_userspace_memory_region r{};
		r.slot = 0;
		r.guest_phys_addr = ram_gpa;
		r.memory_size = ram_size;
		r.userspace_addr = reinterpret_cast<std::uint64_t>(ram);
		xioctl(vm, KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION");
		r.slot = 1;
		r.flags = readonly ? KVM_MEM_READONLY : 0;
		r.guest_phys_addr = page_gpa;
		r.memory_size = 4096;
		r.userspace_addr = reinterpret_cast<std::uint64_t>(page);
		xioctl(vm, KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION");
		vcpu = xioctl(vm, KVM_CREATE_VCPU, (void *)0, "KVM_CREATE_VCPU");
		run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, nullptr, "KVM_GET_VCPU_MMAP_SIZE");
		run = static_cast<kvm_run *>(
			::mmap(nullptr, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0));
		check(run != MAP_FAILED, "mmap kvm_run: %s", std::strerror(errno));
		setup_long_mode(kvm, vcpu);
	}
	RawVm(const RawVm &) = delete;
	RawVm &operator=(const RawVm &) = delete;
	~RawVm()
	{
		::munmap(run, run_size);
		::munmap(ram, ram_size + 4096);
		::close(vcpu);
		::close(vm);
		::close(kvm);
	}

	void set_regs(const kvm_regs &r) { xioctl(vcpu, KVM_SET_REGS, &r, "KVM_SET_REGS"); }
	/* KVM_RUN once; returns exit_reason. */
	std::uint32_t enter()
	{
		int r;
		do
			r = ::ioctl(vcpu, KVM_RUN, 0);
		while (r < 0 && errno == EINTR);
		if (r < 0) /* strerror only on failure: it would be timed */
			check(false, "KVM_RUN: %s", std::strerror(errno));
		return run->exit_reason;
	}
};

/*
 * The raw read-only-slot write loop: RawVm(blob_write, ..., true) stores
 * 1..n to page_gpa; each store exits as an MMIO write, which this completes
 * with a memcpy into the page's backing (what a VMM does for ROM it
 * emulates), calling per_exit() first. Returns the loop's ns; checks that
 * every store exited once and the last one landed.
 */
template <typename PerExit>
std::uint64_t raw_readonly_writes(RawVm &raw, std::uint64_t n, const char *what,
				  PerExit &&per_exit)
{
	raw.set_regs(blob_regs(1, n, 0, 0, page_gpa));
	std::uint64_t exits = 0;
	auto t0 = Clock::now();
	for (;;) {
		std::uint32_t reason = raw.enter();
		if (reason == KVM_EXIT_HLT)
			break;
		auto &m = raw.run->mmio;
		check(reason == KVM_EXIT_MMIO && m.is_write && m.len <= 8 &&
			      m.phys_addr >= page_gpa && m.phys_addr + m.len <= page_gpa + 4096,
		      "%s: exit %u", what, reason);
		per_exit();
		std::memcpy(raw.page + (m.phys_addr - page_gpa), m.data, m.len);
		exits++;
	}
	std::uint64_t ns = ns_since(t0);
	std::uint64_t last;
	std::memcpy(&last, raw.page, 8);
	check(exits == n && last == n, "%s: %llu exits, last value %llu", what,
	      (unsigned long long)exits, (unsigned long long)last);
	return ns;
}

/* Per-round figures, in picoseconds per operation (integer arithmetic). */
struct Series {
	std::vector<std::uint64_t> ps;

	void add(std::uint64_t ns, std::uint64_t n) { ps.push_back(ns * 1000 / (n ? n : 1)); }
	std::uint64_t median() const
	{
		auto v = ps;
		std::sort(v.begin(), v.end());
		return v.empty() ? 0 : v[v.size() / 2];
	}
	std::uint64_t min() const { return ps.empty() ? 0 : *std::min_element(ps.begin(), ps.end()); }
	std::uint64_t max() const { return ps.empty() ? 0 : *std::max_element(ps.begin(), ps.end()); }
};

/* "12.3 us" from picoseconds. */
inline std::string ps_str(std::uint64_t ps)
{
	if (ps >= 1000000000ull)
		return fixed(ps, 1000000000ull, 2) + " ms";
	if (ps >= 1000000)
		return fixed(ps, 1000000, 2) + " us";
	return fixed(ps, 1000, 1) + " ns";
}

struct Comparison {
	Series base, subj;
	/* subject / baseline medians, in hundredths. */
	std::uint64_t ratio_x100() const
	{
		std::uint64_t b = base.median();
		return b ? (subj.median() * 100 + b / 2) / b : 0;
	}
	std::string ratio() const { return fixed(subj.median(), base.median(), 2); }
};

/*
 * Alternate baseline(n) and subject(n), each returning the wall-clock ns
 * of its n operations, for `rounds` rounds (after one unmeasured warm-up
 * round of each); print both series and the ratio.
 */
template <class B, class S>
Comparison compare(const char *what, const char *unit, int rounds, std::uint64_t n,
		   const char *base_label, B &&baseline, const char *subj_label, S &&subject)
{
	Comparison c;
	baseline(n);
	subject(n);
	for (int r = 0; r < rounds; r++) {
		/* Alternate which side goes first, too. */
		if (r & 1) {
			c.subj.add(subject(n), n);
			c.base.add(baseline(n), n);
		} else {
			c.base.add(baseline(n), n);
			c.subj.add(subject(n), n);
		}
	}
	std::printf("%s (%d rounds of %llu, median [min-max] per %s):\n", what, rounds,
		    (unsigned long long)n, unit);
	std::printf("  %-44s %10s  [%s - %s]\n", base_label, ps_str(c.base.median()).c_str(),
		    ps_str(c.base.min()).c_str(), ps_str(c.base.max()).c_str());
	std::printf("  %-44s %10s  [%s - %s]\n", subj_label, ps_str(c.subj.median()).c_str(),
		    ps_str(c.subj.min()).c_str(), ps_str(c.subj.max()).c_str());
	std::printf("  %-44s %10s\n", "ratio subject/baseline (medians)", c.ratio().c_str());
	return c;
}

/* One line of the final table: "goal: <goal> | <measured> | met". */
inline void goal(const std::string &what, const std::string &measured, const char *verdict)
{
	std::printf("goal: %-66s | %-48s | %s\n", what.c_str(), measured.c_str(), verdict);
}
inline void goal(const std::string &what, const std::string &measured, bool met)
{
	goal(what, measured, met ? "met" : "not met");
}

} // namespace rounds
