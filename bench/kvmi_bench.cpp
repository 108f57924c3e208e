// SPDX-License-Identifier: MIT
/*
 * kvmi_bench - what VM introspection costs, in figures.
 *
 * Not a test: no thresholds, a plain table on stdout. In one run it measures
 *   (a) the event round trip: a guest loop of WRMSR to an MSR the tool
 *       intercepts; each write is an MSR event that the tool (a thread of
 *       this program, virtkit::introspect over a unix socket) answers
 *       CONTINUE, and the guest resumes. Against the bare exit of the same
 *       kind, measured the same way on a second VM: the same WRMSR loop
 *       through KVM's MSR filter, answered by a plain exit handler that
 *       performs the write with KVM_SET_MSRS (what the introspection does
 *       after the tool's reply). The ratio is the price of the protocol.
 *   (b) the same with guest breakpoints (INT3 -> BREAKPOINT event), where
 *       this host's KVM reports INT3 to the VMM at all (the server probes
 *       it; nested KVM under QEMU TCG and some hosts do not: then the line
 *       says so), and with single-steps: a guest loop stepped instruction
 *       by instruction, each step a SINGLESTEP event answered CONTINUE,
 *       against the bare KVM debug exit (KVM_GUESTDBG_SINGLESTEP, a plain
 *       exit handler resuming each KVM_EXIT_DEBUG) over the same loop;
 *   (c) READ_PHYSICAL throughput for 4 KiB and 8 KiB reads (an 8 KiB read
 *       is two page-sized commands on the wire), against memcpy of the same
 *       sizes in this process.
 * Times are host wall-clock times (steady_clock): around the guest's loop,
 * from its first GUEST_SYNC to its second, for (a) and (b); around the
 * tool's loop of reads for (c). Every case checks its result (the guest's
 * last MSR value, the bytes read), so a wrong result cannot pass for a fast
 * one.
 *
 * Like the selftests, this file is guest code (-mgeneral-regs-only): the
 * host side computes and prints in integer arithmetic.
 */
#include <virtkit/introspect.hpp>
#include <virtkit/introspection.hpp>
#include <virtkit/virtkit.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include "bench_util.hpp"

#include <linux/virtkit_kvmi.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace virtkit;
using namespace virtkit::x86;

static constexpr std::uint32_t bench_msr = 0x174; /* IA32_SYSENTER_CS: no side effects */
static constexpr std::uint64_t n_events = 2000;
static constexpr std::uint64_t n_reads = 20000;
static constexpr std::uint64_t n_step_iterations = 500;
static constexpr std::uint64_t buf_gpa = 0x40000000;
static constexpr std::uint64_t buf_pages = 4;
static constexpr const char *secret = "kvmi-bench";

/* Guest code. */

static void guest_wrmsr_loop(std::uint64_t n)
{
	GUEST_SYNC(0);
	for (std::uint64_t i = 1; i <= n; i++)
		guest_wrmsr(bench_msr, i & 0xffff);
	GUEST_SYNC(1);
}

static void guest_int3_loop(std::uint64_t n)
{
	GUEST_SYNC(0);
	for (std::uint64_t i = 0; i < n; i++)
		__asm__ volatile("int3");
	GUEST_SYNC(1);
}

static void guest_bp_handler(struct virtkit_ex_frame *)
{
}

/* Stepped from SYNC(0) to SYNC(1): a few instructions per iteration. */
static void guest_step_loop(std::uint64_t n)
{
	GUEST_SYNC(0);
	for (std::uint64_t i = 0; i < n; i++)
		__asm__ volatile("nop");
	GUEST_SYNC(1);
}

/* Host side. */

static void line(const char *label, const std::string &text)
{
	std::printf("%-34s: %s\n", label, text.c_str());
}

/* "12.3 us/event, 81300 events/s" */
static std::string per_event(std::uint64_t ns, std::uint64_t n)
{
	return fixed(ns, n * 1000, 1) + " us/event   " +
	       fixed((unsigned __int128)n * 1000000000ull, ns, 0) + " events/s";
}

/* MB/s (10^6 bytes) */
static std::string mbps(std::uint64_t bytes, std::uint64_t ns)
{
	return fixed((unsigned __int128)bytes * 1000, ns, 1) + " MB/s";
}

/* Run entry(args...) on a fresh vCPU 0 from its first GUEST_SYNC to its second. */
template <class Fn, class... Args>
static std::uint64_t timed_loop(GuestVm &g, Fn *entry, Args... args)
{
	Vcpu &v = g.add_vcpu(entry, args...);
	Ucall uc = g.run(v);
	check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 0, "expected SYNC(0), got %s",
	      uc.describe().c_str());
	auto t0 = Clock::now();
	uc = g.run(v);
	std::uint64_t ns = ns_since(t0);
	check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 1, "expected SYNC(1), got %s",
	      uc.describe().c_str());
	g.run_to_done(v);
	return ns;
}

/*
 * The baseline of (a): KVM's MSR filter denies guest writes to bench_msr,
 * KVM exits to userspace, a plain exit handler performs the write.
 */
static std::uint64_t bare_msr_exits(const System &sys)
{
	GuestVm g(sys);
	g.vm().enable_cap(KVM_CAP_X86_USER_SPACE_MSR, {KVM_MSR_EXIT_REASON_FILTER});
	std::uint8_t deny = 0;
	kvm_msr_filter filter{};
	filter.flags = KVM_MSR_FILTER_DEFAULT_ALLOW;
	filter.ranges[0] = {KVM_MSR_FILTER_WRITE, 1, bench_msr, &deny};
	if (ioctl(g.vm().fd(), KVM_X86_SET_MSR_FILTER, &filter) < 0)
		throw Error("KVM_X86_SET_MSR_FILTER", errno, "msr 0x174");
	std::uint64_t exits = 0;
	auto reg = g.vm().add_exit_handler([&](Vcpu &v, Exit &e) {
		auto *m = std::get_if<MsrExit>(&e);
		if (!m || !m->is_write() || m->index != bench_msr)
			return ExitAction::pass;
		v.set_msr(m->index, m->value());
		exits++;
		return ExitAction::resume;
	});
	std::uint64_t ns = timed_loop(g, guest_wrmsr_loop, n_events);
	check(exits == n_events, "bare MSR exits: %llu of %llu writes exited",
	      (unsigned long long)exits, (unsigned long long)n_events);
	check(g.vcpu(0).msr(bench_msr) == (n_events & 0xffff), "bare MSR exits: last value lost");
	return ns;
}

/*
 * The baseline of the single-step case: KVM_GUESTDBG_SINGLESTEP from the
 * guest's SYNC(0) to its SYNC(1), every KVM_EXIT_DEBUG resumed by a plain
 * exit handler. Returns the time and the number of steps.
 */
static std::pair<std::uint64_t, std::uint64_t> bare_debug_exits(const System &sys)
{
	GuestVm g(sys);
	std::uint64_t exits = 0;
	auto reg = g.vm().add_exit_handler([&](Vcpu &, Exit &e) {
		if (!std::holds_alternative<DebugExit>(e))
			return ExitAction::pass;
		exits++;
		return ExitAction::resume;
	});
	Vcpu &v = g.add_vcpu(guest_step_loop, n_step_iterations);
	Ucall uc = g.run(v);
	check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 0, "expected SYNC(0), got %s",
	      uc.describe().c_str());
	kvm_guest_debug dbg{};
	dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
	v.set_guest_debug(dbg);
	auto t0 = Clock::now();
	uc = g.run(v);
	std::uint64_t ns = ns_since(t0);
	check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 1, "expected SYNC(1), got %s",
	      uc.describe().c_str());
	v.set_guest_debug(kvm_guest_debug{});
	g.run_to_done(v);
	check(exits >= n_step_iterations, "bare debug exits: %llu steps for %llu iterations",
	      (unsigned long long)exits, (unsigned long long)n_step_iterations);
	return {ns, exits};
}

/* The tool: a thread with its own Session, answering every event CONTINUE. */
struct Tool {
	introspect::Listener listener;
	introspect::Session session;
	std::thread thread;
	std::atomic<bool> stop{false};
	std::atomic<std::uint64_t> events{0};
	std::string error;

	explicit Tool(const std::string &path) : listener(introspect::Listener::unix_socket(path)) {}
	~Tool()
	{
		stop = true;
		if (thread.joinable())
			thread.join();
	}

	void accept(std::chrono::milliseconds timeout)
	{
		session = introspect::Session::accept(listener, secret, timeout);
	}
	void serve()
	{
		thread = std::thread([this] {
			try {
				while (!stop.load()) {
					auto ev = session.next_event(std::chrono::milliseconds(100));
					if (!ev)
						continue;
					events++;
					session.reply(*ev, introspect::Action::continue_);
				}
			} catch (const std::exception &e) {
				error = e.what();
			}
		});
	}
	void join()
	{
		stop = true;
		if (thread.joinable())
			thread.join();
		check(error.empty(), "tool: %s", error.c_str());
	}
};

/* A GuestVm with an introspection connected to a Tool of this process. */
struct Introspected {
	GuestVm g;
	Tool tool;
	Introspection intro;

	Introspected(const System &sys, const std::string &path) : g(sys), tool(path)
	{
		IntrospectionOptions o;
		o.address = "unix:" + path;
		o.secret = secret;
		o.name = "kvmi-bench";
		std::thread t([&] { tool.accept(std::chrono::seconds(10)); });
		try {
			intro = Introspection::connect(g.vm(), o);
		} catch (...) {
			t.join();
			throw;
		}
		t.join();
		check(tool.session.connected(), "the tool did not get the connection");
	}
};

static std::string socket_path(const char *what)
{
	return "/tmp/kvmi-bench-" + std::to_string(::getpid()) + "-" + what + ".sock";
}

int main()
{
	auto start = Clock::now();
	try {
		System sys = System::open();
		for (long cap : {KVM_CAP_X86_USER_SPACE_MSR, KVM_CAP_X86_MSR_FILTER}) {
			if (!sys.check_extension(cap)) {
				std::printf("kvmi_bench: skipped: requires %s\n",
					    cap == KVM_CAP_X86_USER_SPACE_MSR
						    ? "KVM_CAP_X86_USER_SPACE_MSR"
						    : "KVM_CAP_X86_MSR_FILTER");
				return 4;
			}
		}
		std::printf("kvmi_bench: libvirtkit %s, %llu events per loop, %llu reads per size\n\n",
			    VIRTKIT_VERSION_STRING, (unsigned long long)n_events,
			    (unsigned long long)n_reads);

		/* (a) MSR events against bare filtered-WRMSR exits. */
		std::uint64_t bare = bare_msr_exits(sys);
		line("bare WRMSR exit (MSR filter)", per_event(bare, n_events));
		std::uint64_t kvmi;
		{
			Introspected in(sys, socket_path("msr"));
			/* vCPU commands address vCPUs that exist. */
			in.g.add_vcpu(guest_wrmsr_loop, n_events);
			in.tool.session.control_events(0, introspect::EventId::msr, true);
			in.tool.session.control_msr(0, bench_msr, true);
			in.tool.serve();
			Vcpu &v = in.g.vcpu(0);
			Ucall uc = in.g.run(v);
			check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 0,
			      "expected SYNC(0), got %s", uc.describe().c_str());
			std::uint64_t e0 = in.tool.events;
			auto t0 = Clock::now();
			uc = in.g.run(v);
			kvmi = ns_since(t0);
			check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 1,
			      "expected SYNC(1), got %s", uc.describe().c_str());
			std::uint64_t events = in.tool.events - e0;
			in.g.run_to_done(v);
			in.tool.join();
			check(events == n_events, "MSR events: %llu of %llu writes",
			      (unsigned long long)events, (unsigned long long)n_events);
			check(v.msr(bench_msr) == (n_events & 0xffff), "MSR events: last value lost");
		}
		line("MSR event round trip (CONTINUE)", per_event(kvmi, n_events));
		line("  ratio event / bare exit", fixed(kvmi, bare, 2));

		/* (b) breakpoints, where INT3 reaches the VMM. */
		auto events = Introspection::supported_events();
		if (std::find(events.begin(), events.end(), KVMI_EVENT_BREAKPOINT) == events.end()) {
			line("BREAKPOINT event round trip",
			     "not measured: INT3 in a guest does not reach the VMM on this host "
			     "(the server's probe)");
		} else {
			Introspected in(sys, socket_path("bp"));
			/* CONTINUE hands the #BP to the guest: its handler returns. */
			in.g.install_exception_handler(3, guest_bp_handler);
			in.g.add_vcpu(guest_int3_loop, n_events);
			in.tool.session.control_events(0, introspect::EventId::breakpoint, true);
			in.tool.serve();
			Vcpu &v = in.g.vcpu(0);
			Ucall uc = in.g.run(v);
			check(uc.kind == Ucall::Kind::sync, "expected SYNC(0), got %s",
			      uc.describe().c_str());
			auto t0 = Clock::now();
			std::uint64_t e0 = in.tool.events;
			uc = in.g.run(v);
			std::uint64_t ns = ns_since(t0);
			std::uint64_t n = in.tool.events - e0;
			check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 1,
			      "expected SYNC(1), got %s", uc.describe().c_str());
			in.g.run_to_done(v);
			in.tool.join();
			check(n == n_events, "BREAKPOINT events: %llu of %llu",
			      (unsigned long long)n, (unsigned long long)n_events);
			line("BREAKPOINT event round trip", per_event(ns, n_events));
		}

		/* (b) single-steps: SINGLESTEP events against bare debug exits. */
		auto [bare_ns, bare_steps] = bare_debug_exits(sys);
		std::printf("\n");
		line("bare debug exit (single-step)", per_event(bare_ns, bare_steps));
		{
			Introspected in(sys, socket_path("step"));
			in.g.add_vcpu(guest_step_loop, n_step_iterations);
			Vcpu &v = in.g.vcpu(0);
			Ucall uc = in.g.run(v);
			check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 0,
			      "expected SYNC(0), got %s", uc.describe().c_str());
			in.tool.session.control_events(0, introspect::EventId::singlestep, true);
			in.tool.session.control_singlestep(0, true);
			in.tool.serve();
			auto t0 = Clock::now();
			uc = in.g.run(v);
			std::uint64_t ns = ns_since(t0);
			check(uc.kind == Ucall::Kind::sync && uc.args.at(0) == 1,
			      "expected SYNC(1), got %s", uc.describe().c_str());
			in.tool.join();
			std::uint64_t steps = in.tool.events;
			in.tool.session.control_singlestep(0, false);
			in.g.run_to_done(v);
			/* The same guest code, stepped the same way: the same count. */
			check(steps == bare_steps, "SINGLESTEP events: %llu steps, bare: %llu",
			      (unsigned long long)steps, (unsigned long long)bare_steps);
			line("SINGLESTEP event round trip", per_event(ns, steps));
			line("  ratio event / bare debug exit",
			     fixed((unsigned __int128)ns * bare_steps,
				   (unsigned __int128)bare_ns * steps, 2));
		}

		/* (c) READ_PHYSICAL against memcpy. */
		{
			Introspected in(sys, socket_path("read"));
			in.g.memory().add(buf_gpa, buf_pages * 4096, {.name = "bench"});
			std::vector<std::byte> pattern(buf_pages * 4096);
			for (std::size_t i = 0; i < pattern.size(); i++)
				pattern[i] = std::byte(i * 7 + 3);
			in.g.memory().write(buf_gpa, pattern);
			std::vector<std::byte> out(8192), src(pattern.begin(), pattern.begin() + 8192);
			std::printf("\n");
			for (std::size_t size : {std::size_t{4096}, std::size_t{8192}}) {
				auto t0 = Clock::now();
				for (std::uint64_t i = 0; i < n_reads; i++)
					in.tool.session.read_physical(buf_gpa, std::span(out.data(), size));
				std::uint64_t ns = ns_since(t0);
				check(std::equal(out.begin(), out.begin() + size, pattern.begin()),
				      "READ_PHYSICAL %zu: wrong bytes", size);
				t0 = Clock::now();
				for (std::uint64_t i = 0; i < n_reads; i++) {
					std::memcpy(out.data(), src.data(), size);
					__asm__ volatile("" ::"r"(out.data()) : "memory");
				}
				std::uint64_t mc = ns_since(t0);
				std::string label = "READ_PHYSICAL " + std::to_string(size / 1024) + " KiB";
				line(label.c_str(), mbps(size * n_reads, ns) + "   " +
							    fixed(ns, n_reads * 1000, 1) + " us/read");
				label = "memcpy " + std::to_string(size / 1024) + " KiB";
				line(label.c_str(), mbps(size * n_reads, mc) + "   ratio memcpy / READ_PHYSICAL " +
							    fixed(ns, mc, 0));
			}
		}
	} catch (const std::exception &e) {
		std::fflush(stdout);
		std::fprintf(stderr, "kvmi_bench: FAILED: %s\n", e.what());
		return 1;
	}
	std::printf("\nkvmi_bench: done in %s s\n", fixed(ns_since(start), 1000000000ull, 1).c_str());
	return 0;
}
