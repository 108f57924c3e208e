// SPDX-License-Identifier: MIT
/*
 * virtkit-introspect - an example KVMI introspection tool on
 * virtkit::introspect.
 *
 * It listens, takes the first VM that connects (a virtkit VMM with
 * Introspection, or QEMU with KVMI), shows what the VM tells about itself,
 * pauses every vCPU and dumps its registers, hooks writes to an MSR and a
 * breakpoint in guest memory, lets the vCPUs run and reports the events
 * they raise, then detaches and leaves the guest as it found it.
 *
 * The breakpoint is an INT3 (0xCC) written over the guest's byte. When it
 * hits, the tool puts the byte back and answers RETRY, so the guest runs
 * its own instruction; where the VMM offers single-stepping the tool steps
 * that one instruction and writes the INT3 again, otherwise the breakpoint
 * fires once. While the byte is back, another vCPU may pass the address
 * unseen: good enough for an example, not for a debugger. Where the VMM
 * cannot raise BREAKPOINT events (an INT3 does not reach it, as under
 * nested KVM on QEMU's TCG), the tool says so and does the rest.
 */
#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <virtkit/introspect.hpp>
#include <virtkit/version.hpp>

#include <linux/virtkit_kvmi.h> /* command ids */

#include "../common/kernel_image.hpp"
#include "../common/secret.hpp"
#include "linux_kernel.hpp"
#include "processes.hpp"

namespace {

using namespace std::chrono_literals;
using namespace virtkit::introspect;
using virtkit::Error;
using virtkit::tool::GuestProcesses;
using virtkit::tool::KernelImageError;
using virtkit::tool::LinuxKernelLayout;
using virtkit::tool::linux_kernel_layout;
using virtkit::tool::list_processes;

const char usage_text[] =
	"usage: virtkit-introspect --listen ADDRESS [--secret-file PATH | --secret-fd N |\n"
	"                          --secret SECRET] [--msr INDEX] [--breakpoint GPA]\n"
	"                          [--count N] [--timeout SECONDS]\n"
	"       virtkit-introspect --listen ADDRESS [--secret-file PATH | ...]\n"
	"                          --processes --kernel IMAGE [--system-map FILE]\n"
	"                          [--timeout SECONDS]\n"
	"\n"
	"Waits for a VM to connect over KVMI, then:\n"
	"  shows the VM's name, uuid, vCPUs and the protocol version,\n"
	"  pauses every vCPU and dumps its registers,\n"
	"  hooks writes to the MSR (--msr) and a breakpoint at GPA (--breakpoint),\n"
	"  resumes the vCPUs and reports N events (--count, default 10), one per line,\n"
	"  vCPUs added later (CREATE_VCPU) among them,\n"
	"  detaches (after N events, or at once when the VMM sends UNHOOK): pauses\n"
	"  the vCPUs, removes the hooks, restores the breakpoint's byte, resumes them\n"
	"  and closes the connection.\n"
	"\n"
	"  --listen ADDRESS   unix:/path or vsock:PORT; the VMM connects there\n"
	"  --secret-file PATH the secret the VMM was configured with: the file's\n"
	"                     content, less one trailing newline\n"
	"  --secret-fd N      the same, read from descriptor N (then closed)\n"
	"  --secret SECRET    the same, on the command line (every user can see it in\n"
	"                     /proc: for tests only). Without any of them, only a\n"
	"                     VMM without a secret accepts the tool\n"
	"  --msr INDEX        e.g. 0xc0000080 (EFER)\n"
	"  --breakpoint GPA   guest-physical address of an instruction; where the VMM\n"
	"                     cannot raise BREAKPOINT events, the tool says so and\n"
	"                     goes on without\n"
	"  --count N          events to report before detaching (default 10)\n"
	"  --timeout SECONDS  give up waiting (for the VM, then for the events)\n"
	"\n"
	"With --processes, the tool instead pauses the vCPUs, prints the Linux\n"
	"guest's banner and its process list (pid, thread group, command) read\n"
	"from guest memory, starting at init_task, resumes the vCPUs and detaches:\n"
	"  --kernel IMAGE     the guest's kernel: a bzImage (xz or zstd) or an ELF\n"
	"                     vmlinux; structure offsets come from its BTF, symbols\n"
	"                     from its exported-symbol table\n"
	"  --system-map FILE  symbols from the kernel's System.map (or its\n"
	"                     /proc/kallsyms) instead; it adds linux_banner\n"
	"The guest must run that kernel without KASLR (as `virtkit run` boots it).\n"
	"\n"
	"  --version          print the version and exit\n"
	"\n"
	"Ctrl-C detaches as well. Exit status: 0 success, 1 failure (the message\n"
	"names the operation and errno), 2 usage error.\n";

struct Options {
	std::string listen;
	std::string secret;
	std::optional<std::uint32_t> msr;
	std::optional<std::uint64_t> breakpoint;
	unsigned count = 10;
	std::optional<std::chrono::seconds> timeout;
	bool processes = false;
	std::string kernel, system_map;
};

[[noreturn]] void usage_error(const std::string &msg)
{
	std::fprintf(stderr, "virtkit-introspect: %s\n\n%s", msg.c_str(), usage_text);
	std::exit(2);
}

std::uint64_t parse_number(std::string_view option, const char *text, std::uint64_t max)
{
	char *end = nullptr;
	errno = 0;
	unsigned long long v = std::strtoull(text, &end, 0);
	if (!*text || *end || errno || v > max || text[0] == '-')
		usage_error(std::string(option) + ": '" + text + "' is not a number up to " +
			    std::to_string(max));
	return v;
}

Options parse(int argc, char **argv)
{
	Options o;
	unsigned secrets = 0;
	for (int i = 1; i < argc; i++) {
		std::string_view a = argv[i];
		if (a == "--help" || a == "-h") {
			std::fputs(usage_text, stdout);
			std::exit(0);
		}
		if (a == "--version") {
			std::printf("virtkit-introspect %s\n", VIRTKIT_VERSION_STRING);
			std::exit(0);
		}
		if (a == "--processes") {
			o.processes = true;
			continue;
		}
		/* Every other option takes a value: an unknown one is named as such first. */
		static constexpr std::string_view with_value[] = {
			"--listen", "--secret", "--secret-file", "--secret-fd", "--msr",
			"--breakpoint", "--count", "--timeout", "--kernel", "--system-map"};
		if (std::find(std::begin(with_value), std::end(with_value), a) == std::end(with_value))
			usage_error(a.starts_with("--") ? "unknown option " + std::string(a) :
							  "unexpected argument '" + std::string(a) + "'");
		if (i + 1 >= argc)
			usage_error(std::string(a) + " needs a value");
		const char *v = argv[++i];
		if (a == "--listen")
			o.listen = v;
		else if (a == "--secret" || a == "--secret-file" || a == "--secret-fd") {
			if (secrets++)
				usage_error("--secret, --secret-file and --secret-fd exclude each other");
			try {
				o.secret = a == "--secret"	    ? std::string(v) :
					   a == "--secret-file" ? virtkit::tool::read_secret_file(v) :
								  virtkit::tool::read_secret_fd_arg(v);
			} catch (const Error &e) {
				std::fprintf(stderr, "virtkit-introspect: %s\n", e.what());
				std::exit(1);
			}
			if (o.secret.empty())
				usage_error("--secret: the secret must not be empty");
		}
		else if (a == "--msr")
			o.msr = std::uint32_t(parse_number(a, v, 0xffffffff));
		else if (a == "--breakpoint")
			o.breakpoint = parse_number(a, v, ~0ull);
		else if (a == "--count")
			o.count = unsigned(parse_number(a, v, 1000000));
		else if (a == "--timeout")
			o.timeout = std::chrono::seconds(parse_number(a, v, 1000000));
		else if (a == "--kernel")
			o.kernel = v;
		else /* --system-map */
			o.system_map = v;
	}
	if (o.listen.empty())
		usage_error("--listen is required");
	if (o.processes && o.kernel.empty())
		usage_error("--processes needs --kernel IMAGE");
	if (!o.processes && (!o.kernel.empty() || !o.system_map.empty()))
		usage_error("--kernel and --system-map go with --processes");
	if (o.processes && (o.msr || o.breakpoint))
		usage_error("--processes excludes --msr and --breakpoint");
	return o;
}

EventLoop *signal_loop;

extern "C" void on_signal(int)
{
	if (signal_loop)
		signal_loop->stop();
}

std::string uuid_text(const std::array<std::uint8_t, 16> &u)
{
	char buf[40];
	std::snprintf(buf, sizeof(buf),
		      "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
		      u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12],
		      u[13], u[14], u[15]);
	return buf;
}

constexpr std::uint32_t msr_efer = 0xc0000080, msr_lstar = 0xc0000082;
constexpr std::byte int3{0xcc};

class Tool {
public:
	Tool(const Options &o, std::optional<LinuxKernelLayout> kernel) : opt_(o), kernel_(std::move(kernel)) {}

	/* The first VM: everything up to resuming its vCPUs. */
	void attach(Session &s);
	void on_event(Session &s, Event &ev);
	/* Undo attach(), whatever state it reached; then close. */
	void detach(Session &s);

	unsigned reported() const { return reported_; }
	bool unhooked() const { return unhooked_; }
	bool finished() const { return reported_ >= opt_.count || unhooked_ || listed_; }

private:
	/* pause_all_vcpus and wait until every vCPU waits for a reply: its
	 * PAUSE_VCPU event in paused_, or an event it raised before in held_. */
	void pause(Session &s);
	/* Answer held_ and paused_: the vCPUs run again. */
	void resume(Session &s);
	void dump(Session &s, std::uint16_t vcpu);
	/* --processes: the guest's process list, read on a paused vCPU. */
	void print_processes(Session &s);
	void arm_breakpoint(Session &s);
	/* BREAKPOINT (and SINGLESTEP) events on every vCPU; false if the VMM
	 * cannot raise them (printed). */
	bool enable_breakpoint_events(Session &s);
	bool is_ours(const Event &ev) const;
	/* SINGLESTEP events, where the VMM wants them enabled as well. */
	void control_step_events(Session &s, std::uint16_t vcpu, bool enable);

	Options opt_;
	std::optional<LinuxKernelLayout> kernel_;
	bool listed_ = false;
	std::uint32_t vcpus_ = 0;
	bool msr_hooked_ = false;
	bool bp_events_ = false;
	bool bp_written_ = false; /* 0xCC is in guest memory now */
	std::optional<std::byte> saved_;
	bool can_step_ = false;
	std::set<std::uint16_t> stepping_;
	unsigned reported_ = 0;
	bool unhooked_ = false; /* the VMM asked us to let go */
	std::vector<Event> paused_, held_;
};

void Tool::pause(Session &s)
{
	s.pause_all_vcpus(vcpus_);
	std::set<std::uint16_t> stopped;
	while (stopped.size() < vcpus_) {
		auto ev = s.next_event(10s);
		if (!ev) {
			std::fprintf(stderr,
				     "virtkit-introspect: warning: %zu of %u vCPUs paused within 10 s\n",
				     stopped.size(), vcpus_);
			break;
		}
		stopped.insert(ev->vcpu);
		if (ev->id == EventId::pause_vcpu)
			paused_.push_back(*ev);
		else
			held_.push_back(*ev);
	}
}

void Tool::resume(Session &s)
{
	for (auto &ev : held_)
		s.reply(ev, is_ours(ev) ? Action::retry : Action::continue_);
	held_.clear();
	for (auto &ev : paused_)
		s.reply(ev, Action::continue_);
	paused_.clear();
}

void Tool::control_step_events(Session &s, std::uint16_t vcpu, bool enable)
{
	try {
		s.control_events(vcpu, EventId::singlestep, enable);
	} catch (const CommandError &) {
		/* Enabled by VCPU_CONTROL_SINGLESTEP alone on this VMM. */
	}
}

void Tool::dump(Session &s, std::uint16_t vcpu)
{
	const std::uint32_t msrs[] = {msr_efer, msr_lstar};
	auto r = s.get_registers(vcpu, msrs);
	auto tsc = s.get_tsc_speed(vcpu);
	const auto &g = r.regs;
	std::printf("vcpu %u: mode %u-bit  rip %#llx  rsp %#llx  rflags %#llx  tsc %llu Hz\n",
		    unsigned(vcpu), unsigned(r.mode * 8), (unsigned long long)g.rip,
		    (unsigned long long)g.rsp, (unsigned long long)g.rflags,
		    (unsigned long long)tsc);
	std::printf("        rax %#llx  rbx %#llx  rcx %#llx  rdx %#llx\n",
		    (unsigned long long)g.rax, (unsigned long long)g.rbx,
		    (unsigned long long)g.rcx, (unsigned long long)g.rdx);
	std::printf("        cr0 %#llx  cr3 %#llx  cr4 %#llx  cs %#x  efer %#llx  lstar %#llx\n",
		    (unsigned long long)r.sregs.cr0, (unsigned long long)r.sregs.cr3,
		    (unsigned long long)r.sregs.cr4, unsigned(r.sregs.cs.selector),
		    (unsigned long long)r.msrs[0].value, (unsigned long long)r.msrs[1].value);
}

void Tool::print_processes(Session &s)
{
	if (paused_.empty() && held_.empty())
		throw Error("--processes", EAGAIN, "no vCPU paused");
	std::uint16_t vcpu = paused_.empty() ? held_.front().vcpu : paused_.front().vcpu;
	GuestProcesses p = list_processes(s, vcpu, *kernel_);
	if (!p.banner.empty())
		std::printf("%s: %s\n", kernel_->linux_banner ? "linux_banner" : "init_uts_ns",
			    p.banner.c_str());
	std::printf("processes (init_task's list, symbols from %s, read on vCPU %u):\n",
		    kernel_->symbols_from.c_str(), unsigned(vcpu));
	std::printf("%8s %8s  %s\n", "PID", "TGID", "COMM");
	for (auto &t : p.tasks)
		std::printf("%8d %8d  %s\n", t.pid, t.tgid, t.comm.c_str());
	std::printf("%zu processes%s%s\n", p.tasks.size(), p.incomplete.empty() ? "" : "; incomplete: ",
		    p.incomplete.c_str());
	std::fflush(stdout);
	listed_ = true;
}

void Tool::arm_breakpoint(Session &s)
{
	s.write_physical(*opt_.breakpoint, std::span(&int3, 1));
	bp_written_ = true;
}

bool Tool::is_ours(const Event &ev) const
{
	auto *bp = ev.get<BreakpointEvent>();
	return bp && opt_.breakpoint && bp->gpa == *opt_.breakpoint;
}

bool Tool::enable_breakpoint_events(Session &s)
{
	/*
	 * Where an INT3 in the guest does not reach the VMM (nested KVM under
	 * QEMU's TCG, some PVM-based hosts), CHECK_EVENT and CONTROL_EVENTS
	 * answer EOPNOTSUPP: say why and go on without the breakpoint.
	 */
	std::string why;
	int err = s.check_event(EventId::breakpoint);
	if (err) {
		why = std::string("CHECK_EVENT(BREAKPOINT): ") + std::strerror(err);
	} else {
		try {
			for (std::uint16_t c = 0; c < vcpus_; c++) {
				s.control_events(c, EventId::breakpoint, true);
				bp_events_ = true;
			}
		} catch (const CommandError &e) {
			if (bp_events_)
				throw; /* refused on one vCPU but not on another */
			err = e.err();
			why = e.what();
		}
	}
	if (!bp_events_) {
		std::printf("breakpoint at gpa %#llx not available: %s%s\n",
			    (unsigned long long)*opt_.breakpoint, why.c_str(),
			    err == EOPNOTSUPP ? " (INT3 does not reach the VMM on this host)" : "");
		return false;
	}
	can_step_ = s.check_command(KVMI_VCPU_CONTROL_SINGLESTEP) == 0 &&
		    s.check_event(EventId::singlestep) == 0;
	if (can_step_)
		for (std::uint16_t c = 0; c < vcpus_; c++)
			control_step_events(s, c, true);
	return true;
}

void Tool::attach(Session &s)
{
	const auto &info = s.info();
	/* start_time is in milliseconds since the epoch (QEMU's kvmi, virtkit). */
	std::time_t started = std::time_t(info.start_time / 1000);
	std::tm tm{};
	char when[40] = "?";
	/* ISO 8601 in UTC, to the millisecond the handshake carries. */
	if (::gmtime_r(&started, &tm)) {
		std::size_t n = std::strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
		std::snprintf(when + n, sizeof(when) - n, ".%03uZ",
			      unsigned(info.start_time % 1000));
	}
	std::printf("VM '%s' connected: uuid %s, started %s", info.name.c_str(),
		    uuid_text(info.uuid).c_str(), when);
	if (info.max_gpa)
		std::printf(", guest memory up to %#llx", (unsigned long long)*info.max_gpa);
	std::printf("\n");
	auto v = s.get_version();
	vcpus_ = s.get_guest_info();
	std::printf("KVMI version %u (features:%s%s%s%s), %u vCPUs\n", v.version,
		    v.spp ? " spp" : "", v.vmfunc ? " vmfunc" : "", v.eptp ? " eptp" : "",
		    v.ve ? " ve" : "", vcpus_);

	pause(s);
	std::printf("paused %zu vCPUs\n", paused_.size() + held_.size());
	if (kernel_) {
		print_processes(s);
		return; /* finished(): detach() resumes the vCPUs */
	}
	for (auto &ev : paused_)
		dump(s, ev.vcpu);

	if (opt_.msr) {
		for (std::uint16_t c = 0; c < vcpus_; c++) {
			s.control_events(c, EventId::msr, true);
			msr_hooked_ = true;
			s.control_msr(c, *opt_.msr, true);
		}
		std::printf("hooked writes to MSR %#x\n", unsigned(*opt_.msr));
	}
	if (opt_.breakpoint && enable_breakpoint_events(s)) {
		auto b = s.read_physical(*opt_.breakpoint, 1);
		saved_ = b[0];
		arm_breakpoint(s);
		std::printf("breakpoint at gpa %#llx (byte %#x)%s\n",
			    (unsigned long long)*opt_.breakpoint, unsigned(b[0]),
			    can_step_ ? "" : ", once: the VMM cannot single-step");
	}
	/* VM events: a vCPU added later, the VMM asking the tool to let go. */
	for (auto id : {EventId::create_vcpu, EventId::unhook})
		if (s.check_event(id) == 0)
			s.control_vm_events(id, true);
	resume(s);
	std::printf("resumed; reporting %u events\n", opt_.count);
	std::fflush(stdout);
}

void Tool::on_event(Session &s, Event &ev)
{
	std::printf("[%u] %s\n", ++reported_, describe(ev).c_str());
	std::fflush(stdout);

	if (is_ours(ev) && bp_written_) {
		/* Run the guest's own instruction: restore it, retry. */
		s.write_physical(*opt_.breakpoint, std::span(&*saved_, 1));
		bp_written_ = false;
		if (can_step_) {
			s.control_singlestep(ev.vcpu, true);
			stepping_.insert(ev.vcpu);
		}
		s.reply(ev, Action::retry);
	} else if (ev.id == EventId::singlestep && stepping_.count(ev.vcpu)) {
		s.control_singlestep(ev.vcpu, false);
		stepping_.erase(ev.vcpu);
		if (stepping_.empty())
			arm_breakpoint(s);
		s.reply(ev, Action::continue_);
	} else if (ev.id == EventId::unhook) {
		/* The VMM is shutting down or migrating: detach now. */
		s.reply(ev, Action::continue_);
		unhooked_ = true;
	} else if (is_ours(ev)) {
		/* Trapped before another vCPU put the byte back: re-run it. */
		s.reply(ev, Action::retry);
	} else {
		/* MSR: the write goes ahead. A BREAKPOINT that is not ours is
		 * the guest's own INT3: CONTINUE gives the guest its #BP. */
		s.reply(ev, Action::continue_);
	}
}

void Tool::detach(Session &s)
{
	/* After a failed attach() the vCPUs may still be paused. */
	if (paused_.empty() && held_.empty())
		pause(s);

	for (auto c : stepping_)
		s.control_singlestep(c, false);
	stepping_.clear();
	for (std::uint16_t c = 0; c < vcpus_; c++) {
		if (msr_hooked_) {
			s.control_msr(c, *opt_.msr, false);
			s.control_events(c, EventId::msr, false);
		}
		if (bp_events_) {
			s.control_events(c, EventId::breakpoint, false);
			if (can_step_)
				control_step_events(s, c, false);
		}
	}
	if (bp_written_) {
		s.write_physical(*opt_.breakpoint, std::span(&*saved_, 1));
		bp_written_ = false;
	}

	/* Events raised before the hooks went away: the guest's byte is back,
	 * so a hit on our breakpoint re-runs it. Those vCPUs pause next. */
	std::size_t waiting = held_.size();
	for (auto &ev : held_)
		s.reply(ev, is_ours(ev) ? Action::retry : Action::continue_);
	held_.clear();
	while (waiting > 0) {
		auto ev = s.next_event(10s);
		if (!ev)
			break;
		if (ev->id == EventId::pause_vcpu) {
			paused_.push_back(*ev);
			waiting--;
		} else {
			s.reply(*ev, is_ours(*ev) ? Action::retry : Action::continue_);
		}
	}
	resume(s);
	s.close();
	std::printf("detached: hooks removed%s, vCPUs resumed\n",
		    saved_ ? ", guest byte restored" : "");
}

int run(const Options &opt)
{
	/* The kernel image first: a bad one fails before any VM waits on us. */
	std::optional<LinuxKernelLayout> kernel;
	if (opt.processes) {
		try {
			auto vmlinux = virtkit::tool::vmlinux_of(
				virtkit::tool::read_whole_file(opt.kernel, "--kernel"));
			std::optional<std::string> map;
			if (!opt.system_map.empty()) {
				auto bytes = virtkit::tool::read_whole_file(opt.system_map, "--system-map");
				map.emplace(reinterpret_cast<const char *>(bytes.data()), bytes.size());
			}
			kernel = linux_kernel_layout(vmlinux, map);
		} catch (const KernelImageError &e) {
			std::fprintf(stderr, "virtkit-introspect: %s%s%s: %s\n", opt.kernel.c_str(),
				     opt.system_map.empty() ? "" : " with ", opt.system_map.c_str(), e.what());
			return 1;
		}
	}
	Tool tool(opt, std::move(kernel));
	/* The VM's Session: the loop hands every callback the same object. */
	Session *session = nullptr;
	std::optional<std::string> failure;

	EventLoop::Handlers h;
	EventLoop *loop_ptr = nullptr;
	h.on_session = [&](Session &s) {
		if (session) {
			std::fprintf(stderr, "virtkit-introspect: VM '%s' refused: one VM at a time\n",
				     s.info().name.c_str());
			s.close();
			return;
		}
		session = &s;
		try {
			tool.attach(s);
			if (tool.finished()) /* --count 0 */
				loop_ptr->stop();
		} catch (const Error &e) {
			failure = e.what();
			if (e.err() == ECONNRESET)
				*failure += " (a VMM closes the connection when the secret does not match)";
			loop_ptr->stop();
		} catch (const KernelImageError &e) {
			failure = opt.kernel + ": " + e.what();
			loop_ptr->stop();
		}
	};
	h.on_event = [&](Session &s, Event &ev) {
		if (&s != session)
			return;
		tool.on_event(s, ev);
		if (tool.finished())
			loop_ptr->stop();
	};
	h.on_disconnect = [&](Session &s) {
		if (&s != session)
			return; /* a VM that was refused */
		session = nullptr;
		if (!failure)
			failure = "the VM disconnected: " + s.disconnect_reason();
		loop_ptr->stop();
	};
	h.on_error = [](const Error &e) {
		std::fprintf(stderr, "virtkit-introspect: a connection failed: %s\n", e.what());
	};

	EventLoop loop(h);
	loop_ptr = &loop;
	loop.listen(Listener::parse(opt.listen), opt.secret);
	signal_loop = &loop;
	struct sigaction sa{};
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, nullptr);
	sigaction(SIGTERM, &sa, nullptr);

	std::printf("waiting for a VM on %s\n", opt.listen.c_str());
	std::fflush(stdout);
	bool ended = opt.timeout ? loop.run_for(*opt.timeout) : (loop.run(), true);

	if (session && session->connected()) {
		if (tool.unhooked())
			std::printf("the VMM asked to unhook: detaching\n");
		else if (!failure && !tool.finished())
			std::printf("%s after %u events; detaching\n",
				    ended ? "interrupted" : "timeout", tool.reported());
		try {
			tool.detach(*session);
		} catch (const Error &e) {
			if (!failure)
				failure = std::string("detach: ") + e.what();
		}
	} else if (!session && !failure) {
		failure = "no VM connected to " + opt.listen;
	}
	signal_loop = nullptr;

	if (failure) {
		std::fflush(stdout); /* what it printed before, first */
		std::fprintf(stderr, "virtkit-introspect: %s\n", failure->c_str());
		return 1;
	}
	return 0;
}

} // namespace

int main(int argc, char **argv)
{
	auto opt = parse(argc, argv);
	try {
		return run(opt);
	} catch (const std::exception &e) {
		std::fprintf(stderr, "virtkit-introspect: %s\n", e.what());
		return 1;
	}
}
