// SPDX-License-Identifier: MIT
/*
 * virtkit demo - run a small guest end to end and explain what it shows.
 *
 * This is the host side: it builds one GuestVm, runs the guest functions of
 * demo_guest.cpp on it step by step, answers the guest's port I/O and MMIO in
 * its own run loops (Vcpu::run() and the Exit variant), checks every value
 * the guest reports, and prints what happened in plain sentences. Any
 * mismatch ends the demo with the step and the reason (exit status 1).
 */
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <future>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include <virtkit/introspect.hpp>
#include <virtkit/introspection.hpp>
#include <virtkit/virtkit.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include "commands.hpp"
#include "demo_guest.hpp"
#include "demo_tool.hpp"
#include "../common/hex.hpp"
#include "../common/listen_address.hpp"
#include "../common/secret.hpp"

namespace virtkit::tool {

const char demo_help[] =
	"usage: virtkit demo [--device PATH] [--introspect ADDRESS\n"
	"                    [--secret-file PATH | --secret-fd N | --secret SECRET]\n"
	"                    [--share-memory]]\n"
	"\n"
	"Run a small guest on KVM with libvirtkit and explain, step by step, what\n"
	"each step shows: guest code that is an ordinary function of this program,\n"
	"arguments and results, guest memory read by the host, port I/O and MMIO\n"
	"exits answered by the host, guest exceptions, two vCPUs running at the\n"
	"same time, sub-page write protection (a guest write blocked and reported,\n"
	"another one landing), VM introspection (a KVMI tool pauses the vCPUs,\n"
	"reads their registers, denies an MSR write, sees a write to a protected\n"
	"page, and detaches), and what an exit costs on this host. Every value\n"
	"the guest reports is checked; the last line is \"demo: ok\".\n"
	"\n"
	"By default the introspection tool is a thread of the demo. With\n"
	"--introspect, the VM connects to an outside tool instead, retrying for\n"
	"10 s until it listens, for example\n"
	"  virtkit-introspect --listen unix:/tmp/vk.sock --secret-file key \\\n"
	"                     --msr 0xc0000102 --count 10 &\n"
	"  virtkit demo --introspect unix:/tmp/vk.sock --secret-file key\n"
	"There vCPU 0 writes MSR 0xc0000102 (MSR_KERNEL_GS_BASE) up to 20 times,\n"
	"with a port exit after each, until the tool detaches; the demo waits up\n"
	"to 60 s for that and shows what the guest observed. A tool still attached\n"
	"when vCPU 0 is done sees a vCPU added (CREATE_VCPU), then the VMM calls\n"
	"unhook() (UNHOOK) and gives it 2 s to let go.\n"
	"\n"
	"Options:\n"
	"  --device PATH         KVM device to use (default /dev/kvm)\n"
	"  --introspect ADDRESS  the tool's socket: unix:/path or vsock:CID:PORT\n"
	"  --secret-file PATH    the secret the tool was given (with --introspect): the\n"
	"                        file's content, less one trailing newline\n"
	"  --secret-fd N         the same, read from descriptor N (then closed)\n"
	"  --secret SECRET       the same, on the command line (every user can see it\n"
	"                        in /proc: for tests only). Without any of them, any\n"
	"                        tool is accepted, with a warning\n"
	"  --share-memory        let the tool map guest RAM read-only (with\n"
	"                        --introspect; IntrospectionOptions::share_memory):\n"
	"                        a trusted tool reads any guest memory without commands\n"
	"  -h, --help            show this help\n"
	"\n"
	"Exit status: 0 when every step worked, 1 when one failed (the step and\n"
	"the reason go to stderr), 2 on a usage error.\n";

namespace {

using namespace virtkit::x86;
using namespace virtkit::tool::demo;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr int total_steps = 9;
constexpr std::uint64_t buffer_size = 8192;
constexpr std::uint64_t unmapped_gva = 0x40000000000ull;
constexpr std::uint64_t worker_iterations = 1000000;
constexpr std::uint64_t bench_exits = 2000;
constexpr std::uint32_t device_id = 0x54494b56; /* "VKIT" in little-endian bytes */
/* How long the demo waits for an outside tool: to listen, to detach. */
constexpr auto tool_listen_patience = 10s;
constexpr auto tool_detach_timeout = 60s;
constexpr auto tool_unhook_timeout = 2000ms;
constexpr auto tool_setup_quiet = 300ms;	/* no command for this long: set up */
constexpr auto tool_setup_patience = 5s;

/* Where the introspection step finds its tool. */
struct ToolAddress {
	std::string address; /* empty: the in-process tool */
	std::string secret;
	bool share_memory = false; /* --share-memory */
};

/* A check of a value the guest reported that did not hold. */
class DemoFailure : public std::runtime_error {
public:
	using std::runtime_error::runtime_error;
};

template <class... F> struct overloaded : F... {
	using F::operator()...;
};


/* Explanations: word-wrapped, indented paragraphs. */
void explain(const std::string &text)
{
	constexpr std::size_t width = 76;
	std::size_t col = 0, i = 0;

	while (i < text.size()) {
		std::size_t j = text.find(' ', i);
		if (j == std::string::npos)
			j = text.size();
		std::string word = text.substr(i, j - i);
		if (col && col + 1 + word.size() > width) {
			std::printf("\n");
			col = 0;
		}
		std::printf("%s%s", col ? " " : "  ", word.c_str());
		col += (col ? 1 : 2) + word.size();
		i = j + 1;
	}
	std::printf("\n");
}

/* Observed values: "    key: value". */
__attribute__((format(printf, 1, 2))) void show(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	std::printf("    ");
	std::vprintf(fmt, ap);
	std::printf("\n");
	va_end(ap);
}

void check(bool ok, const std::string &what)
{
	if (!ok)
		throw DemoFailure(what);
}

/* Counts every exit of every vCPU, by kind, before anything else sees it. */
class ExitCounter {
public:
	static constexpr std::size_t kinds = std::variant_size_v<Exit>;

	explicit ExitCounter(Vm &vm)
	{
		reg_ = vm.add_exit_handler(
			[this](Vcpu &, Exit &e) {
				by_kind_[e.index()].fetch_add(1, std::memory_order_relaxed);
				auto *io = std::get_if<IoExit>(&e);
				if (io && io->port == VIRTKIT_UCALL_PORT)
					ucalls_.fetch_add(1, std::memory_order_relaxed);
				if (std::holds_alternative<MsrExit>(e))
					msrs_.fetch_add(1, std::memory_order_relaxed);
				return ExitAction::pass;
			},
			INT_MIN);
	}

	std::uint64_t total() const
	{
		std::uint64_t n = 0;
		for (auto &k : by_kind_)
			n += k.load();
		return n;
	}

	/* RDMSR/WRMSR exits: KVM's MSR filter sent them to this process. */
	std::uint64_t msr_exits() const { return msrs_.load(); }

	std::string summary() const
	{
		static const char *const names[kinds] = {
			"port I/O", "MMIO", "HLT", "debug", "MSR", "shutdown", "failed entry",
			"internal error", "system event", "memory fault", "interrupted",
			"unknown", "SPP violation"};
		std::string s;
		for (std::size_t i = 0; i < kinds; i++) {
			if (!by_kind_[i])
				continue;
			s += (s.empty() ? "" : "; ") + std::string(names[i]) + " " +
			     std::to_string(by_kind_[i].load());
			if (i == 0)
				s += ", of which " + std::to_string(ucalls_.load()) + " ucalls";
		}
		return s;
	}

private:
	std::atomic<std::uint64_t> by_kind_[kinds] = {};
	std::atomic<std::uint64_t> ucalls_ = 0;
	std::atomic<std::uint64_t> msrs_ = 0;
	ExitHandlerRegistration reg_;
};

/*
 * Run a vCPU until GUEST_DONE, returning its GUEST_SYNCs. Exits that are not
 * ucalls go to device(), which returns false for exits it does not expect.
 */
std::vector<Ucall> run_with_device(GuestVm &g, Vcpu &v, const std::function<bool(Exit &)> &device)
{
	std::vector<Ucall> syncs;

	for (;;) {
		Exit exit = v.run();
		if (auto uc = g.ucall(v, exit)) {
			switch (uc->kind) {
			case Ucall::Kind::sync:
				syncs.push_back(*uc);
				continue;
			case Ucall::Kind::done:
				return syncs;
			default:
				throw GuestFailure(uc->describe(), uc);
			}
		}
		if (!device(exit))
			throw GuestFailure("unexpected exit: " + describe(exit) +
					   " at rip=" + hex(v.regs().rip));
	}
}

/* GuestVm::run() and expect a GUEST_SYNC with at least n values. */
Ucall expect_sync(GuestVm &g, Vcpu &v, std::size_t n)
{
	Ucall uc = g.run(v);
	check(uc.kind == Ucall::Kind::sync && uc.args.size() >= n,
	      "expected GUEST_SYNC with " + std::to_string(n) + " values, got " + uc.describe());
	return uc;
}

/* A directory only this process uses, removed with its contents. */
class PrivateDir {
public:
	PrivateDir()
	{
		const char *t = std::getenv("TMPDIR");
		std::string tmpl = std::string(t && *t ? t : "/tmp") + "/virtkit-demo-XXXXXX";
		if (!::mkdtemp(tmpl.data()))
			throw Error("mkdtemp", errno, tmpl);
		path_ = tmpl;
	}
	~PrivateDir()
	{
		std::error_code ec;
		std::filesystem::remove_all(path_, ec);
	}
	PrivateDir(const PrivateDir &) = delete;
	PrivateDir &operator=(const PrivateDir &) = delete;
	const std::string &path() const noexcept { return path_; }

private:
	std::string path_;
};

/* bytes random bytes, as hex: a secret nobody else knows. */
std::string random_hex(std::size_t bytes)
{
	std::random_device rd;
	std::string s;
	for (std::size_t i = 0; i < 2 * bytes; i++)
		s += "0123456789abcdef"[rd() & 15];
	return s;
}

/*
 * Connect the VM to a tool that may not listen yet: retry while its socket
 * is missing or refuses, for at most patience.
 */
Introspection connect_when_listening(Vm &vm, const IntrospectionOptions &o,
				     std::chrono::milliseconds patience)
{
	auto end = Clock::now() + patience;
	for (;;) {
		try {
			return Introspection::connect(vm, o);
		} catch (const Error &e) {
			/* ECONNRESET: nobody listens on a vsock port. */
			bool absent = e.err() == ENOENT || e.err() == ECONNREFUSED ||
				      e.err() == ECONNRESET;
			if (!absent || Clock::now() >= end)
				throw;
		}
		std::this_thread::sleep_for(100ms);
	}
}

/*
 * The introspection step's vCPUs, each on a thread of its own until
 * GUEST_DONE, collecting its GUEST_SYNCs. set() raises one of the flags
 * the guest waits on (intro_go, intro_released); the destructor raises
 * both, so that a failure anywhere cannot leave a vCPU spinning, and joins.
 */
class GuestThreads {
public:
	GuestThreads(GuestVm &g, std::uint64_t ctl_gva)
		: g_(g), ctl_gpa_(*g.gva_to_gpa(ctl_gva)), results_(g.vcpu_count())
	{
		try {
			for (std::size_t i = 0; i < results_.size(); i++)
				threads_.emplace_back([this, i] { run(i); });
		} catch (...) {
			join_all(); /* the threads that did start */
			throw;
		}
	}
	~GuestThreads() { join_all(); }
	GuestThreads(const GuestThreads &) = delete;
	GuestThreads &operator=(const GuestThreads &) = delete;

	void set(std::uint64_t flag)
	{
		auto *p = g_.memory().host_ptr(ctl_gpa_ + flag, sizeof(std::uint64_t));
		auto &f = *reinterpret_cast<std::uint64_t *>(p);
		std::atomic_ref(f).store(1, std::memory_order_release);
	}

	/* Raise both flags, wait for every vCPU's GUEST_DONE; the GUEST_SYNCs of each. */
	std::vector<std::vector<Ucall>> join()
	{
		join_all();
		std::vector<std::vector<Ucall>> syncs;
		for (auto &r : results_) {
			if (r.error)
				std::rethrow_exception(r.error);
			syncs.push_back(std::move(r.syncs));
		}
		return syncs;
	}

private:
	struct Result {
		std::vector<Ucall> syncs;
		std::exception_ptr error;
	};

	void run(std::size_t i) noexcept
	{
		try {
			results_[i].syncs =
				run_with_device(g_, g_.vcpu(i), [](Exit &) { return false; });
		} catch (...) {
			results_[i].error = std::current_exception();
		}
	}

	void join_all()
	{
		set(intro_go);
		set(intro_released);
		threads_.clear(); /* jthread joins */
	}

	GuestVm &g_;
	std::uint64_t ctl_gpa_;
	std::vector<Result> results_;
	std::vector<std::jthread> threads_;
};

struct Demo {
	GuestVm g;
	ExitCounter exits;
	int step_no = 0;
	std::string step_title;
	std::uint64_t step_exits = 0;

	explicit Demo(const System &s)
		: g(s, options()), exits(g.vm())
	{
	}

	static GuestOptions options()
	{
		GuestOptions o;
		o.print = [](std::uint32_t vcpu, std::string_view text) {
			std::printf("    guest vCPU %u printed: %.*s\n", vcpu, int(text.size()),
				    text.data());
		};
		return o;
	}

	void step(const char *title)
	{
		step_no++;
		step_title = title;
		step_exits = exits.total();
		std::printf("\n[%d/%d] %s\n", step_no, total_steps, title);
	}

	void step_done()
	{
		show("exits to the host in this step: %llu",
		     (unsigned long long)(exits.total() - step_exits));
	}

	void hello();
	void compute();
	void ports();
	void mmio();
	void exceptions();
	void two_vcpus();
	void subpages();
	void introspection(const ToolAddress &outside);
	bool late_vcpu(Introspection &vmm);
	void timing();

private:
	void watched_by_demo_tool(IntrospectionOptions &o, std::uint64_t ctl, std::uint64_t page);
	void watched_by_outside_tool(IntrospectionOptions &o, std::uint64_t ctl,
				     const ToolAddress &outside);
};

void Demo::hello()
{
	step("Guest code is an ordinary function of this program");
	explain("GuestVm created a VM with 64 MiB of guest RAM, built 4-level page tables, "
		"and loaded every page of this executable into the guest at the same virtual "
		"address it has here. So the function guest_hello() of this binary is a "
		"guest entry point: vCPU 0 starts there, in 64-bit mode at CPL0. It prints a "
		"line with GUEST_PRINTF (formatted inside the guest, printed by the host) "
		"and reports its registers with GUEST_SYNC.");
	Vcpu &v = g.add_vcpu(guest_hello);
	Ucall uc = expect_sync(g, v, 5);
	auto entry = reinterpret_cast<std::uint64_t>(&guest_hello);
	std::uint64_t rip = uc.args[0], cs = uc.args[1], cr0 = uc.args[2], cr4 = uc.args[3],
		      efer = uc.args[4];
	show("guest_hello() is at %s in this executable", hex(entry).c_str());
	show("the guest reported rip=%s (%llu bytes into guest_hello), cs=%s (CPL%llu)",
	     hex(rip).c_str(), (unsigned long long)(rip - entry), hex(cs).c_str(),
	     (unsigned long long)(cs & 3));
	bool paging = cr0 >> 31 & 1, pae = cr4 >> 5 & 1, lma = efer >> 10 & 1;
	show("CR0.PG=%d CR4.PAE=%d EFER.LMA=%d: %s", paging, pae, lma,
	     paging && pae && lma ? "64-bit long mode with paging" : "NOT long mode");
	check(rip - entry < 4096, "the guest's rip " + hex(rip) + " is not in guest_hello at " +
					  hex(entry));
	check(paging && pae && lma && (cs & 3) == 0, "the guest is not in 64-bit mode at CPL0");
	g.run_to_done(v);
	step_done();
}

void Demo::compute()
{
	step("Arguments in, results out, memory shared with the host");
	explain("The host restarts vCPU 0 at guest_compute(n, buffer, size, seed): the four "
		"arguments arrive in registers, as in any call. The guest computes "
		"fibonacci(n) and reports it with GUEST_SYNC. Then it fills an 8 KiB buffer "
		"of guest memory with a pseudo-random pattern, writes a text at its start and "
		"reports the buffer's FNV-1a hash. The host reads the same bytes through its "
		"own mapping of guest RAM - no copy, no exit - and hashes them with the same "
		"function compiled into this binary.");
	Vcpu &v = g.vcpu(0);
	std::uint64_t buf = g.alloc_vaddr(buffer_size);
	g.set_entry(v, guest_compute, fib_n, buf, buffer_size, pattern_seed);

	Ucall uc = expect_sync(g, v, 2);
	show("guest: fibonacci(%llu) = %llu", (unsigned long long)uc.args[0],
	     (unsigned long long)uc.args[1]);
	std::uint64_t want = fibonacci(fib_n);
	show("host:  fibonacci(%llu) = %llu", (unsigned long long)fib_n, (unsigned long long)want);
	check(uc.args[0] == fib_n && uc.args[1] == want, "the guest's fibonacci differs");

	uc = expect_sync(g, v, 2);
	std::uint64_t gpa = *g.gva_to_gpa(buf);
	auto *host = reinterpret_cast<const std::uint8_t *>(g.memory().host_ptr(gpa, buffer_size));
	std::uint64_t hash = fnv1a(host, buffer_size);
	std::string text(reinterpret_cast<const char *>(host), uc.args[1]);
	show("buffer: guest-virtual %s, guest-physical %s, host address %p", hex(buf).c_str(),
	     hex(gpa).c_str(), static_cast<const void *>(host));
	show("guest: FNV-1a of the buffer = %s", hex(uc.args[0]).c_str());
	show("host:  FNV-1a of the buffer = %s", hex(hash).c_str());
	show("text the host found at the start: \"%s\"", text.c_str());
	check(uc.args[0] == hash, "the hash of the buffer differs between guest and host");
	check(text == guest_message, "the host did not find the guest's text");

	/* And the pattern after the text is the one the host computes. */
	std::vector<std::uint8_t> expect(buffer_size);
	fill_pattern(expect.data(), buffer_size, pattern_seed);
	std::size_t from = text.size() + 1;
	check(std::equal(expect.begin() + from, expect.end(), host + from),
	      "the pattern in the buffer is not the one the host computes");
	g.run_to_done(v);
	step_done();
}

void Demo::ports()
{
	step("Port I/O: the host plays a device");
	explain("Here the host runs the vCPU itself with Vcpu::run(), which returns each exit "
		"as a typed Exit variant. The guest executes IN from port 0x5000 twice; each "
		"IN leaves the guest, and the host completes it with IoExit::set() before "
		"re-entering. The guest multiplies the two answers and writes the product with "
		"OUT to port 0x5004, then a text one byte at a time to port 0x5008, which the "
		"host collects like a serial console.");
	Vcpu &v = g.vcpu(0);
	g.set_entry(v, guest_ports);

	const std::uint32_t answers[] = {6, 7};
	std::size_t asked = 0;
	std::uint64_t product = 0;
	std::string console;
	/* The device: a handler for the exits it expects, false for any other. */
	auto on_io = [&](IoExit &io) {
		if (io.port == port_ask && io.is_in() && asked < 2) {
			io.set(answers[asked]);
			show("IN  port %s (%u bytes): host answered %u", hex(io.port).c_str(),
			     io.size, answers[asked]);
			asked++;
		} else if (io.port == port_answer && io.is_out()) {
			product = io.value();
			show("OUT port %s (%u bytes): guest wrote %llu", hex(io.port).c_str(),
			     io.size, (unsigned long long)product);
		} else if (io.port == port_console && io.is_out()) {
			console += char(io.value());
		} else {
			return false;
		}
		return true;
	};
	auto syncs = run_with_device(g, v, [&](Exit &exit) {
		return std::visit(overloaded{on_io, [](auto &) { return false; }}, exit);
	});
	if (!console.empty() && console.back() == '\n')
		console.pop_back();
	show("console port: \"%s\" (%zu OUT exits, one per byte)", console.c_str(),
	     console.size() + 1);
	check(asked == 2 && product == 42, "the guest did not report 6 x 7 = 42 on port 0x5004");
	check(syncs.size() == 1 && syncs[0].args.size() == 3 && syncs[0].args[2] == 42,
	      "the guest's GUEST_SYNC does not confirm 6 x 7 = 42");
	step_done();
}

void Demo::mmio()
{
	step("MMIO: memory that no RAM backs");
	explain("The host maps guest-virtual " + hex(mmio_base) + " to the same guest-physical "
		"address, where there is no memory. A guest load from there exits to the host "
		"as an MMIO read: KVM has decoded the instruction, the host supplies the value "
		"with MmioExit::set(), and KVM completes the load when the vCPU runs again. A "
		"guest store exits as an MMIO write carrying the address and data.");
	g.identity_map(mmio_base, GuestMemory::page_size);
	Vcpu &v = g.vcpu(0);
	g.set_entry(v, guest_mmio);

	bool read = false, written = false;
	std::uint64_t doorbell = 0;
	auto on_mmio = [&](MmioExit &m) {
		if (m.is_read() && m.gpa == mmio_id && m.data.size() == 4) {
			m.set(device_id);
			show("MMIO read  gpa=%s (%zu bytes): host answered %s (\"VKIT\")",
			     hex(m.gpa).c_str(), m.data.size(), hex(device_id).c_str());
			read = true;
		} else if (m.is_write() && m.gpa == mmio_doorbell) {
			doorbell = m.value();
			show("MMIO write gpa=%s (%zu bytes): guest wrote %s", hex(m.gpa).c_str(),
			     m.data.size(), hex(doorbell).c_str());
			written = true;
		} else {
			return false;
		}
		return true;
	};
	auto syncs = run_with_device(g, v, [&](Exit &exit) {
		return std::visit(overloaded{on_mmio, [](auto &) { return false; }}, exit);
	});
	check(read && written, "the guest did not make both MMIO accesses");
	check(syncs.size() == 1 && syncs[0].args.at(0) == device_id,
	      "the guest did not see the value the host supplied");
	show("the guest confirmed it read %s", hex(syncs[0].args[0]).c_str());
	check(doorbell == (std::uint64_t(device_id) << 32 | 0x600d),
	      "the guest wrote " + hex(doorbell) + " to the doorbell, expected " +
		      hex(std::uint64_t(device_id) << 32 | 0x600d));
	step_done();
}

void Demo::exceptions()
{
	step("Guest exceptions");
	explain("GuestVm gives the guest an IDT. guest_catch(fn, arg, &ex) runs fn and, if it "
		"raises an exception, abandons it and returns the vector, error code, CR2 and "
		"RIP instead - the guest handles its own faults without leaving. The guest "
		"executes UD2 (invalid opcode), then writes to " + hex(unmapped_gva) +
		", which its page tables do not map.");
	check(!g.gva_to_gpa(unmapped_gva), hex(unmapped_gva) + " is unexpectedly mapped");
	Vcpu &v = g.vcpu(0);
	g.set_entry(v, guest_exceptions, unmapped_gva);

	Ucall ud = expect_sync(g, v, 4);
	auto ud_fn = reinterpret_cast<std::uint64_t>(&guest_raise_ud);
	show("UD2:   guest_catch returned %llu: %s (vector %llu) at rip=%s (guest_raise_ud+%llu)",
	     (unsigned long long)ud.args[0], exception_name(ud.args[1]).c_str(),
	     (unsigned long long)ud.args[1], hex(ud.args[3]).c_str(),
	     (unsigned long long)(ud.args[3] - ud_fn));
	check(ud.args[0] == UD_VECTOR + 1 && ud.args[1] == UD_VECTOR && ud.args[3] - ud_fn < 64,
	      "expected #UD in guest_raise_ud, got " + ud.describe());

	Ucall pf = expect_sync(g, v, 5);
	std::uint64_t code = pf.args[2];
	show("write: guest_catch returned %llu: %s (vector %llu), error code %s (%s, %s), cr2=%s",
	     (unsigned long long)pf.args[0], exception_name(pf.args[1]).c_str(),
	     (unsigned long long)pf.args[1], hex(code).c_str(),
	     code & PFERR_WRITE ? "write" : "read",
	     code & PFERR_PRESENT ? "protection violation" : "page not present",
	     hex(pf.args[3]).c_str());
	check(pf.args[0] == PF_VECTOR + 1 && pf.args[1] == PF_VECTOR && code == PFERR_WRITE &&
		      pf.args[3] == unmapped_gva,
	      "expected #PF (write, not present) at " + hex(unmapped_gva) + ", got " +
		      pf.describe());
	g.run_to_done(v);
	show("the guest continued after both and finished normally");
	step_done();
}

void Demo::two_vcpus()
{
	step("Two vCPUs at the same time");
	explain("The host adds vCPU 1 and runs each vCPU on its own host thread. Both run "
		"guest_worker(): they wait for each other, then each increments a counter in "
		"shared guest memory " + std::to_string(worker_iterations) + " times with an "
		"atomic LOCK XADD, and counts how often the counter had moved on between two of "
		"its own increments - the other vCPU's work, i.e. both ran at the same time. "
		"The host then reads the counter through its mapping.");
	std::uint64_t shared = g.alloc_vaddr(GuestMemory::page_size);
	Vcpu &v0 = g.vcpu(0);
	g.set_entry(v0, guest_worker, shared, worker_iterations);
	Vcpu &v1 = g.add_vcpu(guest_worker, shared, worker_iterations);

	struct Result {
		Ucall sync;
		std::exception_ptr error;
	} results[2];
	auto worker = [this](Vcpu &v, Vcpu &other, Result &r) {
		try {
			r.sync = expect_sync(g, v, 3);
			g.run_to_done(v);
		} catch (...) {
			r.error = std::current_exception();
			/* The other vCPU may wait for this one forever: stop it. */
			other.kick();
		}
	};
	auto start = Clock::now();
	{
		std::jthread t0(worker, std::ref(v0), std::ref(v1), std::ref(results[0]));
		std::jthread t1(worker, std::ref(v1), std::ref(v0), std::ref(results[1]));
	}
	double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
	for (auto &r : results)
		if (r.error)
			std::rethrow_exception(r.error);

	for (auto &r : results)
		show("vCPU %llu: %llu increments, saw the other vCPU's increments %llu times",
		     (unsigned long long)r.sync.args[0], (unsigned long long)r.sync.args[1],
		     (unsigned long long)r.sync.args[2]);
	auto counter = g.memory().read_obj<std::uint64_t>(*g.gva_to_gpa(shared));
	show("counter read by the host: %llu (expected %llu), both vCPUs done in %.1f ms",
	     (unsigned long long)counter, (unsigned long long)(2 * worker_iterations), ms);
	if (results[0].sync.args[2] && results[1].sync.args[2])
		show("each vCPU saw the other's increments: they ran at the same time");
	else
		show("this time they did not overlap: the host ran one vCPU's loop to the end "
		     "before the other's started");
	check(results[0].sync.args[0] != results[1].sync.args[0],
	      "both results came from the same vCPU");
	check(counter == 2 * worker_iterations, "increments were lost: the counter is " +
							std::to_string(counter));
	step_done();
}

void Demo::subpages()
{
	constexpr std::uint64_t sub = SubpageProtection::subpage_size;
	constexpr std::uint64_t old = 0xeeeeeeeeeeeeeeeeull;
	const std::uint32_t map = ~(1u << spp_blocked_subpage);

	step("Sub-page protection: 128 bytes of a page read-only for the guest");
	explain("SubpageProtection::enable(vm) gives the VM sub-page write protection: every "
		"4 KiB page has a 32-bit access map, one bit per 128-byte sub-page, and a guest write "
		"that touches a protected sub-page is not performed but reported to the host. "
		"The host fills a fresh page of guest RAM with 0xee through its own mapping "
		"(the VMM's writes are never restricted) and sets its map to " + hex(map) +
		": everything writable except sub-page " + std::to_string(spp_blocked_subpage) +
		". guest_spp() then stores 8 bytes into sub-page " +
		std::to_string(spp_blocked_subpage) + " and 8 bytes into sub-page " +
		std::to_string(spp_allowed_subpage) + ". The host's violation handler sees the "
		"first store and decides to drop it; the second lands as on ordinary memory. "
		"The page sits in a read-only memslot, so both stores exit and KVM decodes "
		"them. With the user backend the library checks each against the map; with "
		"the kmod backend (virtkit.ko loaded) the module checks them, completes the "
		"allowed store inside the kernel and passes only the blocked one on.");
	if (!g.vm().check_extension(KVM_CAP_READONLY_MEM)) {
		show("skipped: the user backend needs KVM_CAP_READONLY_MEM, which this KVM "
		     "does not offer");
		step_done();
		return;
	}
	std::uint64_t page = g.alloc_vaddr(GuestMemory::page_size);
	std::uint64_t gpa = *g.gva_to_gpa(page), gfn = gpa / GuestMemory::page_size;
	std::uint64_t allowed = gpa + spp_allowed_subpage * sub;
	std::uint64_t blocked = gpa + spp_blocked_subpage * sub;
	GuestMemory &mem = g.memory();
	mem.fill(gpa, std::byte{0xee}, GuestMemory::page_size);

	SubpageProtection &spp = SubpageProtection::enable(g.vm());
	spp.set_access(gfn, {map});
	show("page: guest-virtual %s, guest-physical %s, access map %s (%s backend)",
	     hex(page).c_str(), hex(gpa).c_str(), hex(spp.get_access(gfn, 1).at(0)).c_str(),
	     spp.backend() == SppBackendKind::user ? "user" : "kmod");
	show("before: sub-page %u (gpa %s) = %s, sub-page %u (gpa %s) = %s",
	     spp_allowed_subpage, hex(allowed).c_str(),
	     hex(mem.read_obj<std::uint64_t>(allowed)).c_str(), spp_blocked_subpage,
	     hex(blocked).c_str(), hex(mem.read_obj<std::uint64_t>(blocked)).c_str());

	std::vector<SppViolation> seen;
	auto entry = reinterpret_cast<std::uint64_t>(&guest_spp);
	spp.on_violation([&](Vcpu &vcpu, const SppViolation &v) {
		seen.push_back(v);
		std::uint64_t data = 0;
		std::memcpy(&data, v.bytes.data(), std::min<std::size_t>(v.size, sizeof(data)));
		show("violation: vCPU %u wrote %u bytes at gpa %s (first protected byte %s), "
		     "data %s, rip guest_spp+%llu",
		     vcpu.id(), v.size, hex(v.write_gpa).c_str(), hex(v.gpa).c_str(),
		     hex(data).c_str(), (unsigned long long)(v.rip - entry));
		show("decision: drop - the write is not performed, the guest goes on after it");
		return SppDecision::drop;
	});
	Vcpu &v = g.vcpu(0);
	g.set_entry(v, guest_spp, page);
	Ucall uc = expect_sync(g, v, 2);
	g.run_to_done(v);
	spp.on_violation(nullptr);

	std::uint64_t now_allowed = mem.read_obj<std::uint64_t>(allowed);
	std::uint64_t now_blocked = mem.read_obj<std::uint64_t>(blocked);
	show("after:  sub-page %u (gpa %s) = %s (%s)", spp_allowed_subpage, hex(allowed).c_str(),
	     hex(now_allowed).c_str(),
	     now_allowed == spp_allowed_value ? "the guest's write landed" : "NOT the guest's value");
	show("        sub-page %u (gpa %s) = %s (%s)", spp_blocked_subpage, hex(blocked).c_str(),
	     hex(now_blocked).c_str(),
	     now_blocked == old ? "unchanged: the write was blocked" : "CHANGED");
	show("the guest read back %s and %s", hex(uc.args[0]).c_str(), hex(uc.args[1]).c_str());
	SppStats st = spp.stats();
	show("library counters (SppStats): guest writes checked %llu, allowed %llu, violations %llu",
	     (unsigned long long)st.checked_writes, (unsigned long long)st.allowed_writes,
	     (unsigned long long)st.violations);

	check(seen.size() == 1, std::to_string(seen.size()) + " violations reported, expected 1");
	std::uint64_t data = 0;
	std::memcpy(&data, seen[0].bytes.data(), sizeof(data));
	check(seen[0].gpa == blocked && seen[0].write_gpa == blocked && seen[0].size == 8 &&
		      data == spp_blocked_value,
	      "the violation does not describe the guest's 8-byte write of " +
		      hex(spp_blocked_value) + " at " + hex(blocked));
	check(now_allowed == spp_allowed_value, "the write to the writable sub-page did not land");
	check(now_blocked == old, "the write to the protected sub-page was performed");
	check(uc.args[0] == spp_allowed_value && uc.args[1] == old,
	      "the guest did not read back what the host sees");
	auto *h = reinterpret_cast<const std::uint8_t *>(mem.host_ptr(gpa, GuestMemory::page_size));
	for (std::uint64_t i = 0; i < GuestMemory::page_size; i++)
		check(i - (allowed - gpa) < 8 || h[i] == 0xee,
		      "byte " + std::to_string(i) + " of the page changed");
	check(st.checked_writes == 2 && st.allowed_writes == 1 && st.violations == 1,
	      "the library's counters do not show one allowed write and one violation");

	spp.set_access(gfn, {SubpageProtection::all_writable});
	show("the host lifted the protection: access map %s again",
	     hex(spp.get_access(gfn, 1).at(0)).c_str());
	step_done();
}

/* "guest_introspect_watched+0x1c" for a RIP in one of the step's guest functions. */
std::string guest_where(std::uint64_t rip)
{
	auto at = [](auto *fn) { return reinterpret_cast<std::uint64_t>(fn); };
	const std::pair<std::uint64_t, const char *> fns[] = {
		{at(guest_introspect_watched), "guest_introspect_watched"},
		{at(guest_introspect_writes), "guest_introspect_writes"},
		{at(guest_introspect_idle), "guest_introspect_idle"},
		{at(guest_introspect_late), "guest_introspect_late"},
	};
	const std::pair<std::uint64_t, const char *> *best = nullptr;
	for (auto &f : fns)
		if (f.first <= rip && (!best || f.first > best->first))
			best = &f;
	if (!best || rip - best->first >= 4096)
		return "not in the step's guest functions";
	return std::string(best->second) + "+" + hex(rip - best->first);
}

void Demo::introspection(const ToolAddress &outside)
{
	const bool in_process = outside.address.empty();
	step("VM introspection: a tool watches from outside");
	explain("An introspection tool - a security agent, a sandbox, a debugger - controls a "
		"guest from outside over the KVMI protocol: the VMM connects to the tool's "
		"socket, and the tool pauses vCPUs, reads their registers and the guest's "
		"memory, hooks MSR writes and write-protects pages; a vCPU that raises an event "
		"waits until the tool answers. The VM attaches with Introspection::connect(); "
		"its vCPU loops stay as they are. Both vCPUs run guest code that spins on a "
		"flag, so that the tool can pause them. The MSR to watch is "
		"MSR_KERNEL_GS_BASE (" + hex(msr_kernel_gs_base) + "), which this guest does not "
		"use otherwise.");
	if (in_process)
		explain("Here the tool is a thread of this program, on virtkit::introspect, "
			"listening on a unix socket in a private temporary directory with a random "
			"secret. It pauses both vCPUs and reads their registers, hooks writes to "
			"the MSR, write-protects a page (SET_PAGE_ACCESS without W) and sets the "
			"guest's flag with WRITE_PHYSICAL. vCPU 0 then writes the MSR twice - the "
			"tool denies the first write and allows the second - and writes to the "
			"page, which the tool sees as a PF event and lets land. The tool detaches, "
			"and the guest does the same again with nobody watching. (--introspect "
			"connects to an outside tool instead.)");
	else
		explain("Here the tool is outside this program, listening at " + outside.address +
			". Once connected, and once the tool has sent no command for " +
			std::to_string(tool_setup_quiet.count()) + " ms (its setup is done; up to " +
			std::to_string(tool_setup_patience.count()) + " s), vCPU 0 writes the MSR "
			"again and again - at most " +
			std::to_string(intro_max_writes) + " times, with a port exit after each - "
			"until the tool detaches, and reads each value back; what the tool hooks "
			"and how it answers is its decision. The demo waits up to " +
			std::to_string(tool_detach_timeout.count()) + " s for the tool to detach "
			"or vCPU 0 to finish. A tool still attached then sees the VM add a vCPU "
			"(a CREATE_VCPU event, if it enabled it) and the VMM call unhook() before "
			"it moves on (an UNHOOK event): the tool has " +
			std::to_string(tool_unhook_timeout.count()) + " ms to let go.");

	const std::pair<int, const char *> needs[] = {
		{KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR"},
		{KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER"},
		{KVM_CAP_READONLY_MEM, "KVM_CAP_READONLY_MEM"},
	};
	for (auto &[cap, name] : needs) {
		if (g.vm().check_extension(cap) <= 0) {
			show("skipped: MSR events and write-protected pages need %s, which "
			     "this KVM does not offer",
			     name);
			step_done();
			return;
		}
	}

	std::uint64_t ctl = g.alloc_vaddr(GuestMemory::page_size);
	std::uint64_t page = g.alloc_vaddr(GuestMemory::page_size);
	if (in_process)
		g.set_entry(g.vcpu(0), guest_introspect_watched, msr_kernel_gs_base, page, ctl);
	else
		g.set_entry(g.vcpu(0), guest_introspect_writes, msr_kernel_gs_base, ctl);
	if (g.vcpu_count() < 2)
		g.add_vcpu(guest_introspect_idle, ctl);
	else
		g.set_entry(g.vcpu(1), guest_introspect_idle, ctl);

	IntrospectionOptions o;
	o.name = "virtkit-demo";
	std::random_device rd;
	for (auto &b : o.uuid)
		b = std::uint8_t(rd());
	o.uuid[6] = std::uint8_t((o.uuid[6] & 0x0f) | 0x40); /* a version 4 (random) uuid */
	o.uuid[8] = std::uint8_t((o.uuid[8] & 0x3f) | 0x80);
	if (in_process)
		watched_by_demo_tool(o, ctl, page);
	else
		watched_by_outside_tool(o, ctl, outside);
	step_done();
}

void Demo::watched_by_demo_tool(IntrospectionOptions &o, std::uint64_t ctl, std::uint64_t page)
{
	constexpr std::uint64_t msr = msr_kernel_gs_base;
	PrivateDir dir;
	const std::string socket = dir.path() + "/tool.sock";
	o.address = "unix:" + socket;
	o.secret = random_hex(16);
	std::uint64_t page_gpa = *g.gva_to_gpa(page);
	show("the tool listens on %s; the VM connects with the secret %s", o.address.c_str(),
	     o.secret.c_str());

	ToolPlan plan;
	plan.secret = o.secret;
	plan.msr = msr;
	plan.page_gpa = page_gpa;
	plan.go_gpa = *g.gva_to_gpa(ctl) + intro_go;
	plan.events = 3; /* two MSR writes, one page write */
	plan.where = guest_where;
	plan.say = [](const std::string &line) { show("%s", line.c_str()); };

	ToolRecord rec;
	std::vector<std::vector<Ucall>> syncs;
	IntrospectionStats at_detach{}, at_end{};
	const std::uint64_t msr_exits = exits.msr_exits();
	{
		/* Destroyed in reverse: the VMM disconnects, the vCPUs finish, the tool ends. */
		DemoTool tool(introspect::Listener::unix_socket(socket), plan);
		GuestThreads vcpus(g, ctl);
		auto vmm = Introspection::connect(g.vm(), o);
		rec = tool.finish();
		check(vmm.wait_disconnected(5s),
		      "the VM's introspection did not end after the tool closed the connection");
		at_detach = vmm.stats();
		syncs = vcpus.join();
		at_end = vmm.stats();
	}

	/* What the tool saw. */
	check(rec.info.name == o.name && rec.info.uuid == o.uuid,
	      "the tool did not get the VM's name and uuid");
	check(rec.vcpus == g.vcpu_count(), "the tool was told " + std::to_string(rec.vcpus) +
						   " vCPUs, the VM has " +
						   std::to_string(g.vcpu_count()));
	check(rec.paused.size() == 2 && rec.paused[0].vcpu != rec.paused[1].vcpu,
	      "the tool did not pause both vCPUs");
	for (auto &p : rec.paused) {
		std::string at = guest_where(p.regs.regs.rip);
		const char *fn = p.vcpu == 0 ? "guest_introspect_watched" : "guest_introspect_idle";
		check(at.starts_with(fn), "vCPU " + std::to_string(p.vcpu) + " was paused at " +
						  hex(p.regs.regs.rip) + ", not in " + fn);
	}
	check(rec.events.size() == 3, "the tool answered " + std::to_string(rec.events.size()) +
					      " events, expected 3");
	auto *deny = rec.events[0].get<introspect::MsrEvent>();
	auto *allow = rec.events[1].get<introspect::MsrEvent>();
	auto *pf = rec.events[2].get<introspect::PfEvent>();
	check(deny && allow && pf && rec.events[0].vcpu == 0 && rec.events[1].vcpu == 0 &&
		      rec.events[2].vcpu == 0,
	      "the tool did not get MSR, MSR, PF from vCPU 0");

	/* What the guest saw. */
	check(syncs.at(0).size() == 2 && syncs[0][0].args.size() >= 4 &&
		      syncs[0][1].args.size() >= 2,
	      "vCPU 0 did not report twice");
	const auto &during = syncs[0][0].args, &after = syncs[0][1].args;
	std::uint64_t before = during[0];
	show("guest: MSR_KERNEL_GS_BASE was %s; it wrote %s and read back %s (denied), then "
	     "wrote %s and read back %s (allowed)",
	     hex(before).c_str(), hex(intro_denied_value).c_str(), hex(during[1]).c_str(),
	     hex(intro_allowed_value).c_str(), hex(during[2]).c_str());
	GuestMemory &mem = g.memory();
	show("guest: its write of %s to the protected page landed: it read back %s, the host "
	     "sees %s",
	     hex(intro_page_value).c_str(), hex(during[3]).c_str(),
	     hex(mem.read_obj<std::uint64_t>(page_gpa)).c_str());
	check(deny->msr == msr && deny->old_value == before &&
		      deny->new_value == intro_denied_value && rec.replied_msr[0] == before,
	      "the first MSR event is not the write of " + hex(intro_denied_value) + " over " +
		      hex(before));
	check(allow->msr == msr && allow->old_value == before &&
		      allow->new_value == intro_allowed_value,
	      "the second MSR event is not the write of " + hex(intro_allowed_value));
	for (auto &p : rec.paused)
		check(p.vcpu != 0 || p.regs.msrs.at(0).value == before,
		      "the tool read another MSR value than the guest");
	check(during[1] == before, "the denied write changed the MSR to " + hex(during[1]));
	check(during[2] == intro_allowed_value, "the allowed write did not land");
	check(pf->gpa == page_gpa && (pf->access & introspect::access_w),
	      "the PF event is not the write to gpa " + hex(page_gpa));
	check(during[3] == intro_page_value &&
		      mem.read_obj<std::uint64_t>(page_gpa) == intro_page_value,
	      "the page write the tool let through did not land");

	/* And after it. */
	show("after the tool detached, the guest wrote %s to the MSR and %s to the page: it read "
	     "back %s and %s, with no event",
	     hex(intro_after_value).c_str(), hex(intro_page_value + 1).c_str(),
	     hex(after[0]).c_str(), hex(after[1]).c_str());
	show("the VM sent the tool %llu events (2 PAUSE_VCPU, 2 MSR, 1 PF) and answered %llu "
	     "commands; %llu MSR writes exited to this process (the hooked ones)",
	     (unsigned long long)at_end.events, (unsigned long long)at_end.commands,
	     (unsigned long long)(exits.msr_exits() - msr_exits));
	check(after[0] == intro_after_value && g.vcpu(0).msr(msr) == intro_after_value &&
		      after[1] == intro_page_value + 1 &&
		      mem.read_obj<std::uint64_t>(page_gpa + 8) == intro_page_value + 1,
	      "the guest's writes after the detach did not land");
	check(at_detach.events == 5 && at_end.events == 5,
	      "the VM sent " + std::to_string(at_end.events) + " events, expected 5");
	check(exits.msr_exits() - msr_exits == 2,
	      "the MSR writes exited " + std::to_string(exits.msr_exits() - msr_exits) +
		      " times, expected 2: the hooked ones");
}

/*
 * A vCPU added while the tool is attached: its first entry raises
 * CREATE_VCPU (if the tool enabled it), which the tool answers. The other
 * vCPUs spin in the guest without exits meanwhile, so that nothing reads
 * GuestVm while add_vcpu() changes it. true when the vCPU reported.
 */
bool Demo::late_vcpu(Introspection &vmm)
{
	Vcpu &v = g.add_vcpu(guest_introspect_late);
	show("the VM adds vCPU %u while the tool is attached (a CREATE_VCPU event)", v.id());
	std::fflush(stdout);
	std::promise<std::vector<Ucall>> done;
	auto result = done.get_future();
	std::jthread t([&] {
		try {
			done.set_value(run_with_device(g, v, [](Exit &) { return false; }));
		} catch (...) {
			done.set_exception(std::current_exception());
		}
	});
	/* A tool that never answers: disconnecting releases the vCPU. */
	if (result.wait_for(tool_detach_timeout) != std::future_status::ready)
		vmm.disconnect();
	auto syncs = result.get();
	bool ok = syncs.size() == 1 && syncs[0].args.size() >= 1 &&
		  syncs[0].args[0] == intro_late_value;
	show("guest: vCPU %u ran %s", v.id(), ok ? "and reported" : "but did not report");
	return ok;
}

void Demo::watched_by_outside_tool(IntrospectionOptions &o, std::uint64_t ctl,
				   const ToolAddress &outside)
{
	constexpr std::uint64_t msr = msr_kernel_gs_base;
	o.address = outside.address;
	o.secret = outside.secret;
	o.share_memory = outside.share_memory;
	if (o.share_memory)
		show("the tool may map guest RAM read-only (--share-memory)");
	show("connecting to the tool at %s (for up to %llu s, until it listens)", o.address.c_str(),
	     (unsigned long long)tool_listen_patience.count());
	std::fflush(stdout);

	bool detached = false, unhooked = false, late_ran = false, done = false;
	double attached_s;
	const std::uint64_t msr_exits = exits.msr_exits();
	std::vector<std::vector<Ucall>> syncs;
	IntrospectionStats at_detach{}, at_end{};
	const auto *writes_done = reinterpret_cast<const std::uint64_t *>(g.memory().host_ptr(
		*g.gva_to_gpa(ctl) + intro_writes_done, sizeof(std::uint64_t)));
	{
		GuestThreads vcpus(g, ctl);
		auto vmm = connect_when_listening(g.vm(), o, tool_listen_patience);
		auto start = Clock::now();
		show("connected: the tool answered the handshake");
		std::fflush(stdout);
		/*
		 * Let the tool set up (pause, hook, resume) before vCPU 0 writes:
		 * it has when no command came for a while.
		 */
		auto commands = vmm.stats().commands;
		auto quiet_since = Clock::now();
		while (vmm.connected() && Clock::now() - quiet_since < tool_setup_quiet &&
		       Clock::now() - start < tool_setup_patience) {
			std::this_thread::sleep_for(20ms);
			if (auto c = vmm.stats().commands; c != commands) {
				commands = c;
				quiet_since = Clock::now();
			}
		}
		show("the tool sent %llu commands and then none for %lld ms: vCPU 0 starts writing",
		     (unsigned long long)commands,
		     (long long)std::chrono::duration_cast<std::chrono::milliseconds>(
			     Clock::now() - quiet_since).count());
		std::fflush(stdout);
		start = Clock::now();
		vcpus.set(intro_go);
		const auto deadline = Clock::now() + tool_detach_timeout;
		while (!(detached = vmm.wait_disconnected(100ms)) && Clock::now() < deadline &&
		       !(done = std::atomic_ref(*const_cast<std::uint64_t *>(writes_done))
					.load(std::memory_order_acquire)))
			;
		attached_s = std::chrono::duration<double>(Clock::now() - start).count();
		if (!detached) {
			/* Only while vCPU 0 spins without exits: see late_vcpu(). */
			if (done)
				late_ran = late_vcpu(vmm);
			show("the tool is still attached: the VMM calls unhook() (%lld ms)",
			     (long long)tool_unhook_timeout.count());
			std::fflush(stdout);
			unhooked = vmm.unhook(tool_unhook_timeout);
			show("%s", unhooked ? "the tool let go after the UNHOOK event" :
					      "the tool did not close the connection in time (or did "
					      "not enable UNHOOK): the VMM disconnected it");
		}
		at_detach = vmm.stats();
		vmm.disconnect();
		syncs = vcpus.join();
		at_end = vmm.stats();
	}
	check(detached || done, "the tool neither detached nor let vCPU 0 make its writes within " +
					std::to_string(tool_detach_timeout.count()) + " s");
	check(detached || late_ran, "the vCPU added while the tool was attached did not run");

	check(syncs.at(0).size() >= 1, "vCPU 0 did not report");
	const auto &last = syncs[0].back().args;
	std::size_t writes = syncs[0].size() - 1, changed = 0;
	for (std::size_t i = 0; i < writes; i++) {
		const auto &a = syncs[0][i].args;
		check(a.size() >= 3 && a[0] == i && a[1] == intro_loop_base + i * 0x1000,
		      "vCPU 0's report " + std::to_string(i) + " is not about write " +
			      std::to_string(i));
		if (a[2] != a[1]) {
			if (changed++ < 3)
				show("guest: wrote %s, read back %s: the tool denied or changed it",
				     hex(a[1]).c_str(), hex(a[2]).c_str());
		}
	}
	show("guest: wrote MSR_KERNEL_GS_BASE %zu times while the tool was connected (%.2f s); "
	     "%llu of them exited to this process: those the tool had hooked",
	     writes, attached_s, (unsigned long long)(exits.msr_exits() - msr_exits));
	if (changed)
		show("guest: %zu times it read back another value than it wrote: the tool denied "
		     "or changed those writes",
		     changed);
	else
		show("guest: it read back its own value every time: no write was denied");
	show("the VM sent the tool %llu events and answered %llu commands, %llu of them with an "
	     "error",
	     (unsigned long long)at_detach.events, (unsigned long long)at_detach.commands,
	     (unsigned long long)at_detach.errors);
	show("after the tool detached, the guest wrote %s and read back %s, with no event",
	     hex(last.at(1)).c_str(), hex(last.at(2)).c_str());
	check(last.at(1) == intro_after_value && last.at(2) == intro_after_value &&
		      g.vcpu(0).msr(msr) == intro_after_value,
	      "the guest's write after the detach did not land");
	check(at_end.events == at_detach.events, "events were sent after the tool detached");
}

void Demo::timing()
{
	step("What an exit costs");
	explain("Every exit is a round trip guest -> KVM -> this process -> KVM -> guest, "
		"which costs far more than the instruction that caused it; VMMs count them. "
		"vCPU 0 now makes " + std::to_string(bench_exits) + " port writes, then " +
		std::to_string(bench_exits) + " MMIO reads (which KVM must also decode and "
		"emulate), and the host times them from the first exit to the last.");
	Vcpu &v = g.vcpu(0);
	std::uint64_t count = 0;
	Clock::time_point first, last;
	auto tick = [&] {
		last = Clock::now();
		if (!count++)
			first = last;
	};
	auto per_exit_us = [&] {
		return count > 1
			       ? std::chrono::duration<double, std::micro>(last - first).count() /
					 double(count - 1)
			       : 0.0;
	};

	g.set_entry(v, guest_bench_pio, bench_exits);
	run_with_device(g, v, [&](Exit &exit) {
		auto *io = std::get_if<IoExit>(&exit);
		if (!io || io->port != port_bench || !io->is_out())
			return false;
		tick();
		return true;
	});
	check(count == bench_exits, "expected " + std::to_string(bench_exits) +
					    " port exits, got " + std::to_string(count));
	double pio = per_exit_us();
	show("port I/O (OUT) exit round trip: %.1f us (%llu exits)", pio,
	     (unsigned long long)count);

	count = 0;
	g.set_entry(v, guest_bench_mmio, bench_exits);
	auto syncs = run_with_device(g, v, [&](Exit &exit) {
		auto *m = std::get_if<MmioExit>(&exit);
		if (!m || m->is_write() || m->gpa != mmio_id)
			return false;
		m->set(device_id);
		tick();
		return true;
	});
	check(count == bench_exits && syncs.size() == 1 &&
		      syncs[0].args.at(0) == bench_exits * device_id,
	      "the MMIO benchmark did not read the expected values");
	double mmio = per_exit_us();
	show("MMIO read exit round trip:      %.1f us (%llu exits)", mmio,
	     (unsigned long long)count);
	if (pio > 0)
		show("MMIO / port I/O: %.2f", mmio / pio);
	step_done();
}

int run_demo(const std::string &device, const ToolAddress &tool)
{
	auto start = Clock::now();
	std::printf("virtkit demo: a guest on KVM, run with libvirtkit %s\n",
		    VIRTKIT_VERSION_STRING);
	std::optional<System> sys;
	try {
		sys.emplace(System::open(device.c_str()));
	} catch (const Error &e) {
		std::fflush(stdout);
		std::fprintf(stderr, "demo: FAILED: %s is not usable: %s\n  %s\n", device.c_str(),
			     e.what(), kvm_advice(e.err()).c_str());
		return 1;
	}
	explain("Opened " + device + " (KVM API " + std::to_string(sys->api_version()) +
		"). Each step below runs guest code in a real KVM guest and checks what it "
		"reports.");

	std::optional<Demo> d;
	try {
		d.emplace(*sys);
		d->hello();
		d->compute();
		d->ports();
		d->mmio();
		d->exceptions();
		d->two_vcpus();
		d->subpages();
		d->introspection(tool);
		d->timing();
	} catch (const std::exception &e) {
		std::fflush(stdout);
		if (d)
			std::fprintf(stderr, "demo: FAILED at step %d (%s): %s\n", d->step_no,
				     d->step_title.c_str(), e.what());
		else
			std::fprintf(stderr, "demo: FAILED to set up the guest: %s\n", e.what());
		return 1;
	}

	double s = std::chrono::duration<double>(Clock::now() - start).count();
	std::printf("\nSummary\n");
	show("exits to the host in the whole demo: %llu (%s)",
	     (unsigned long long)d->exits.total(), d->exits.summary().c_str());
	show("the demo ran in %.2f s", s);
	std::printf("demo: ok\n");
	return 0;
}

} // namespace

int demo_main(Args args)
{
	std::string device = "/dev/kvm";
	ToolAddress tool;
	std::string secret_file, secret_fd;
	unsigned secrets = 0;
	std::vector<std::string_view> rest;
	for (std::size_t i = 0; i < args.size(); i++) {
		auto a = args[i];
		if (a == "--share-memory") {
			tool.share_memory = true;
			continue;
		}
		auto is = [&](std::string_view name) {
			return a == name || (a.starts_with(name) && a.size() > name.size() &&
					     a[name.size()] == '=');
		};
		std::string *value = is("--introspect")	 ? &tool.address :
				     is("--secret")	 ? &tool.secret :
				     is("--secret-file") ? &secret_file :
				     is("--secret-fd")	 ? &secret_fd :
							   nullptr;
		if (value && value != &tool.address && secrets++)
			return usage_error("demo",
					   "--secret, --secret-file and --secret-fd exclude each other");
		if (!value) {
			rest.push_back(a); /* --device, --help or a usage error */
		} else if (auto eq = a.find('='); eq != std::string_view::npos) {
			*value = a.substr(eq + 1);
		} else if (i + 1 < args.size()) {
			*value = args[++i];
		} else {
			return usage_error("demo", "option " + std::string(a) + " needs a value");
		}
	}
	if (auto stop = parse_device_options("demo", demo_help, rest, device))
		return *stop;
	if (secrets && tool.address.empty())
		return usage_error("demo", "--secret, --secret-file and --secret-fd need --introspect");
	if (tool.share_memory && tool.address.empty())
		return usage_error("demo", "--share-memory needs --introspect");
	try {
		if (!secret_file.empty())
			tool.secret = read_secret_file(secret_file);
		else if (!secret_fd.empty())
			tool.secret = read_secret_fd_arg(secret_fd);
	} catch (const Error &e) {
		std::fprintf(stderr, "virtkit demo: %s\n", e.what());
		return 1;
	}
	if (secrets && tool.secret.empty())
		return usage_error("demo", "the secret must not be empty");
	if (!tool.address.empty() && !tool.address.starts_with("unix:") &&
	    !tool.address.starts_with("vsock:"))
		return usage_error("demo", "--introspect: '" + tool.address +
						   "' is not unix:/path or vsock:CID:PORT");
	if (std::string why = unusable_listen_address(tool.address); !why.empty()) {
		std::fprintf(stderr, "virtkit demo: --introspect %s: %s\n", tool.address.c_str(),
			     why.c_str());
		return 1;
	}
	return run_demo(device, tool);
}

} // namespace virtkit::tool
