// SPDX-License-Identifier: MIT
/*
 * spp_bench - what sub-page protection costs, in figures.
 *
 * Not a test: no thresholds, a plain table on stdout. It measures, in one
 * run on one VM:
 *   (a) a guest loop of 8-byte writes to unprotected memory,
 *   (b) the same loop writing to the writable sub-pages of a protected page,
 *   (c) the same loop writing to its protected sub-pages (dropped),
 *   a port I/O exit round trip as the baseline of every exit,
 *   (d) a 4 KiB rep stosb into a page with one protected sub-page, and into
 *       an unprotected page,
 *   (e) SET / GET / unprotect of 1, 512, 1048576 and 2097152 pages (an 8 GiB
 *       region),
 *   (f) 10,000 scattered pages protected one set_access call each, then
 *       unprotected: 1,000 one call each, the rest in one call,
 *   (g) when virtkit.ko is loaded: (b) and (c) on two more VMs, one per
 *       backend, with the ratio user/kmod and the exits that reach
 *       userspace per write.
 *   (h) the fair comparison (bench_rounds.hpp): the same 5 hand-assembled
 *       guest instructions writing 8 bytes to one page, on a raw-ioctl VM
 *       whose page is a KVM_MEM_READONLY memslot (every write an MMIO exit
 *       the loop completes with a memcpy) and on a libvirtkit VM whose page
 *       has one writable sub-page, per backend; alternating rounds, median,
 *       spread and ratio.
 * Each goal of issue 19 prints a "goal:" line; `make run-bench` collects
 * them into one table.
 * Times are host wall-clock times (steady_clock) around the guest's loop,
 * from the GUEST_SYNC before it to the GUEST_SYNC after it; exits are the
 * exits the VM's exit handlers saw, next to the SppStats deltas; SET/GET
 * times are per call, as median, mean and first call (the first re-cut of
 * the memslots after the guest ran also pays for KVM dropping its mappings). Every case
 * checks the memory contents afterwards from the host, so a wrong result
 * cannot pass for a fast one.
 *
 * Like the selftests, this file is guest code (-mgeneral-regs-only): the
 * host side computes and prints in integer arithmetic.
 */
#include <virtkit/virtkit.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include "bench_rounds.hpp"
#include "bench_util.hpp"

#include <algorithm>
#include <climits>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

using namespace virtkit;
using namespace virtkit::x86;

/* Region A: the pages the guest writes to. */
static constexpr std::uint64_t a_gpa = 0x40000000; /* 1 GiB */
static constexpr std::uint64_t a_pages = 64;
static constexpr std::uint64_t a_gfn = a_gpa / 4096;
static constexpr std::uint64_t page_prot = 0;	/* map 0x0000FFFF: (b), (c) */
static constexpr std::uint64_t page_plain = 8;	/* unprotected: (a) */
static constexpr std::uint64_t page_stos = 16;	/* one protected sub-page: (d) */
static constexpr std::uint64_t page_stos_plain = 24; /* unprotected: (d) */
static constexpr std::uint32_t stos_subpage = 5;

/* Region B: 8 GiB of RAM only the VMM touches, for SET/GET: (e), (f). */
static constexpr std::uint64_t b_gpa = 0x100000000ull; /* 4 GiB */
static constexpr std::uint64_t b_pages = 2097152;
static constexpr std::uint64_t b_gfn = b_gpa / 4096;

static constexpr std::uint16_t port_ignored = 0x5010;

static constexpr std::uint64_t n_plain = 2000000;
static constexpr std::uint64_t n_exits = 2000;
static constexpr std::uint64_t n_scatter = 10000;
static constexpr std::uint64_t n_unset_single = 1000;

/* Guest code. */

/* n 8-byte writes, cycling over nsub (a power of two) sub-pages from first. */
static void guest_write_loop(std::uint64_t page, std::uint64_t first, std::uint64_t nsub,
			     std::uint64_t n)
{
	GUEST_SYNC(0);
	for (std::uint64_t i = 0; i < n; i++)
		*(volatile std::uint64_t *)(page + (first + (i & (nsub - 1))) * 128) = i + 1;
	GUEST_SYNC(1);
}

static void guest_outb_loop(std::uint64_t n)
{
	GUEST_SYNC(0);
	for (std::uint64_t i = 0; i < n; i++)
		guest_outb(port_ignored, (std::uint8_t)i);
	GUEST_SYNC(1);
}

static void guest_rep_stosb(std::uint64_t dst, std::uint64_t len, std::uint64_t value)
{
	GUEST_SYNC(0);
	__asm__ volatile("rep stosb" : "+D"(dst), "+c"(len) : "a"(value) : "memory");
	GUEST_SYNC(1);
}

/* Host side. */

/* "12.3 ms" style, from nanoseconds. */
static std::string dur(std::uint64_t ns)
{
	if (ns >= 1000000000ull)
		return fixed(ns, 1000000000ull, 3) + " s";
	if (ns >= 1000000)
		return fixed(ns, 1000000, 2) + " ms";
	if (ns >= 1000)
		return fixed(ns, 1000, 1) + " us";
	return std::to_string(ns) + " ns";
}

/* Pages per second. */
static std::string rate(std::uint64_t pages, std::uint64_t ns)
{
	return fixed((unsigned __int128)pages * 1000000000ull, ns, 0) + " pages/s";
}

/* Per-call times of one operation. */
struct Times {
	std::vector<std::uint64_t> ns;

	void add(std::uint64_t t) { ns.push_back(t); }
	std::uint64_t total() const
	{
		std::uint64_t s = 0;
		for (auto t : ns)
			s += t;
		return s;
	}
	std::uint64_t mean() const { return mean(0, ns.size()); }
	std::uint64_t mean(std::size_t from, std::size_t to) const
	{
		std::uint64_t s = 0;
		for (std::size_t i = from; i < to; i++)
			s += ns[i];
		return to > from ? s / (to - from) : 0;
	}
	std::uint64_t median() const
	{
		auto v = ns;
		std::sort(v.begin(), v.end());
		return v.empty() ? 0 : v[v.size() / 2];
	}
	std::uint64_t max() const { return ns.empty() ? 0 : *std::max_element(ns.begin(), ns.end()); }
	/* "1.52 ms/call (mean 11.8 ms, first 250 ms)" */
	std::string summary() const
	{
		return dur(median()) + "/call (mean " + dur(mean()) + ", first " +
		       dur(ns.empty() ? 0 : ns[0]) + ")";
	}
};

/* Every exit the VM's handlers see, counted before the library's SPP handler. */
struct ExitCounts {
	std::uint64_t all = 0, mmio = 0, pio_ignored = 0, ucalls = 0;
};

struct Bench {
	GuestVm g;
	RegionId ra, rb;
	ExitCounts ex;
	ExitHandlerRegistration counter;
	SubpageProtection *spp = nullptr;
	Vcpu *v = nullptr;

	Bench(const System &s, const SppOptions &opts) : g(s)
	{
		ra = g.memory().add(a_gpa, a_pages * 4096, {.name = "bench"});
		g.identity_map(a_gpa, a_pages * 4096);
		rb = g.memory().add(b_gpa, b_pages * 4096, {.name = "bench-1g"});
		/* Registered before SPP is enabled: at the same priority, it runs first. */
		counter = g.vm().add_exit_handler(
			[this](Vcpu &, Exit &e) {
				ex.all++;
				if (std::holds_alternative<MmioExit>(e))
					ex.mmio++;
				if (auto *io = std::get_if<IoExit>(&e)) {
					if (io->port == VIRTKIT_UCALL_PORT)
						ex.ucalls++;
					if (io->port == port_ignored && io->is_out()) {
						ex.pio_ignored++;
						return ExitAction::resume;
					}
				}
				return ExitAction::pass;
			},
			INT_MIN);
		spp = &SubpageProtection::enable(g.vm(), opts);
	}

	std::uint64_t gpa(std::uint64_t page) const { return a_gpa + page * 4096; }

	/* Run entry(args...) from its first GUEST_SYNC to its second: ns and exits. */
	struct Timed {
		std::uint64_t ns;
		ExitCounts exits;	/* not counting the ucall that ends the loop */
		SppStats spp;		/* deltas */
	};
	template <class Fn, class... Args> Timed timed(Fn *entry, Args... args)
	{
		if (!v)
			v = &g.add_vcpu(entry, args...);
		else
			g.set_entry(*v, entry, args...);
		Ucall uc = g.run(*v);
		check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 0, "expected SYNC(0), got %s",
		      uc.describe().c_str());
		ExitCounts e0 = ex;
		SppStats s0 = spp->stats();
		auto t0 = Clock::now();
		uc = g.run(*v);
		std::uint64_t ns = ns_since(t0);
		check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 1, "expected SYNC(1), got %s",
		      uc.describe().c_str());
		SppStats s1 = spp->stats();
		Timed t{ns, {}, {}};
		t.exits.all = ex.all - e0.all - 1; /* the SYNC(1) ucall */
		t.exits.mmio = ex.mmio - e0.mmio;
		t.exits.pio_ignored = ex.pio_ignored - e0.pio_ignored;
		t.exits.ucalls = ex.ucalls - e0.ucalls - 1;
		t.spp.checked_writes = s1.checked_writes - s0.checked_writes;
		t.spp.allowed_writes = s1.allowed_writes - s0.allowed_writes;
		t.spp.violations = s1.violations - s0.violations;
		g.run_to_done(*v);
		return t;
	}

	void run();
};

static void line(const char *label, const std::string &text)
{
	std::printf("%-26s: %s\n", label, text.c_str());
}

static std::string per_write(const Bench::Timed &t, std::uint64_t n)
{
	return fixed(t.ns, n, 1) + " ns/write   " + fixed(t.exits.all, n, 3) +
	       " exits/write   (mmio " + std::to_string(t.exits.mmio) + ", spp checked " +
	       std::to_string(t.spp.checked_writes) + " allowed " +
	       std::to_string(t.spp.allowed_writes) + " violations " +
	       std::to_string(t.spp.violations) + ")";
}

void Bench::run()
{
	auto &mem = g.memory();
	const std::uint32_t half = 0x0000FFFFu; /* sub-pages 0..15 writable */

	std::printf("spp_bench: libvirtkit %s, SPP backend %s, %zu memslots at start\n",
		    VIRTKIT_VERSION_STRING,
		    spp->backend() == SppBackendKind::user ? "user" : "kmod",
		    mem.slot_count());
	std::printf("loop counts: (a) %llu writes, (b)/(c)/PIO %llu, (d) 4096 bytes, "
		    "(f) %llu pages\n\n",
		    (unsigned long long)n_plain, (unsigned long long)n_exits,
		    (unsigned long long)n_scatter);

	/* Guest writes. */
	spp->set_access(a_gfn + page_prot, {half});
	mem.fill(gpa(page_prot), std::byte{0xaa}, 4096);

	Timed a = timed(guest_write_loop, gpa(page_plain), 0, 16, n_plain);
	for (std::uint64_t s = 0; s < 16; s++)
		check(mem.read_obj<std::uint64_t>(gpa(page_plain) + s * 128) == n_plain - 16 + s + 1,
		      "(a): sub-page %llu does not hold the last write", (unsigned long long)s);
	line("write unprotected", per_write(a, n_plain));

	Timed b = timed(guest_write_loop, gpa(page_prot), 0, 16, n_exits);
	for (std::uint64_t s = 0; s < 16; s++)
		check(mem.read_obj<std::uint64_t>(gpa(page_prot) + s * 128) == n_exits - 16 + s + 1,
		      "(b): writable sub-page %llu does not hold the last write",
		      (unsigned long long)s);
	check(b.spp.allowed_writes == n_exits && b.spp.violations == 0,
	      "(b): %llu allowed, %llu violations", (unsigned long long)b.spp.allowed_writes,
	      (unsigned long long)b.spp.violations);
	line("write allowed sub-page", per_write(b, n_exits));

	Timed c = timed(guest_write_loop, gpa(page_prot), 16, 16, n_exits);
	for (std::uint64_t off = 2048; off < 4096; off += 8)
		check(mem.read_obj<std::uint64_t>(gpa(page_prot) + off) == 0xaaaaaaaaaaaaaaaaull,
		      "(c): protected byte at +%llu was written", (unsigned long long)off);
	check(c.spp.violations == n_exits && c.spp.allowed_writes == 0,
	      "(c): %llu violations, %llu allowed", (unsigned long long)c.spp.violations,
	      (unsigned long long)c.spp.allowed_writes);
	line("write blocked (dropped)", per_write(c, n_exits));

	Timed p = timed(guest_outb_loop, n_exits);
	check(p.exits.pio_ignored == n_exits, "PIO: %llu exits",
	      (unsigned long long)p.exits.pio_ignored);
	line("PIO exit round trip", fixed(p.ns, n_exits, 1) + " ns/exit    " +
					    fixed(p.exits.all, n_exits, 3) + " exits/outb");
	/* Per-write times: (b) and (c) ran n_exits writes, (a) n_plain. */
	const unsigned __int128 a_scaled = (unsigned __int128)a.ns * n_exits;
	line("ratio (b)/(a)", fixed((unsigned __int128)b.ns * n_plain, a_scaled, 1));
	line("ratio (c)/(a)", fixed((unsigned __int128)c.ns * n_plain, a_scaled, 1));
	line("ratio (b)/PIO", fixed(b.ns, p.ns, 2));
	line("ratio (c)/PIO", fixed(c.ns, p.ns, 2));

	/* (d) rep stosb over a whole page. */
	std::printf("\n");
	spp->set_access(a_gfn + page_stos, {~(1u << stos_subpage)});
	Timed d = timed(guest_rep_stosb, gpa(page_stos), 4096, 0x5a);
	{
		auto *h = reinterpret_cast<const std::uint8_t *>(mem.host_ptr(gpa(page_stos), 4096));
		for (std::uint32_t i = 0; i < 4096; i++) {
			bool prot = i / 128 == stos_subpage;
			check(h[i] == (prot ? 0 : 0x5a), "(d): byte %u is 0x%x", i, h[i]);
		}
	}
	line("rep stosb 4K, 1 prot. sub", dur(d.ns) + "   " + std::to_string(d.exits.all) +
						  " exits   (mmio " + std::to_string(d.exits.mmio) +
						  ", spp allowed " + std::to_string(d.spp.allowed_writes) +
						  " violations " + std::to_string(d.spp.violations) + ")");
	Timed d0 = timed(guest_rep_stosb, gpa(page_stos_plain), 4096, 0x5a);
	{
		auto *h = reinterpret_cast<const std::uint8_t *>(mem.host_ptr(gpa(page_stos_plain), 4096));
		for (std::uint32_t i = 0; i < 4096; i++)
			check(h[i] == 0x5a, "(d): unprotected byte %u is 0x%x", i, h[i]);
	}
	line("rep stosb 4K, unprotected", dur(d0.ns) + "   " + std::to_string(d0.exits.all) + " exits");
	line("ratio protected/unprot.", fixed(d.ns, d0.ns, 1));
	rounds::goal("4 KiB rep stosb, 1 protected sub-page: exits <= 1 + 1",
		     std::to_string(d.exits.all) + " exits (" + dur(d.ns) + ", unprotected " +
			     dur(d0.ns) + ")",
		     d.exits.all <= 2);

	/* (e) SET / GET / unprotect in bulk, on the 1 GiB region. */
	std::printf("\n(e) one call per range; times per call: median (mean, first call)\n");
	std::size_t slots0 = mem.slot_count();
	const std::uint64_t prot0 = spp->stats().protected_pages;
	for (std::uint64_t n : {1ull, 512ull, 1048576ull, 2097152ull}) {
		/* Small ranges sit in the middle of the region (slots split in three). */
		std::uint64_t gfn = n == b_pages ? b_gfn : b_gfn + 1024;
		int reps = n == 1 ? 50 : n == 512 ? 20 : n < b_pages ? 3 : 2;
		std::vector<std::uint32_t> maps(n), none(n, SubpageProtection::all_writable);
		for (std::uint64_t i = 0; i < n; i++)
			maps[i] = i & 1 ? 0xFFFF0000u : half;
		Times t_set, t_get, t_unset;
		std::size_t slots_set = 0;
		for (int r = 0; r < reps; r++) {
			auto t = Clock::now();
			spp->set_access(gfn, maps);
			t_set.add(ns_since(t));
			slots_set = mem.slot_count();
			check(spp->stats().protected_pages == prot0 + n, "(e): %llu protected pages",
			      (unsigned long long)spp->stats().protected_pages);
			t = Clock::now();
			auto got = spp->get_access(gfn, n);
			t_get.add(ns_since(t));
			check(got == maps, "(e): GET of %llu pages differs from SET",
			      (unsigned long long)n);
			t = Clock::now();
			spp->set_access(gfn, none);
			t_unset.add(ns_since(t));
		}
		check(mem.slot_count() == slots0, "(e): %zu memslots after unprotect, %zu before",
		      mem.slot_count(), slots0);
		check(spp->get_access(gfn, n) == none && spp->stats().protected_pages == prot0,
		      "(e): not unprotected");
		std::string ns = std::to_string(n) + " pages";
		line(("SET   " + ns).c_str(), t_set.summary() + "   " + rate(n, t_set.median()) +
					     "   memslots after SET: " + std::to_string(slots_set) +
					     " (before: " + std::to_string(slots0) + ")");
		line(("GET   " + ns).c_str(), t_get.summary() + "   " + rate(n, t_get.median()));
		line(("UNSET " + ns).c_str(), t_unset.summary() + "   " + rate(n, t_unset.median()) +
					     "   (" + std::to_string(reps) + " rounds)");
		if (n == 1048576) {
			/* pages/s of the median call, in millions */
			std::uint64_t set_m = t_set.median() ? n * 1000 / t_set.median() : 0;
			std::uint64_t get_m = t_get.median() ? n * 1000 / t_get.median() : 0;
			rounds::goal("SET 1 M pages in one call >= 20 M pages/s",
				     rate(n, t_set.median()) + " (median of " +
					     std::to_string(reps) + ")",
				     set_m >= 20);
			rounds::goal("GET 1 M pages in one call >= 100 M pages/s",
				     rate(n, t_get.median()) + " (median of " +
					     std::to_string(reps) + ")",
				     get_m >= 100);
		}
	}

	/* (f) scattered pages, one call each. */
	const std::uint64_t base = b_gfn + 16, stride = 3, span = stride * n_scatter;
	std::printf("\n(f) %llu pages gfn = base + %llu*k (map 0x0000FFFF), one set_access call each\n",
		    (unsigned long long)n_scatter, (unsigned long long)stride);
	Times t_scatter;
	for (std::uint64_t k = 0; k < n_scatter; k++) {
		auto t = Clock::now();
		spp->set_access(base + stride * k, {half});
		t_scatter.add(ns_since(t));
	}
	std::size_t slots_scatter = mem.slot_count();
	{
		auto got = spp->get_access(base, span);
		for (std::uint64_t i = 0; i < got.size(); i++)
			check(got[i] == (i % stride ? SubpageProtection::all_writable : half),
			      "(f): page %llu has map 0x%x", (unsigned long long)i, got[i]);
		check(spp->stats().protected_pages == prot0 + n_scatter, "(f): %llu protected pages",
		      (unsigned long long)spp->stats().protected_pages);
	}
	line("scatter SET total", dur(t_scatter.total()) + " for " + std::to_string(n_scatter) +
					  " calls");
	line("scatter SET per call", dur(t_scatter.mean()) + " mean   median " +
					     dur(t_scatter.median()) + "   first 1000: " +
					     dur(t_scatter.mean(0, 1000)) + "   last 1000: " +
					     dur(t_scatter.mean(n_scatter - 1000, n_scatter)) +
					     "   max " + dur(t_scatter.max()));
	line("scatter memslots", std::to_string(slots_scatter) + " (before: " +
					 std::to_string(slots0) + ")");

	/*
	 * Unprotect: the first n_unset_single pages one call each (the per-call
	 * cost, against a large layout), the rest in one call over the span.
	 */
	Times t_un;
	for (std::uint64_t k = 0; k < n_unset_single; k++) {
		auto t = Clock::now();
		spp->set_access(base + stride * k, {SubpageProtection::all_writable});
		t_un.add(ns_since(t));
	}
	std::size_t slots_mid = mem.slot_count();
	std::uint64_t rest = n_scatter - n_unset_single;
	auto t = Clock::now();
	spp->set_access(base + stride * n_unset_single,
			std::vector<std::uint32_t>(stride * rest, SubpageProtection::all_writable));
	std::uint64_t t_bulk = ns_since(t);
	check(mem.slot_count() == slots0, "(f): %zu memslots after unprotect, %zu before",
	      mem.slot_count(), slots0);
	check(spp->stats().protected_pages == prot0, "(f): pages still protected");
	check(spp->get_access(base, span) ==
		      std::vector<std::uint32_t>(span, SubpageProtection::all_writable),
	      "(f): not unprotected");
	line("scatter UNSET per call", dur(t_un.mean()) + " mean   median " + dur(t_un.median()) +
					       "   (first " + std::to_string(n_unset_single) +
					       " pages, one call each; memslots then " +
					       std::to_string(slots_mid) + ")");
	line("scatter UNSET bulk", dur(t_bulk) + " for the other " + std::to_string(rest) +
					   " pages in one call (" + rate(stride * rest, t_bulk) + ")");
	line("scatter UNSET total", dur(t_un.total() + t_bulk) + " to unprotect all " +
					    std::to_string(n_scatter));
}

/*
 * (h) Allowed 8-byte writes to a protected page against a raw read-only-slot
 * write exit: the same guest code (rounds::blob_write) in both VMs.
 */
static constexpr std::uint64_t n_fair = 2000;
static constexpr int fair_rounds = 7;

/* The subject: a libvirtkit VM, the page protected but for sub-page 0. */
struct LibWrites {
	Vm vm;
	Vcpu vcpu;
	std::uint64_t exits = 0;
	ExitHandlerRegistration counter;
	SubpageProtection *spp = nullptr;

	LibWrites(const System &sys, int kvm_fd, SppBackendKind kind)
		: vm(sys.create_vm()), vcpu(vm.create_vcpu(0))
	{
		vm.memory().add(rounds::ram_gpa, rounds::ram_size, {.name = "ram"});
		vm.memory().add(rounds::page_gpa, 4096, {.name = "page"});
		rounds::write_image(reinterpret_cast<std::uint8_t *>(
					    vm.memory().host_ptr(rounds::ram_gpa, rounds::ram_size)),
				    rounds::blob_write, sizeof(rounds::blob_write));
		rounds::setup_long_mode(kvm_fd, vcpu.fd());
		/* Every exit that reaches userspace, before SPP's handler sees it. */
		counter = vm.add_exit_handler(
			[this](Vcpu &, Exit &) {
				exits++;
				return ExitAction::pass;
			},
			INT_MIN);
		spp = &SubpageProtection::enable(vm, {.backend = kind});
		spp->set_access(rounds::page_gpa / 4096, {0x1u}); /* sub-page 0 writable */
	}

	std::uint64_t writes(std::uint64_t n)
	{
		vcpu.set_regs(rounds::blob_regs(1, n, 0, 0, rounds::page_gpa));
		std::uint64_t allowed0 = spp->stats().allowed_writes;
		auto t0 = Clock::now();
		for (;;) {
			Exit e = vcpu.run();
			if (std::holds_alternative<HltExit>(e))
				break;
			check(false, "libvirtkit SPP writes: unexpected exit %zu", e.index());
		}
		std::uint64_t ns = ns_since(t0);
		std::uint64_t last = vm.memory().read_obj<std::uint64_t>(rounds::page_gpa);
		std::uint64_t allowed = spp->stats().allowed_writes - allowed0;
		check(last == n && allowed == n, "libvirtkit SPP writes: last value %llu, %llu allowed",
		      (unsigned long long)last, (unsigned long long)allowed);
		return ns;
	}
};

static void fair_writes(const System &sys)
{
	std::printf("\n(h) allowed 8-byte writes to a protected page against a raw read-only-slot "
		    "write exit\n    (the same 5 guest instructions in both VMs)\n");
	rounds::RawVm raw(rounds::blob_write, sizeof(rounds::blob_write), true);
	for (SppBackendKind kind : {SppBackendKind::user, SppBackendKind::kmod}) {
		bool user = kind == SppBackendKind::user;
		std::string g = std::string("allowed 8-byte write, ") + (user ? "user" : "kmod") +
				" backend <= " + (user ? "1.15" : "1.05") + "x raw RO-slot write";
		if (!user && access("/dev/virtkit", F_OK) != 0) {
			std::printf("kmod backend: not measured: no /dev/virtkit\n");
			rounds::goal(g, "not measured: no /dev/virtkit", "not measured");
			continue;
		}
		LibWrites lib(sys, raw.kvm, kind);
		std::uint64_t exits0 = lib.exits;
		auto c = rounds::compare(
			user ? "user backend" : "kmod backend", "write", fair_rounds, n_fair,
			"raw ioctls, KVM_MEM_READONLY slot",
			[&](std::uint64_t n) {
				return rounds::raw_readonly_writes(raw, n, "raw read-only slot", [] {});
			},
			user ? "libvirtkit SPP, user backend" : "libvirtkit SPP, kmod backend",
			[&](std::uint64_t n) { return lib.writes(n); });
		/* rounds + 1 warm-up round of n_fair writes, each ending in HLT */
		std::uint64_t writes = n_fair * (fair_rounds + 1);
		std::printf("  %-44s %10s\n", "libvirtkit exits to userspace per write",
			    fixed(lib.exits - exits0 - (fair_rounds + 1), writes, 3).c_str());
		rounds::goal(g,
			     c.ratio() + "x (" + rounds::ps_str(c.subj.median()) + " vs " +
				     rounds::ps_str(c.base.median()) + ")",
			     c.ratio_x100() <= (user ? 115u : 105u));
	}
}

/* (g) The kmod fast path against the user backend, on fresh VMs. */
static void compare_backends(const System &sys)
{
	std::printf("\n(g) 8-byte guest writes to a protected page: kmod backend vs user backend\n");
	if (access("/dev/virtkit", F_OK) != 0) {
		std::printf("skipped: /dev/virtkit missing (virtkit.ko not loaded)\n");
		return;
	}
	const std::uint32_t half = 0x0000FFFFu;
	struct Result {
		Bench::Timed allowed, blocked, pio;
	};
	auto measure = [&](SppBackendKind kind) {
		Bench b(sys, {.backend = kind});
		b.spp->set_access(a_gfn + page_prot, {half});
		b.g.memory().fill(b.gpa(page_prot), std::byte{0xaa}, 4096);
		Result r;
		r.allowed = b.timed(guest_write_loop, b.gpa(page_prot), 0, 16, n_exits);
		for (std::uint64_t s = 0; s < 16; s++)
			check(b.g.memory().read_obj<std::uint64_t>(b.gpa(page_prot) + s * 128) ==
				      n_exits - 16 + s + 1,
			      "(g): writable sub-page %llu does not hold the last write",
			      (unsigned long long)s);
		check(r.allowed.spp.allowed_writes == n_exits, "(g): %llu allowed writes",
		      (unsigned long long)r.allowed.spp.allowed_writes);
		r.blocked = b.timed(guest_write_loop, b.gpa(page_prot), 16, 16, n_exits);
		for (std::uint64_t off = 2048; off < 4096; off += 8)
			check(b.g.memory().read_obj<std::uint64_t>(b.gpa(page_prot) + off) ==
				      0xaaaaaaaaaaaaaaaaull,
			      "(g): protected byte at +%llu was written", (unsigned long long)off);
		check(r.blocked.spp.violations == n_exits, "(g): %llu violations",
		      (unsigned long long)r.blocked.spp.violations);
		r.pio = b.timed(guest_outb_loop, n_exits);
		return r;
	};
	Result u = measure(SppBackendKind::user);
	Result k = measure(SppBackendKind::kmod);
	line("user: allowed", per_write(u.allowed, n_exits));
	line("kmod: allowed", per_write(k.allowed, n_exits));
	line("user: blocked", per_write(u.blocked, n_exits));
	line("kmod: blocked", per_write(k.blocked, n_exits));
	line("PIO exit (user / kmod VM)", fixed(u.pio.ns, n_exits, 1) + " / " +
						 fixed(k.pio.ns, n_exits, 1) + " ns/exit");
	line("ratio allowed user/kmod", fixed(u.allowed.ns, k.allowed.ns, 2));
	line("ratio blocked user/kmod", fixed(u.blocked.ns, k.blocked.ns, 2));
	line("ratio allowed kmod/PIO", fixed(k.allowed.ns, k.pio.ns, 2));
	line("userspace exits/allowed", "user " + fixed(u.allowed.exits.all, n_exits, 3) +
						"   kmod " + fixed(k.allowed.exits.all, n_exits, 3));
}

/* spp_bench [SECTIONS]: all of (a)-(h), or those named, as in "h" or "abg". */
int main(int argc, char **argv)
{
	const std::string only = argc > 1 ? argv[1] : "abcdefgh";
	if (argc > 2 || only.find_first_not_of("abcdefgh") != std::string::npos) {
		std::fprintf(stderr, "usage: spp_bench [SECTIONS]: letters a-h, default all\n");
		return 2;
	}
	auto has = [&](const char *any) { return only.find_first_of(any) != std::string::npos; };
	auto start = Clock::now();
	try {
		System sys = System::open();
		if (!sys.check_extension(KVM_CAP_READONLY_MEM)) {
			std::printf("spp_bench: skipped: requires KVM_CAP_READONLY_MEM\n");
			return 4;
		}
		if (has("abcdef")) {
			Bench b(sys, {});
			b.run();
		}
		if (has("g"))
			compare_backends(sys);
		if (has("h"))
			fair_writes(sys);
	} catch (const std::exception &e) {
		std::fflush(stdout);
		std::fprintf(stderr, "spp_bench: FAILED: %s\n", e.what());
		return 1;
	}
	std::printf("\nspp_bench: done in %s\n", dur(ns_since(start)).c_str());
	return 0;
}
