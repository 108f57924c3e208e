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
#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include <virtkit/virtkit.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include "commands.hpp"
#include "demo_guest.hpp"

namespace virtkit::tool {

const char demo_help[] =
	"usage: virtkit demo [--device PATH]\n"
	"\n"
	"Run a small guest on KVM with libvirtkit and explain, step by step, what\n"
	"each step shows: guest code that is an ordinary function of this program,\n"
	"arguments and results, guest memory read by the host, port I/O and MMIO\n"
	"exits answered by the host, guest exceptions, two vCPUs running at the\n"
	"same time, sub-page write protection (a guest write blocked and reported,\n"
	"another one landing), and what an exit costs on this host. Every value\n"
	"the guest reports is checked; the last line is \"demo: ok\".\n"
	"\n"
	"Options:\n"
	"  --device PATH   KVM device to use (default /dev/kvm)\n"
	"  -h, --help      show this help\n"
	"\n"
	"Exit status: 0 when every step worked, 1 when one failed (the step and\n"
	"the reason go to stderr), 2 on a usage error.\n";

namespace {

using namespace virtkit::x86;
using namespace virtkit::tool::demo;
using Clock = std::chrono::steady_clock;

constexpr int total_steps = 8;
constexpr std::uint64_t buffer_size = 8192;
constexpr std::uint64_t unmapped_gva = 0x40000000000ull;
constexpr std::uint64_t worker_iterations = 1000000;
constexpr std::uint64_t bench_exits = 2000;
constexpr std::uint32_t device_id = 0x54494b56; /* "VKIT" in little-endian bytes */

/* A check of a value the guest reported that did not hold. */
class DemoFailure : public std::runtime_error {
public:
	using std::runtime_error::runtime_error;
};

template <class... F> struct overloaded : F... {
	using F::operator()...;
};

std::string hex(std::uint64_t v)
{
	char buf[24];
	std::snprintf(buf, sizeof(buf), "0x%llx", (unsigned long long)v);
	return buf;
}

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
	void timing();
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
		if (!m.is_write && m.gpa == mmio_id && m.data.size() == 4) {
			m.set(device_id);
			show("MMIO read  gpa=%s (%zu bytes): host answered %s (\"VKIT\")",
			     hex(m.gpa).c_str(), m.data.size(), hex(device_id).c_str());
			read = true;
		} else if (m.is_write && m.gpa == mmio_doorbell) {
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
	explain("Vm::enable_spp() gives the VM sub-page write protection: every 4 KiB page "
		"has a 32-bit access map, one bit per 128-byte sub-page, and a guest write "
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

	SubpageProtection &spp = g.vm().enable_spp();
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
		if (!m || m->is_write || m->gpa != mmio_id)
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

int run_demo(const std::string &device)
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
	if (auto stop = parse_device_options("demo", demo_help, args, device))
		return *stop;
	return run_demo(device);
}

} // namespace virtkit::tool
