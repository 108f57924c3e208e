// SPDX-License-Identifier: MIT
/*
 * kvmi_bench - what VM introspection costs, in figures.
 *
 * Not a test: no thresholds, a plain table on stdout. In one run it measures
 *   (a) the event round trips, with bench_rounds.hpp's fair comparison (the
 *       same hand-assembled guest code in two VMs, alternating rounds,
 *       median, spread and ratio of medians):
 *       MSR events: a guest loop of WRMSR to an MSR the tool intercepts;
 *       each write is an MSR event that the tool (a thread of this program,
 *       virtkit::introspect over a unix socket) answers CONTINUE. The
 *       baseline is a raw-ioctl VM running the same loop through KVM's MSR
 *       filter, whose KVM_RUN loop answers each KVM_EXIT_X86_WRMSR after one
 *       request/reply over a unix socket with a forked echo process (the
 *       size of an MSR event message, 32 bytes back): a raw exit of the
 *       same kind plus the one round trip between two processes that an
 *       event needs. The ratio is what the protocol and the library add.
 *       The MSR case runs twice: with the VMM's default reply polling
 *       (IntrospectionOptions::reply_poll; its goal line) and with it off.
 *       PF events: a guest loop of 8-byte writes to a page the tool made
 *       non-writable (SET_PAGE_ACCESS), each a PF event answered CONTINUE
 *       (the write is performed), against a raw VM whose page is a
 *       KVM_MEM_READONLY slot, each MMIO write exit completed after one
 *       echo round trip.
 *   (b) the same with guest breakpoints (INT3 -> BREAKPOINT event), where
 *       this host's KVM reports INT3 to the VMM at all (the server probes
 *       it; nested KVM under QEMU TCG and some hosts do not: then the line
 *       says so), and with single-steps: a loop of two instructions
 *       (rounds::blob_step) stepped instruction by instruction, each step a
 *       SINGLESTEP event answered CONTINUE, against a raw VM stepping the
 *       same loop with KVM_GUESTDBG_SINGLESTEP, each KVM_EXIT_DEBUG resumed
 *       after one echo round trip; the step counts must match;
 *   (c) READ_PHYSICAL throughput for 4 KiB and 64 KiB reads (a 64 KiB read
 *       is 16 page-sized commands on the wire), alternating rounds with
 *       memcpy of the same sizes in this process;
 *   (d) 64 KiB reads through the guest memory mapping
 *       (Session::map_guest_memory(), GuestMapping::read) against memcpy of
 *       the same size between two buffers of this process.
 * `kvmi_bench memory` runs only (c) and (d).
 * Each goal of issue 19 prints a "goal:" line; `make run-bench` collects
 * them into one table.
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

#include "bench_rounds.hpp"
#include "bench_util.hpp"

#include <linux/virtkit_kvmi.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
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
static constexpr std::uint64_t buf_pages = 16;
static constexpr int n_rounds = 7;
/* The echo round trip of the baselines: an event message's size there,
 * a reply's back. */
static constexpr std::size_t echo_request =
	sizeof(kvmi_msg_hdr) + sizeof(kvmi_event) + sizeof(kvmi_event_msr);
static constexpr std::size_t echo_reply = 32;
static constexpr const char *secret = "kvmi-bench";

/* Guest code. */

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
					if (ev->id == introspect::EventId::pf)
						session.reply_pf(*ev, introspect::Action::continue_);
					else
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

	Introspected(const System &sys, const std::string &path, bool share_memory = false)
		: g(sys), tool(path)
	{
		IntrospectionOptions o;
		o.share_memory = share_memory;
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

/* The guest-memory cases' baseline: n copies of size bytes in this process; ns. */
static std::uint64_t memcpy_loop(std::vector<std::byte> &out, const std::vector<std::byte> &src,
				 std::size_t size, std::uint64_t n)
{
	auto t0 = Clock::now();
	for (std::uint64_t i = 0; i < n; i++) {
		std::memcpy(out.data(), src.data(), size);
		__asm__ volatile("" ::"r"(out.data()) : "memory");
	}
	return ns_since(t0);
}

static std::string socket_path(const char *what)
{
	return "/tmp/kvmi-bench-" + std::to_string(::getpid()) + "-" + what + ".sock";
}

/*
 * (a) The baselines' second process: reads echo_request bytes, answers
 * echo_reply bytes, until EOF. Forked before any thread exists.
 */
struct Echo {
	int fd = -1;
	pid_t pid = -1;

	Echo()
	{
		int sv[2];
		check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0,
		      "socketpair: %s", std::strerror(errno));
		pid = ::fork();
		check(pid >= 0, "fork: %s", std::strerror(errno));
		if (pid == 0) {
			::close(sv[0]);
			char buf[echo_request];
			for (;;) {
				std::size_t got = 0;
				while (got < sizeof(buf)) {
					ssize_t r = ::read(sv[1], buf + got, sizeof(buf) - got);
					if (r <= 0)
						::_exit(0);
					got += r;
				}
				if (::write(sv[1], buf, echo_reply) != (ssize_t)echo_reply)
					::_exit(1);
			}
		}
		::close(sv[1]);
		fd = sv[0];
	}
	~Echo()
	{
		::close(fd);
		if (pid > 0)
			::waitpid(pid, nullptr, 0);
	}
	/* One request/reply. */
	void round_trip()
	{
		char buf[echo_request] = {};
		if (::write(fd, buf, sizeof(buf)) != (ssize_t)sizeof(buf)) /* timed: no strerror */
			check(false, "echo write: %s", std::strerror(errno));
		std::size_t got = 0;
		while (got < echo_reply) {
			ssize_t r = ::read(fd, buf + got, echo_reply - got);
			if (r <= 0)
				check(false, "echo read: %s", r ? std::strerror(errno) : "EOF");
			got += r;
		}
	}
};

/* The raw MSR baseline: KVM's MSR filter denies writes to bench_msr. */
struct RawMsr {
	rounds::RawVm raw{rounds::blob_wrmsr, sizeof(rounds::blob_wrmsr), false};

	RawMsr()
	{
		kvm_enable_cap cap{};
		cap.cap = KVM_CAP_X86_USER_SPACE_MSR;
		cap.args[0] = KVM_MSR_EXIT_REASON_FILTER;
		rounds::xioctl(raw.vm, KVM_ENABLE_CAP, &cap, "KVM_ENABLE_CAP");
		std::uint8_t deny = 0;
		kvm_msr_filter filter{};
		filter.flags = KVM_MSR_FILTER_DEFAULT_ALLOW;
		filter.ranges[0] = {KVM_MSR_FILTER_WRITE, 1, bench_msr, &deny};
		rounds::xioctl(raw.vm, KVM_X86_SET_MSR_FILTER, &filter, "KVM_X86_SET_MSR_FILTER");
	}
	std::uint64_t loop(Echo &echo, std::uint64_t n)
	{
		raw.set_regs(rounds::blob_regs(1, bench_msr, 0, n, 0));
		std::uint64_t exits = 0, last = 0;
		auto t0 = Clock::now();
		for (;;) {
			std::uint32_t reason = raw.enter();
			if (reason == KVM_EXIT_HLT)
				break;
			check(reason == KVM_EXIT_X86_WRMSR && raw.run->msr.index == bench_msr,
			      "raw MSR baseline: exit %u", reason);
			echo.round_trip();
			last = raw.run->msr.data;
			raw.run->msr.error = 0;
			exits++;
		}
		std::uint64_t ns = ns_since(t0);
		check(exits == n && last == n, "raw MSR baseline: %llu exits, last value %llu",
		      (unsigned long long)exits, (unsigned long long)last);
		return ns;
	}
};

/* The raw PF baseline: the page is a KVM_MEM_READONLY slot. */
struct RawPf {
	rounds::RawVm raw{rounds::blob_write, sizeof(rounds::blob_write), true};

	std::uint64_t loop(Echo &echo, std::uint64_t n)
	{
		return rounds::raw_readonly_writes(raw, n, "raw PF baseline",
						   [&] { echo.round_trip(); });
	}
};

/* The subjects: a libvirtkit VM running a blob, with an introspection. */
struct IntroBlob {
	Vm vm;
	Vcpu vcpu;
	Tool tool;
	Introspection intro;

	IntroBlob(const System &sys, int kvm_fd, const std::uint8_t *code, std::size_t len,
		  const std::string &path,
		  std::chrono::microseconds reply_poll = IntrospectionOptions{}.reply_poll)
		: vm(sys.create_vm()), vcpu(vm.create_vcpu(0)), tool(path)
	{
		vm.memory().add(rounds::ram_gpa, rounds::ram_size, {.name = "ram"});
		vm.memory().add(rounds::page_gpa, 4096, {.name = "page"});
		rounds::write_image(reinterpret_cast<std::uint8_t *>(
					    vm.memory().host_ptr(rounds::ram_gpa, rounds::ram_size)),
				    code, len);
		rounds::setup_long_mode(kvm_fd, vcpu.fd());
		IntrospectionOptions o;
		o.address = "unix:" + path;
		o.secret = secret;
		o.name = "kvmi-bench";
		o.reply_poll = reply_poll;
		std::thread t([&] { tool.accept(std::chrono::seconds(10)); });
		try {
			intro = Introspection::connect(vm, o);
		} catch (...) {
			t.join();
			throw;
		}
		t.join();
		check(tool.session.connected(), "the tool did not get the connection");
	}

	std::uint64_t last_events = 0; /* of the last loop() */

	/* Run the blob with regs to its HLT (blob_step: its port write): ns; n
	 * events (0: any number) must reach the tool. */
	std::uint64_t loop(const kvm_regs &regs, std::uint64_t n)
	{
		vcpu.set_regs(regs);
		std::uint64_t e0 = tool.events;
		auto t0 = Clock::now();
		for (;;) {
			Exit e = vcpu.run();
			if (std::holds_alternative<HltExit>(e))
				break;
			if (auto *io = std::get_if<IoExit>(&e); io && io->port == rounds::step_end_port)
				break;
			check(false, "introspected blob: unexpected exit %zu", e.index());
		}
		std::uint64_t ns = ns_since(t0);
		std::uint64_t events = tool.events - e0;
		last_events = events;
		check(!n || events == n, "introspected blob: %llu events for %llu operations",
		      (unsigned long long)events, (unsigned long long)n);
		return ns;
	}
};

static void event_round_trips(const System &sys, Echo &echo)
{
	int kvm_fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
	check(kvm_fd >= 0, "open /dev/kvm: %s", std::strerror(errno));
	std::printf("(a) event round trips against a raw exit of the same kind + one unix-socket "
		    "request/reply\n    with a second process (%zu bytes there, %zu back); the same "
		    "guest code in both VMs\n",
		    echo_request, echo_reply);
	/*
	 * MSR events with the VMM's default reply polling (the goal), then
	 * with polling off: what polling changes, measured in this run.
	 */
	for (bool polling : {true, false}) {
		RawMsr raw;
		IntroBlob in(sys, kvm_fd, rounds::blob_wrmsr, sizeof(rounds::blob_wrmsr),
			     socket_path("msr"),
			     polling ? IntrospectionOptions{}.reply_poll : std::chrono::microseconds(0));
		in.tool.session.control_events(0, introspect::EventId::msr, true);
		in.tool.session.control_msr(0, bench_msr, true);
		in.tool.serve();
		auto c = rounds::compare(
			polling ? "MSR event (WRMSR, CONTINUE)"
				: "MSR event (WRMSR, CONTINUE), the VMM's reply polling off (reply_poll = 0)",
			"event", n_rounds, n_events, "raw WRMSR exit (MSR filter) + echo",
			[&](std::uint64_t n) { return raw.loop(echo, n); },
			"libvirtkit KVMI MSR event round trip",
			[&](std::uint64_t n) {
				std::uint64_t ns =
					in.loop(rounds::blob_regs(1, bench_msr, 0, n, 0), n);
				check(in.vcpu.msr(bench_msr) == n, "MSR events: last value lost");
				return ns;
			});
		in.tool.join();
		if (polling)
			rounds::goal("KVMI MSR event round trip <= 1.3x raw WRMSR exit + socket RTT",
				     c.ratio() + "x (" + rounds::ps_str(c.subj.median()) + " vs " +
					     rounds::ps_str(c.base.median()) + ")",
				     c.ratio_x100() <= 130);
	}
	{
		RawPf raw;
		IntroBlob in(sys, kvm_fd, rounds::blob_write, sizeof(rounds::blob_write),
			     socket_path("pf"));
		in.tool.session.control_events(0, introspect::EventId::pf, true);
		introspect::PageAccess ro{rounds::page_gpa, introspect::access_r | introspect::access_x};
		in.tool.session.set_page_access(std::span(&ro, 1));
		in.tool.serve();
		auto c = rounds::compare(
			"PF event (write to a write-restricted page, CONTINUE)", "event", n_rounds,
			n_events, "raw read-only-slot write exit + echo",
			[&](std::uint64_t n) { return raw.loop(echo, n); },
			"libvirtkit KVMI PF event round trip",
			[&](std::uint64_t n) {
				std::uint64_t ns =
					in.loop(rounds::blob_regs(1, n, 0, 0, rounds::page_gpa), n);
				check(in.vm.memory().read_obj<std::uint64_t>(rounds::page_gpa) == n,
				      "PF events: the last write was not performed");
				return ns;
			});
		in.tool.join();
		rounds::goal("KVMI PF event round trip <= 1.3x raw RO-slot write exit + socket RTT",
			     c.ratio() + "x (" + rounds::ps_str(c.subj.median()) + " vs " +
				     rounds::ps_str(c.base.median()) + ")",
			     c.ratio_x100() <= 130);
	}
	::close(kvm_fd);
}

int main(int argc, char **argv)
{
	/* "memory": only the guest-memory cases (c) and (d). */
	const bool memory_only = argc > 1 && std::strcmp(argv[1], "memory") == 0;
	auto start = Clock::now();
	try {
		/* Before any thread exists: the baselines' second process. */
		Echo echo;
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

		if (!memory_only) {
			/* (a) MSR and PF events against raw exits + an echo round trip. */
			event_round_trips(sys, echo);
			std::printf("\n");

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

			/* (b) single-steps: SINGLESTEP events against raw debug exits + echo. */
			std::printf("\n");
			{
				int kvm_fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
				check(kvm_fd >= 0, "open /dev/kvm: %s", std::strerror(errno));
				rounds::RawVm raw(rounds::blob_step, sizeof(rounds::blob_step), false);
				kvm_guest_debug dbg{};
				dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
				rounds::xioctl(raw.vcpu, KVM_SET_GUEST_DEBUG, &dbg, "KVM_SET_GUEST_DEBUG");
				std::uint64_t raw_steps = 0;
				IntroBlob in(sys, kvm_fd, rounds::blob_step, sizeof(rounds::blob_step),
					     socket_path("step"));
				in.tool.session.control_events(0, introspect::EventId::singlestep, true);
				in.tool.session.control_singlestep(0, true);
				in.tool.serve();
				/* n steps: n / 2 iterations of two instructions. */
				auto c = rounds::compare(
					"SINGLESTEP event (CONTINUE)", "step", n_rounds, n_events,
					"raw KVM_EXIT_DEBUG (single-step) + echo",
					[&](std::uint64_t n) {
						raw.set_regs(rounds::blob_regs(0, 0, 0, n / 2, 0));
						raw_steps = 0;
						auto t0 = Clock::now();
						for (;;) {
							std::uint32_t reason = raw.enter();
							if (reason == KVM_EXIT_IO &&
							    raw.run->io.port == rounds::step_end_port)
								break;
							check(reason == KVM_EXIT_DEBUG,
							      "raw single-step: exit %u after %llu steps (mmio %#llx, rip %#llx)", reason, (unsigned long long)raw_steps,
							      (unsigned long long)raw.run->mmio.phys_addr,
							      (unsigned long long)raw.run->debug.arch.pc);
							echo.round_trip();
							raw_steps++;
						}
						return ns_since(t0);
					},
					"libvirtkit KVMI SINGLESTEP event round trip",
					[&](std::uint64_t n) {
						std::uint64_t ns = in.loop(rounds::blob_regs(0, 0, 0, n / 2, 0), 0);
						/* The same code, stepped the same way: the same count. */
						check(in.last_events == raw_steps,
						      "SINGLESTEP events: %llu steps, raw: %llu",
						      (unsigned long long)in.last_events,
						      (unsigned long long)raw_steps);
						return ns;
					});
				std::printf("  %-44s %10llu\n", "steps per loop (both)",
					    (unsigned long long)raw_steps);
				in.tool.join();
				in.tool.session.control_singlestep(0, false);
				::close(kvm_fd);
				(void)c;
			}
		}

		/* (c) READ_PHYSICAL against memcpy, in alternating rounds. */
		{
			Introspected in(sys, socket_path("read"));
			in.g.memory().add(buf_gpa, buf_pages * 4096, {.name = "bench"});
			std::vector<std::byte> pattern(buf_pages * 4096);
			for (std::size_t i = 0; i < pattern.size(); i++)
				pattern[i] = std::byte(i * 7 + 3);
			in.g.memory().write(buf_gpa, pattern);
			std::vector<std::byte> out(pattern.size()), src = pattern;
			std::printf("\n");
			for (std::size_t size : {std::size_t{4096}, std::size_t{65536}}) {
				std::uint64_t reads = n_reads * 4096 / size;
				std::string what = "(c) READ_PHYSICAL " + std::to_string(size / 1024) + " KiB";
				auto c = rounds::compare(
					what.c_str(), "read", n_rounds, reads, "memcpy in this process",
					[&](std::uint64_t n) { return memcpy_loop(out, src, size, n); },
					"libvirtkit READ_PHYSICAL (tool side)",
					[&](std::uint64_t n) {
						std::fill(out.begin(), out.end(), std::byte{0});
						auto t0 = Clock::now();
						for (std::uint64_t i = 0; i < n; i++)
							in.tool.session.read_physical(
								buf_gpa, std::span(out.data(), size));
						std::uint64_t ns = ns_since(t0);
						check(std::equal(out.begin(), out.begin() + size,
								 pattern.begin()),
						      "READ_PHYSICAL %zu: wrong bytes", size);
						return ns;
					});
				/* bytes per ns = GB/s; the median read's */
				std::uint64_t med_ps = c.subj.median();
				std::string gbs = fixed((unsigned __int128)size * 1000, med_ps, 2) + " GB/s";
				std::printf("  %-44s %10s   memcpy %s GB/s\n", "READ_PHYSICAL throughput",
					    gbs.c_str(),
					    fixed((unsigned __int128)size * 1000, c.base.median(), 2).c_str());
				if (size == 65536)
					rounds::goal("READ_PHYSICAL 64 KiB >= 1.5 GB/s",
						     gbs + " (" + rounds::ps_str(med_ps) + "/read)",
						     med_ps && (unsigned __int128)size * 1000 * 100 / med_ps >= 150);
			}
		}

		/* (d) reads through the shared mapping against memcpy, in alternating rounds. */
		{
			Introspected in(sys, socket_path("map"), true);
			in.g.memory().add(buf_gpa, buf_pages * 4096, {.name = "bench"});
			std::vector<std::byte> pattern(buf_pages * 4096);
			for (std::size_t i = 0; i < pattern.size(); i++)
				pattern[i] = std::byte(i * 5 + 1);
			in.g.memory().write(buf_gpa, pattern);
			auto map = in.tool.session.map_guest_memory();
			const std::size_t size = 65536;
			std::vector<std::byte> out(size), src = pattern;
			std::printf("\n");
			auto c = rounds::compare(
				"(d) guest memory mapping, 64 KiB reads", "read", n_rounds,
				n_reads * 4096 / size * 16, "memcpy in this process",
				[&](std::uint64_t n) { return memcpy_loop(out, src, size, n); },
				"GuestMapping::read (tool side)",
				[&](std::uint64_t n) {
					std::fill(out.begin(), out.end(), std::byte{0});
					auto t0 = Clock::now();
					for (std::uint64_t i = 0; i < n; i++) {
						map.read(buf_gpa, out);
						__asm__ volatile("" ::"r"(out.data()) : "memory");
					}
					std::uint64_t ns = ns_since(t0);
					check(std::equal(out.begin(), out.end(), pattern.begin()),
					      "GuestMapping::read: wrong bytes");
					return ns;
				});
			std::uint64_t med_ps = c.subj.median();
			std::string gbs = fixed((unsigned __int128)size * 1000, med_ps, 2) + " GB/s";
			std::printf("  %-44s %10s   memcpy %s GB/s\n", "mapping throughput", gbs.c_str(),
				    fixed((unsigned __int128)size * 1000, c.base.median(), 2).c_str());
			/* subject time / memcpy time <= 1.25 is >= 0.8x memcpy's speed */
			rounds::goal("guest memory mapping read 64 KiB >= 0.8x memcpy",
				     gbs + " = " + fixed(c.base.median(), med_ps, 2) + "x memcpy",
				     med_ps && c.base.median() * 100 >= med_ps * 80);
		}
	} catch (const std::exception &e) {
		std::fflush(stdout);
		std::fprintf(stderr, "kvmi_bench: FAILED: %s\n", e.what());
		return 1;
	}
	std::printf("\nkvmi_bench: done in %s s\n", fixed(ns_since(start), 1000000000ull, 1).c_str());
	return 0;
}
