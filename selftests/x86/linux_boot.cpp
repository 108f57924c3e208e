// SPDX-License-Identifier: MIT
/*
 * The tools as a user runs them: their command lines (virtkit info --json,
 * virtkit-introspect's usage), and above all `virtkit run` booting a real
 * Linux kernel (Documentation/virtkit-run.rst):
 * the tool is run as a user would run it, with the initramfs that
 * scripts/run-initramfs builds, whose /init prints a report (the marker,
 * the CPUs online, timer interrupts and uptime read three times) and
 * reboots with `reboot -f` (virtkit.exit on the command line).
 *
 * What it needs, found through the environment or next to this binary:
 *   VIRTKIT_RUN_TOOL    the virtkit binary (default BUILD/bin/virtkit)
 *   VIRTKIT_RUN_KERNEL  a bzImage (default the newest 6.1 kernel in
 *                       BUILD/vmtest/cache, which scripts/vmtest fetches)
 *   VIRTKIT_RUN_INITRD  the initramfs (default BUILD/virtkit-run/initramfs.cpio:
 *                       make run-initramfs)
 *   VIRTKIT_RUN_TIMEOUT seconds one boot may take (default 600)
 * A test that lacks one skips, naming it and where it was looked for.
 */
#include "test.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;

namespace {

/* BUILD: this binary is BUILD/selftests/x86/linux_boot. */
fs::path build_dir()
{
	return fs::read_symlink("/proc/self/exe").parent_path().parent_path().parent_path();
}

std::string from_env_or(const char *var, const fs::path &dflt)
{
	const char *v = std::getenv(var);
	return v && *v ? v : dflt.string();
}

fs::path newest_vmtest_kernel()
{
	fs::path cache = build_dir() / "vmtest" / "cache";
	std::vector<fs::path> found;
	std::error_code ec;
	for (auto &d : fs::directory_iterator(cache, ec)) {
		std::string name = d.path().filename().string();
		if (name.starts_with("6.1.") && fs::exists(d.path() / "boot" / ("vmlinuz-" + name)))
			found.push_back(d.path() / "boot" / ("vmlinuz-" + name));
	}
	std::sort(found.begin(), found.end());
	return found.empty() ? cache / "6.1.*" / "boot" / "vmlinuz-*" : found.back();
}

std::string require_file(const char *var, const fs::path &dflt, const char *what)
{
	std::string p = from_env_or(var, dflt);
	TEST_REQUIRE(fs::exists(p), std::string(what) + " at " + p + " (set " + var + ")");
	return p;
}

std::string tool()
{
	return require_file("VIRTKIT_RUN_TOOL", build_dir() / "bin" / "virtkit",
			    "the virtkit tool (make tool)");
}

struct Run {
	int status = -1;	/* exit status, or 128 + signal */
	std::string output;	/* stdout and stderr */
	long long ms = 0;	/* how long it ran */
};

/*
 * The console without the kernel's own records ("[ seconds.micros] text",
 * through the end of their line). The kernel prints whenever it likes -
 * with 2 vCPUs also in the middle of a line /init is writing (nested under
 * TCG, say, when the TSC's refined calibration lands then) - so the
 * reports of /init are looked for here, not in the raw output.
 */
std::string without_kernel_records(const std::string &out)
{
	std::string kept;
	kept.reserve(out.size());
	for (std::size_t i = 0; i < out.size();) {
		std::size_t j = i + 1;
		if (out[i] == '[') {
			while (j < out.size() && out[j] == ' ')
				j++;
			std::size_t digits = j;
			while (j < out.size() && (std::isdigit(static_cast<unsigned char>(out[j])) || out[j] == '.'))
				j++;
			if (j > digits && out.compare(j, 2, "] ") == 0) {
				std::size_t end = out.find('\n', j);
				i = end == out.npos ? out.size() : end + 1;
				continue;
			}
		}
		kept += out[i++];
	}
	return kept;
}

/* For a failure message: the console from the start of /init on (the boot log before it is long). */
std::string from_init(const std::string &out)
{
	auto at = out.find("Run /init as init process");
	if (at == out.npos)
		return out;
	at = out.rfind('\n', at);
	if (at == out.npos)
		return out;
	return "[... " + std::to_string(at) + " bytes of boot log ...]" + out.substr(at);
}

using Clock = std::chrono::steady_clock;

/*
 * Where a runner knows guests to stall now and then (scripts/run-selftests,
 * nested under QEMU's TCG), VIRTKIT_RUN_STALL_RETRIES=N lets a boot whose
 * console stays silent for stall_limit be killed and run again, at most N
 * times, each one reported. Elsewhere a stall is a failure.
 */
unsigned stall_retries()
{
	return unsigned(vkt::env_u64("VIRTKIT_RUN_STALL_RETRIES", 0));
}
/* How long a silent console means a stall: VIRTKIT_RUN_STALL_SECONDS, default 90. */
std::chrono::seconds stall_limit()
{
	return std::chrono::seconds(vkt::env_u64("VIRTKIT_RUN_STALL_SECONDS", 90));
}

struct Stalled : std::runtime_error {
	using std::runtime_error::runtime_error;
};

/* fn(), again after a Stalled while retries are left. */
template <class F> void retry_stalls(F fn)
{
	for (unsigned attempt = 0;; attempt++) {
		try {
			fn();
			return;
		} catch (const Stalled &s) {
			if (attempt >= stall_retries())
				vkt::fail(__FILE__, __LINE__,
					  vkt::format("%s (after %u retries)", s.what(), attempt));
			vkt::diag("retry %u of %u (VIRTKIT_RUN_STALL_RETRIES): %s", attempt + 1,
				  stall_retries(), s.what());
		}
	}
}

/* A program the test runs: stdin a pipe (or /dev/null), stdout and stderr collected. */
class Child {
public:
	Child(std::vector<std::string> argv, bool with_stdin) : start_(Clock::now())
	{
		/* Where stalls are retried, a stopped `virtkit run` reports where its
		 * vCPUs and the console's interrupt stood (stop_for_report()). */
		if (stall_retries() && argv.size() > 1 && argv[1] == "run")
			argv.push_back("--verbose");
		int out[2], in[2] = {-1, -1};
		TEST_ASSERT(pipe2(out, O_CLOEXEC) == 0);
		TEST_ASSERT(!with_stdin || pipe2(in, O_CLOEXEC) == 0);
		pid_ = fork();
		TEST_ASSERT(pid_ >= 0);
		if (pid_ == 0) {
			int null = open("/dev/null", O_RDONLY);
			dup2(with_stdin ? in[0] : null, 0);
			dup2(out[1], 1);
			dup2(out[1], 2);
			std::vector<char *> args;
			for (auto &a : argv)
				args.push_back(const_cast<char *>(a.c_str()));
			args.push_back(nullptr);
			execv(args[0], args.data());
			_exit(127);
		}
		close(out[1]);
		out_ = out[0];
		if (with_stdin) {
			close(in[0]);
			in_ = in[1];
		}
	}
	Child(const Child &) = delete;
	Child &operator=(const Child &) = delete;
	~Child()
	{
		if (pid_ > 0) {
			kill(pid_, SIGKILL);
			waitpid(pid_, nullptr, 0);
		}
		if (in_ >= 0)
			close(in_);
		close(out_);
	}

	const std::string &output() const { return output_; }

	/* The rest of the first line that starts with prefix, once it is whole; nullopt at the deadline. */
	std::optional<std::string> line_after(const std::string &prefix, Clock::time_point deadline)
	{
		last_output_ = Clock::now();
		for (;;) {
			std::string said = without_kernel_records(output_);
			auto at = said.find(prefix);
			auto end = at == said.npos ? at : said.find_first_of("\r\n", at);
			if (end != said.npos)
				return said.substr(at + prefix.size(), end - at - prefix.size());
			if (!read_some(deadline))
				return std::nullopt;
		}
	}

	void signal(int sig) { TEST_ASSERT(pid_ > 0 && kill(pid_, sig) == 0); }

	void send(const std::string &text)
	{
		TEST_ASSERT(in_ >= 0 && write(in_, text.data(), text.size()) == ssize_t(text.size()));
	}

	/* Read to the end and reap: SIGTERM after timeout_s from the start, SIGKILL 10 s later. */
	Run finish(int timeout_s)
	{
		last_output_ = Clock::now();
		auto deadline = start_ + std::chrono::seconds(timeout_s);
		int signals = 0;
		while (!eof_) {
			if (read_some(deadline) || eof_ || Clock::now() < deadline)
				continue;
			if (signals == 2)
				break;
			kill(pid_, signals++ ? SIGKILL : SIGTERM);
			deadline = Clock::now() + std::chrono::seconds(10);
		}
		bool killed = signals > 0;
		Run r;
		int st = 0;
		waitpid(pid_, &st, 0);
		pid_ = -1;
		r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
		r.ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start_).count();
		r.output = output_;
		if (killed)
			vkt::fail(__FILE__, __LINE__,
				  vkt::format("no end after %d s (VIRTKIT_RUN_TIMEOUT); output:\n%s",
					      timeout_s, r.output.c_str()));
		return r;
	}

private:
	/*
	 * Append what comes before deadline; false at the deadline or the end.
	 * With VIRTKIT_RUN_STALL_RETRIES, throws Stalled once the output has
	 * been silent for stall_limit().
	 */
	bool read_some(Clock::time_point deadline)
	{
		using std::chrono::milliseconds;
		for (;;) {
			if (eof_)
				return false;
			auto now = Clock::now();
			if (stall_retries() && now - last_output_ > stall_limit()) {
				auto tail = output_.size() > 300 ? output_.substr(output_.size() - 300) : output_;
				throw Stalled(vkt::format("the guest stalled: no console output for %lld s; "
							  "it ended with: %s\nstopped, virtkit run reported:\n%s",
							  static_cast<long long>(stall_limit().count()),
							  tail.c_str(), stop_for_report().c_str()));
			}
			if (now >= deadline)
				return false;
			auto wake = deadline;
			if (stall_retries())
				wake = std::min(wake, last_output_ + stall_limit() + milliseconds(1));
			pollfd p{out_, POLLIN, 0};
			auto ms = std::chrono::ceil<milliseconds>(wake - now).count();
			if (poll(&p, 1, int(ms)) <= 0)
				continue; /* the deadline or the stall limit is checked above */
			char buf[4096];
			ssize_t got = read(out_, buf, sizeof(buf));
			if (got <= 0) {
				eof_ = true;
				return false;
			}
			output_.append(buf, std::size_t(got));
			last_output_ = Clock::now();
			return true;
		}
	}

	/* SIGTERM, then what the program prints until it ends (at most 10 s). */
	std::string stop_for_report()
	{
		kill(pid_, SIGTERM);
		auto deadline = Clock::now() + std::chrono::seconds(10);
		std::string said;
		while (!eof_ && Clock::now() < deadline) {
			pollfd p{out_, POLLIN, 0};
			if (poll(&p, 1, 100) <= 0)
				continue;
			char buf[4096];
			ssize_t got = read(out_, buf, sizeof(buf));
			if (got <= 0)
				eof_ = true;
			else
				said.append(buf, std::size_t(got));
		}
		return said;
	}

	Clock::time_point start_;
	pid_t pid_ = -1;
	int in_ = -1, out_ = -1;
	bool eof_ = false;
	std::string output_;
	Clock::time_point last_output_ = Clock::now();
};

/* Run argv with stdin /dev/null, collecting its output; killed after timeout_s. */
Run run(const std::vector<std::string> &argv, int timeout_s)
{
	return Child(argv, false).finish(timeout_s);
}

/*
 * The command line. On kvm_pvm, whose instruction emulator runs the guest
 * kernel and lacks instructions behind these CPUID features (and which
 * gives the guest the host's leaf 1 whatever the VMM sets), the kernel is
 * told not to use them (Documentation/virtkit-run.rst, "On kvm_pvm").
 */
bool on_kvm_pvm()
{
	return fs::exists("/sys/module/kvm_pvm");
}

/*
 * The guest's TSC rate, which KVM knows (KVM_GET_TSC_KHZ): given with
 * tsc_early_khz, the kernel skips calibrating the TSC against the PIT,
 * which fails under nested KVM on QEMU's TCG and leaves it a jiffies clock.
 */
std::string tsc_khz_option()
{
	virtkit::System kvm = virtkit::System::open();
	virtkit::Vm vm = kvm.create_vm();
	virtkit::Vcpu v = vm.create_vcpu(0);
	return " tsc_early_khz=" + std::to_string(v.tsc_khz());
}

std::string cmdline()
{
	std::string c = "console=ttyS0 reboot=t panic=-1 pci=off tsc=reliable rdinit=/init virtkit.exit" +
			tsc_khz_option();
	if (on_kvm_pvm())
		c += " noxsave clearcpuid=cx16,popcnt,rdrand,rdseed,movbe,bmi1,bmi2,abm,avx,avx2,aes,"
		     "pclmulqdq,sha_ni,fsgsbase,smap,pku,invpcid,f16c,fma,avx512f,ssse3,sse4_1,sse4_2"
		     " nowatchdog rodata=off cryptomgr.notests initcall_blacklist=init_kprobe_trace,"
		     "load_system_certificate_list,crypto_kdf108_init,trace_eval_init,slab_sysfs_init";
	return c;
}

/*
 * The numbers after "virtkit-run: KEY" in the guest's report, decimal
 * points dropped (uptime has two decimals: hundredths; this code may not
 * use floating point, -mgeneral-regs-only).
 */
std::vector<unsigned long long> report(const std::string &out, const std::string &key)
{
	std::vector<unsigned long long> v;
	std::string prefix = "virtkit-run: " + key + " ";
	auto at = out.find(prefix);
	if (at == out.npos)
		return v;
	at += prefix.size();
	std::istringstream line(out.substr(at, out.find_first_of("\r\n", at) - at));
	std::string word;
	while (line >> word) {
		std::erase(word, '.');
		v.push_back(std::strtoull(word.c_str(), nullptr, 10));
	}
	return v;
}

std::string kernel_image()
{
	return require_file("VIRTKIT_RUN_KERNEL", newest_vmtest_kernel(),
			    "a Debian 6.1 kernel (scripts/vmtest fetches it)");
}

std::string initramfs()
{
	return require_file("VIRTKIT_RUN_INITRD", build_dir() / "virtkit-run" / "initramfs.cpio",
			    "the initramfs (make run-initramfs)");
}

const char no_user_space[] = "a KVM that runs guest user space (kvm_pvm: SYSCALL from CPL 3 stays at "
			     "CPL 3, INT n is #UD, and the emulated kernel boots in ~7 min";

void boot(unsigned cpus)
{
	TEST_REQUIRE(access("/dev/kvm", R_OK | W_OK) == 0, "/dev/kvm");
	/*
	 * kvm_pvm emulates the guest kernel (a boot takes about 7 minutes)
	 * and cannot run its user space: SYSCALL from CPL 3 reaches LSTAR
	 * still at CPL 3 and INT n is #UD, so /init dies at its first system
	 * call. There, on request, only the kernel's side is checked: it
	 * starts N CPUs, reaches init, and its panic reboot stops the VM.
	 */
	bool kernel_only = on_kvm_pvm();
	TEST_REQUIRE(!kernel_only || vkt::env_u64("VIRTKIT_RUN_ON_KVM_PVM", 0),
		     std::string(no_user_space) + "; VIRTKIT_RUN_ON_KVM_PVM=1 checks the kernel's side only)");
	std::string virtkit = tool();
	std::string kernel = kernel_image();
	std::string initrd = initramfs();
	int timeout = int(vkt::env_u64("VIRTKIT_RUN_TIMEOUT", kernel_only ? 1200 : 600));
	vkt::set_timeout(unsigned(timeout) + 60);
	Run r;
	retry_stalls([&] {
		r = run({virtkit, "run", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline(),
			 "--memory", "128M", "--cpus", std::to_string(cpus)},
			timeout);
		/*
		 * Where stalls are retried (nested under QEMU's TCG), so is a
		 * plain boot - no protection, no introspection - whose guest
		 * kernel died: CI saw a 2-vCPU guest take a #PF at a valid
		 * kernel address on CPU 1 right after "Run /init" and recurse
		 * to the stack guard (Documentation/virtkit-run.rst). Reported,
		 * and a failure once the retries are spent; elsewhere a failure.
		 */
		auto oops = r.output.find("BUG: ");
		if (oops == r.output.npos)
			oops = r.output.find("Kernel panic");
		if (stall_retries() && !kernel_only && oops != r.output.npos)
			throw Stalled("the guest kernel crashed: " + r.output.substr(oops, 600));
	});
	vkt::diag("%u vCPU(s): booted and stopped in %lld.%03lld s", cpus, r.ms / 1000, r.ms % 1000);
	const char *out = r.output.c_str();
	if (kernel_only) {
		std::string smp = "smp: Brought up 1 node, " + std::to_string(cpus) + " CPU";
		TEST_ASSERT(r.output.find(smp) != r.output.npos, "no \"%s\"; output:\n%s",
			    smp.c_str(), out);
		TEST_ASSERT(r.output.find("Run /init as init process") != r.output.npos,
			    "the kernel did not reach init; output:\n%s", out);
		TEST_ASSERT(r.output.find("virtkit run: the guest stopped") != r.output.npos,
			    "the VMM did not see the guest stop; output:\n%s", out);
		TEST_ASSERT_EQ(r.status, 0);
		return;
	}
	const std::string said = without_kernel_records(r.output);
	const std::string tail = from_init(r.output);
	TEST_ASSERT(said.find("virtkit-run: init ok") != said.npos,
		    "no marker from the guest's /init; output:\n%s", tail.c_str());
	auto count = said.find("virtkit-run: cpus online");
	TEST_ASSERT(count != said.npos, "no CPU report; output:\n%s", tail.c_str());
	std::string expect = "count " + std::to_string(cpus) + "\r";
	auto n = said.find("count ", count);
	TEST_ASSERT(n != said.npos && said.compare(n, expect.size(), expect) == 0,
		    "the guest does not see %u CPUs: %s", cpus,
		    said.substr(count, said.find('\n', count) - count).c_str());
	for (const char *key : {"ticks", "uptime"}) {
		auto v = report(said, key);
		TEST_ASSERT(v.size() == 3, "no %s report; output:\n%s", key, tail.c_str());
		TEST_ASSERT(v[0] < v[1] && v[1] < v[2], "%s do not advance: %llu %llu %llu", key,
			    v[0], v[1], v[2]);
	}
	TEST_ASSERT(r.output.find("virtkit run: the guest stopped") != r.output.npos ||
			    r.output.find("virtkit run: the guest rebooted") != r.output.npos,
		    "the VMM did not see the guest stop; output:\n%s", out);
	TEST_ASSERT_EQ(r.status, 0);
}

} // namespace

VK_TEST(boots_linux_to_marker_1_vcpu)
{
	boot(1);
}

VK_TEST(boots_linux_to_marker_2_vcpus)
{
	boot(2);
}

/* The "PID TGID COMM" lines virtkit-introspect --processes printed. */
static bool lists_process(const std::string &out, long pid, const std::string &comm)
{
	std::istringstream in(out);
	std::string line;
	while (std::getline(in, line)) {
		std::istringstream l(line);
		long p, tgid;
		std::string c;
		if (l >> p >> tgid >> c && p == pid && tgid == pid && c == comm)
			return true;
	}
	return false;
}

/*
 * An introspection tool lists the processes of the running guest from
 * outside: the VM serves KVMI from boot (virtkit run --introspect), the
 * guest's /init starts a `sleep` and holds (virtkit.hold), and
 * virtkit-introspect --processes, started then, walks init_task's list
 * with the offsets of the kernel's BTF. It must find the kernel's own
 * tasks and the guest's processes with the pids the guest printed, and
 * the guest runs on after it detached.
 */
VK_TEST(introspection_lists_guest_processes)
{
	TEST_REQUIRE(access("/dev/kvm", R_OK | W_OK) == 0, "/dev/kvm");
	TEST_REQUIRE(!on_kvm_pvm(), std::string(no_user_space) + ")");
	std::string virtkit = tool();
	std::string introspect = require_file("VIRTKIT_INTROSPECT_TOOL",
					      build_dir() / "bin" / "virtkit-introspect",
					      "the introspection tool (make tool)");
	std::string kernel = kernel_image();
	std::string initrd = initramfs();
	int timeout = int(vkt::env_u64("VIRTKIT_RUN_TIMEOUT", 600));
	vkt::set_timeout(unsigned(timeout) + 120);

	char dir[] = "/tmp/virtkit-linux-introspect.XXXXXX";
	TEST_ASSERT(mkdtemp(dir));
	std::string sock = std::string("unix:") + dir + "/tool.sock", secret = std::string(dir) + "/secret";
	{
		int fd = open(secret.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
		TEST_ASSERT(fd >= 0 && write(fd, "linux-boot\n", 11) == 11);
		close(fd);
	}
	retry_stalls([&] {
		Child vm({virtkit, "run", "--kernel", kernel, "--initrd", initrd, "--cmdline",
			  cmdline() + " virtkit.hold", "--memory", "128M", "--introspect", sock,
			  "--secret-file", secret},
			 true);
		auto deadline = Clock::now() + std::chrono::seconds(timeout);
		auto held = vm.line_after("virtkit-run: holding: init 1 sleep ", deadline);
		TEST_ASSERT(held, "the guest did not reach its hold; output:\n%s", vm.output().c_str());
		long sleep_pid = std::strtol(held->c_str(), nullptr, 10);
		auto release = vm.line_after("virtkit-run: kernel ", deadline);
		TEST_ASSERT(release && sleep_pid > 1, "no kernel release or sleep pid from the guest; output:\n%s",
			    vm.output().c_str());

		Run t = run({introspect, "--listen", sock, "--secret-file", secret, "--processes", "--kernel",
			     kernel, "--timeout", "60"},
			    120);
		vkt::diag("virtkit-introspect --processes:\n%s", t.output.c_str());
		TEST_ASSERT(t.status == 0, "virtkit-introspect: status %d; output:\n%s", t.status,
			    t.output.c_str());
		TEST_ASSERT(t.output.find("init_uts_ns: Linux " + *release + " ") != t.output.npos,
			    "the banner does not name the guest's kernel %s", release->c_str());
		TEST_ASSERT(lists_process(t.output, 0, "swapper/0"), "no swapper/0 (pid 0)");
		TEST_ASSERT(lists_process(t.output, 1, "init"), "no init (pid 1)");
		TEST_ASSERT(lists_process(t.output, 2, "kthreadd"), "no kthreadd (pid 2)");
		TEST_ASSERT(lists_process(t.output, sleep_pid, "sleep"), "no sleep (pid %ld)", sleep_pid);
		TEST_ASSERT(t.output.find("incomplete") == t.output.npos, "the walk did not finish");

		vm.send("\n");
		Run r = vm.finish(timeout);
		TEST_ASSERT(without_kernel_records(r.output).find("virtkit-run: released") != std::string::npos,
			    "the guest did not run on after the tool detached; output:\n%s",
			    from_init(r.output).c_str());
		TEST_ASSERT(r.output.find("an introspection tool connected") != r.output.npos,
			    "the VMM did not report the tool; output:\n%s", r.output.c_str());
		TEST_ASSERT_EQ(r.status, 0);
	});
	fs::remove_all(dir);
}

/* The lines of out that contain what. */
static std::vector<std::string> lines_with(const std::string &out, const std::string &what)
{
	std::vector<std::string> found;
	std::istringstream in(out);
	std::string line;
	while (std::getline(in, line))
		if (line.find(what) != line.npos) {
			std::erase(line, '\r');
			found.push_back(line);
		}
	return found;
}

/* "virtkit-run: sysctl NAME was A wrote B status S reads C": {A, B, S, C}. */
static std::vector<unsigned long long> sysctl_report(const std::string &out, const std::string &name)
{
	auto l = lines_with(without_kernel_records(out), "virtkit-run: sysctl " + name + " was ");
	TEST_ASSERT(l.size() == 1, "no report of sysctl %s from the guest; output:\n%s", name.c_str(),
		    from_init(out).c_str());
	unsigned long long was, wrote, status, reads;
	TEST_ASSERT(std::sscanf(l[0].c_str(), "virtkit-run: sysctl %*s was %llu wrote %llu status %llu reads %llu",
				&was, &wrote, &status, &reads) == 4,
		    "malformed report: %s", l[0].c_str());
	return {was, wrote, status, reads};
}

/*
 * A protected kernel variable keeps its value when the guest writes it:
 * virtkit run --protect overflowuid:4 (an exported variable in .data,
 * written by nothing but its sysctl), and the guest's /init writes it
 * through /proc/sys/kernel/overflowuid, then an unprotected one
 * (kernel.panic). The write to the protected one is reported exactly once
 * with its bytes, is not performed, and the guest runs on; the other
 * write lands. Under the SPP backend VIRTKIT_SPP_BACKEND chooses.
 */
VK_TEST(protected_kernel_variable_is_unchanged)
{
	TEST_REQUIRE(access("/dev/kvm", R_OK | W_OK) == 0, "/dev/kvm");
	TEST_REQUIRE(!on_kvm_pvm(), std::string(no_user_space) + ")");
	std::string virtkit = tool();
	std::string kernel = kernel_image();
	std::string initrd = initramfs();
	int timeout = int(vkt::env_u64("VIRTKIT_RUN_TIMEOUT", 600));
	vkt::set_timeout(unsigned(timeout) + 60);
	Run r;
	retry_stalls([&] {
		r = run({virtkit, "run", "--kernel", kernel, "--initrd", initrd, "--cmdline",
			 cmdline() + " virtkit.sysctl=kernel.overflowuid=4242 virtkit.sysctl=kernel.panic=7",
			 "--memory", "128M", "--protect", "overflowuid:4"},
			timeout);
	});
	const char *out = r.output.c_str();
	auto prot = lines_with(r.output, "virtkit run: protecting overflowuid:");
	TEST_ASSERT(prot.size() == 1, "the VMM did not report the protection; output:\n%s", out);
	vkt::diag("%s", prot[0].c_str());

	auto uid = sysctl_report(r.output, "kernel.overflowuid");
	TEST_ASSERT(uid[0] != 4242 && uid[3] == uid[0],
		    "the protected variable changed: was %llu, wrote 4242, reads %llu", uid[0], uid[3]);
	auto panic = sysctl_report(r.output, "kernel.panic");
	TEST_ASSERT(panic[3] == 7, "an unprotected variable was not written: was %llu, wrote 7, reads %llu",
		    panic[0], panic[3]);

	/* 4242 = 0x1092, little-endian. */
	auto blocked = lines_with(r.output, "virtkit run: blocked a guest write:");
	for (auto &b : blocked)
		vkt::diag("%s", b.c_str());
	TEST_ASSERT(blocked.size() == 1, "%zu blocked writes reported, expected the sysctl's one; output:\n%s",
		    blocked.size(), out);
	TEST_ASSERT(blocked[0].find(", 4 bytes at ") != blocked[0].npos &&
			    blocked[0].find(" (overflowuid+0x0), ") != blocked[0].npos &&
			    blocked[0].ends_with(": 92 10 00 00"),
		    "not the write of 4242 to overflowuid: %s", blocked[0].c_str());
	TEST_ASSERT(r.output.find("virtkit run: 1 guest write to protected memory blocked") != r.output.npos,
		    "no count of blocked writes at the end; output:\n%s", out);
	TEST_ASSERT(without_kernel_records(r.output).find("virtkit-run: rebooting") != std::string::npos,
		    "the guest did not run on to its end; output:\n%s", from_init(r.output).c_str());
	TEST_ASSERT_EQ(r.status, 0);
}

/*
 * SIGTERM stops `virtkit run` cleanly (status 128 + 15, the end reported)
 * also when SPP runs threads of its own (--protect): they must not take
 * the signal and die with the process. Needs no guest user space: the
 * signal comes while the kernel boots.
 */
VK_TEST(run_stops_on_sigterm_with_protection)
{
	TEST_REQUIRE(access("/dev/kvm", R_OK | W_OK) == 0, "/dev/kvm");
	std::string virtkit = tool();
	std::string kernel = kernel_image();
	Child vm({virtkit, "run", "--kernel", kernel, "--memory", "128M", "--cmdline",
		  cmdline(), "--protect", "overflowuid:4"},
		 false);
	auto deadline = Clock::now() + std::chrono::seconds(60);
	TEST_ASSERT(vm.line_after("virtkit run: protecting overflowuid", deadline),
		    "no protection report; output:\n%s", vm.output().c_str());
	std::this_thread::sleep_for(std::chrono::milliseconds(500));
	vm.signal(SIGTERM);
	Run r = vm.finish(60);
	TEST_ASSERT(r.status == 128 + SIGTERM && r.output.find("stopped by signal") != r.output.npos &&
			    r.output.find("guest writes to protected memory blocked") != r.output.npos,
		    "status %d; output:\n%s", r.status, r.output.c_str());
}

/* virtkit-introspect: usage errors exit 2 naming the option, --version answers. */
VK_TEST(introspect_tool_usage)
{
	std::string introspect = require_file("VIRTKIT_INTROSPECT_TOOL",
					      build_dir() / "bin" / "virtkit-introspect",
					      "the introspection tool (make tool)");
	struct Case {
		std::vector<std::string> args;
		int status;
		const char *message;
	} cases[] = {
		{{"--version"}, 0, "virtkit-introspect "},
		{{"--bogus"}, 2, "unknown option --bogus"},
		{{"--listen"}, 2, "--listen needs a value"},
		{{"--processes"}, 2, "--listen is required"},
		{{"--listen", "unix:/nonexistent/x", "--processes"}, 2, "--processes needs --kernel IMAGE"},
		{{"--listen", "unix:/nonexistent/x", "--count", "-1"}, 2, "is not a number"},
	};
	for (auto &c : cases) {
		std::vector<std::string> argv = {introspect};
		argv.insert(argv.end(), c.args.begin(), c.args.end());
		Run r = run(argv, 30);
		TEST_ASSERT(r.status == c.status && r.output.find(c.message) != r.output.npos,
			    "virtkit-introspect %s: status %d (want %d), output lacks \"%s\":\n%s",
			    c.args.back().c_str(), r.status, c.status, c.message, r.output.c_str());
	}
}

/*
 * The JSON the tools print: objects, arrays, strings, unsigned numbers,
 * true and false. Advances p past one value; false if malformed.
 */
static bool json_value(const std::string &s, std::size_t &p);

static void json_space(const std::string &s, std::size_t &p)
{
	while (p < s.size() && (s[p] == ' ' || s[p] == '\n'))
		p++;
}

static bool json_string(const std::string &s, std::size_t &p)
{
	if (p >= s.size() || s[p] != '"')
		return false;
	for (p++; p < s.size(); p++) {
		if (s[p] == '\\')
			p++;
		else if (s[p] == '"')
			return ++p, true;
		else if (static_cast<unsigned char>(s[p]) < 0x20)
			return false;
	}
	return false;
}

static bool json_value(const std::string &s, std::size_t &p)
{
	json_space(s, p);
	if (p < s.size() && s[p] == '"')
		return json_string(s, p);
	if (p < s.size() && std::isdigit(static_cast<unsigned char>(s[p]))) {
		while (p < s.size() && std::isdigit(static_cast<unsigned char>(s[p])))
			p++;
		return true;
	}
	for (const char *word : {"true", "false"})
		if (s.compare(p, std::strlen(word), word) == 0)
			return p += std::strlen(word), true;
	if (p < s.size() && s[p] == '[') {
		p++;
		json_space(s, p);
		if (p < s.size() && s[p] == ']')
			return ++p, true;
		for (;;) {
			if (!json_value(s, p))
				return false;
			json_space(s, p);
			if (p < s.size() && s[p] == ',') {
				p++;
				continue;
			}
			return p < s.size() && s[p++] == ']';
		}
	}
	if (p >= s.size() || s[p++] != '{')
		return false;
	json_space(s, p);
	if (p < s.size() && s[p] == '}')
		return ++p, true;
	for (;;) {
		json_space(s, p);
		if (!json_string(s, p))
			return false;
		json_space(s, p);
		if (p >= s.size() || s[p++] != ':' || !json_value(s, p))
			return false;
		json_space(s, p);
		if (p < s.size() && s[p] == ',') {
			p++;
			continue;
		}
		return p < s.size() && s[p++] == '}';
	}
}

/* virtkit info --json: one JSON object with the sections the text shows. */
VK_TEST(info_json)
{
	std::string virtkit = tool();
	Run r = run({virtkit, "info", "--json"}, 60);
	std::size_t p = 0;
	TEST_ASSERT(json_value(r.output, p), "not JSON (at byte %zu):\n%s", p, r.output.c_str());
	json_space(r.output, p);
	TEST_ASSERT(p == r.output.size(), "more after the object: %s", r.output.substr(p).c_str());
	for (const char *member : {"\"Host\": {", "\"virtkit\": \"" VIRTKIT_VERSION_STRING "\"",
				   "\"KVM device\": {", "\"virtkit kernel module\": {",
				   "\"kvmi tool event loop\": \""})
		TEST_ASSERT(r.output.find(member) != r.output.npos, "no %s in:\n%s", member,
			    r.output.c_str());
	/* Unusable device: still JSON, and the status says so. */
	r = run({virtkit, "info", "--json", "--device", "/nonexistent"}, 60);
	TEST_ASSERT_EQ(r.status, 1);
	TEST_ASSERT(r.output.find("\"usable\": \"no: open (/nonexistent): ENOENT") != r.output.npos,
		    "output:\n%s", r.output.c_str());
}

/*
 * virtkit-introspect --json against `virtkit demo --introspect`: JSON Lines,
 * every line one object with a "type"; the records carry the demo's VM, the
 * MSR hook and its writes.
 */
VK_TEST(introspect_tool_json)
{
	TEST_REQUIRE(access("/dev/kvm", R_OK | W_OK) == 0, "/dev/kvm");
	std::string introspect = require_file("VIRTKIT_INTROSPECT_TOOL",
					      build_dir() / "bin" / "virtkit-introspect",
					      "the introspection tool (make tool)");
	std::string virtkit = tool();
	char dir[] = "/tmp/virtkit-json.XXXXXX";
	TEST_ASSERT(mkdtemp(dir));
	const std::string key = std::string(dir) + "/key", sock = std::string("unix:") + dir + "/tool.sock";
	{
		int fd = open(key.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
		TEST_ASSERT(fd >= 0 && write(fd, "s3cret\n", 7) == 7);
		close(fd);
	}
	Child t({introspect, "--listen", sock, "--secret-file", key, "--msr", "0xc0000102", "--count",
		 "4", "--json"},
		false);
	TEST_ASSERT(t.line_after("{\"type\":\"listening\"", Clock::now() + std::chrono::seconds(30)),
		    "the tool did not listen:\n%s", t.output().c_str());
	Run d = run({virtkit, "demo", "--introspect", sock, "--secret-file", key}, 120);
	TEST_ASSERT(d.status == 0, "virtkit demo: status %d\n%s", d.status, d.output.c_str());
	Run r = t.finish(60);
	TEST_ASSERT(r.status == 0, "virtkit-introspect: status %d\n%s", r.status, r.output.c_str());
	std::vector<std::string> types;
	unsigned msr_events = 0;
	for (std::size_t at = 0; at < r.output.size();) {
		std::size_t end = r.output.find('\n', at);
		TEST_ASSERT(end != r.output.npos, "an unterminated line in:\n%s", r.output.c_str());
		std::string line = r.output.substr(at, end - at);
		std::size_t p = 0;
		TEST_ASSERT(json_value(line, p) && p == line.size() && line.starts_with("{\"type\":\""),
			    "not one JSON object with a type: %s", line.c_str());
		types.push_back(line.substr(9, line.find('"', 9) - 9));
		if (line.find("\"event\":\"MSR\",\"msr\":\"0xc0000102\"") != line.npos)
			msr_events++;
		at = end + 1;
	}
	const std::vector<std::string> first = {"listening", "connected", "paused"};
	TEST_ASSERT(types.size() > 6 && std::equal(first.begin(), first.end(), types.begin()) &&
			    types.back() == "detached",
		    "records in an unexpected order:\n%s", r.output.c_str());
	TEST_ASSERT(r.output.find("\"name\":\"virtkit-demo\"") != r.output.npos &&
			    r.output.find("{\"type\":\"hooked\",\"msr\":\"0xc0000102\"}") != r.output.npos,
		    "no connected or hooked record:\n%s", r.output.c_str());
	TEST_ASSERT(msr_events >= 1, "no MSR event record:\n%s", r.output.c_str());
}

/* Bad options and images end with a clear message and status 2 or 1, before any VM runs. */
VK_TEST(run_rejects_bad_options_and_images)
{
	std::string virtkit = tool();
	char dir[] = "/tmp/virtkit-linux-boot.XXXXXX";
	TEST_ASSERT(mkdtemp(dir));
	std::string junk = std::string(dir) + "/junk";
	{
		int fd = open(junk.c_str(), O_WRONLY | O_CREAT, 0600);
		std::vector<char> zeros(8192);
		TEST_ASSERT(write(fd, zeros.data(), zeros.size()) == ssize_t(zeros.size()));
		close(fd);
	}
	struct Case {
		std::vector<std::string> args;
		int status;
		const char *message;
	} cases[] = {
		{{"run"}, 2, "--kernel BZIMAGE is required"},
		{{"run", "--kernel", junk, "--memory", "12Q"}, 2, "not a size"},
		{{"run", "--kernel", junk, "--memory", "8M"}, 2, "at least 16M"},
		{{"run", "--kernel", junk, "--cpus", "0"}, 2, "give 1 to 254"},
		{{"run", "--kernel", junk, "--cpus", "255"}, 2, "give 1 to 254"},
		{{"run", "--kernel", junk, "--decompress", "cpu"}, 2, "give vmm or guest"},
		{{"run", "--kernel", junk, "--bogus"}, 2, "unknown option '--bogus'"},
		{{"run", "--kernel", std::string(dir) + "/none"}, 1, "ENOENT"},
		{{"run", "--kernel", junk}, 1, "not a bzImage"},
		{{"run", "--kernel", junk, "--protect", "overflowuid"}, 2, "give SYMBOL[+OFF]:LEN"},
		{{"run", "--kernel", junk, "--protect", "overflowuid:0"}, 2, "LEN at least 1"},
		{{"run", "--kernel", junk, "--protect", "+4:4"}, 2, "give SYMBOL[+OFF]:LEN"},
		{{"run", "--kernel", junk, "--protect", "x+y:4"}, 2, "give SYMBOL[+OFF]:LEN"},
		{{"run", "--kernel", junk, "--protect-gpa", "0x1000"}, 2, "give GPA:LEN"},
		{{"run", "--kernel", junk, "--protect-gpa", "-1:8"}, 2, "give GPA:LEN"},
		{{"run", "--kernel", junk, "--protect-gpa", "0xfffffffffffffff8:9"}, 2, "give GPA:LEN"},
		{{"run", "--kernel", junk, "--system-map", junk}, 2, "--system-map goes with --protect"},
		{{"run", "--kernel", junk, "--secret-fd", "0"}, 2, "go with --introspect"},
		{{"run", "--kernel", junk, "--introspect", "unix:/x", "--secret-fd", "0", "--secret-file", junk},
		 2, "exclude each other"},
		{{"run", "--kernel", junk, "--introspect", "unix:/x", "--secret-fd", "97"}, 1, "EBADF"},
		{{"run", "--kernel", junk, "--introspect", "unix:/nonexistent/dir/tool.sock"}, 1,
		 "no directory /nonexistent/dir for the socket"},
		{{"run", "--kernel", junk, "--protect", "a:1", "--system-map", std::string(dir) + "/none"},
		 1, "ENOENT"},
	};
	for (auto &c : cases) {
		std::vector<std::string> argv = {virtkit};
		argv.insert(argv.end(), c.args.begin(), c.args.end());
		Run r = run(argv, 30);
		TEST_ASSERT(r.status == c.status && r.output.find(c.message) != r.output.npos,
			    "virtkit %s: status %d (want %d), output lacks \"%s\":\n%s",
			    c.args.back().c_str(), r.status, c.status, c.message, r.output.c_str());
	}
	std::string kernel = from_env_or("VIRTKIT_RUN_KERNEL", newest_vmtest_kernel());
	if (fs::exists(kernel) && access("/dev/kvm", R_OK | W_OK) == 0) {
		Run r = run({virtkit, "run", "--kernel", kernel, "--memory", "32M"}, 30);
		TEST_ASSERT(r.status == 1 && r.output.find("too little memory") != r.output.npos,
			    "32M: status %d, output:\n%s", r.status, r.output.c_str());
		/* Symbols the image cannot place, before any vCPU runs. */
		struct Case {
			std::vector<std::string> args;
			const char *message;
		} bad[] = {
			{{"--protect", "no_such_symbol:4"}, "no symbol no_such_symbol in the image's exported symbols"},
			{{"--protect", "this_cpu_off:8"}, "is a per-CPU variable"},
			{{"--protect", "overflowuid+0x40000000:4"}, "is not inside one segment"},
			{{"--protect", "overflowuid:4", "--decompress", "guest"}, "need --decompress vmm"},
			{{"--protect", "overflowuid:4", "--system-map", junk}, "the System.map has no init_task"},
			{{"--protect-gpa", "0xf0000000:4"}, "0xf0000000-0xf0000fff of gpa 0xf0000000: not guest RAM"},
			{{"--protect", "overflowuid+0xffffffffffff0000:4"}, "runs past the end of the address space"},
		};
		for (auto &c : bad) {
			std::vector<std::string> argv = {virtkit, "run", "--kernel", kernel, "--memory", "128M"};
			argv.insert(argv.end(), c.args.begin(), c.args.end());
			r = run(argv, 30);
			TEST_ASSERT(r.status == 1 && r.output.find(c.message) != r.output.npos,
				    "virtkit run %s: status %d (want 1), output lacks \"%s\":\n%s",
				    c.args[1].c_str(), r.status, c.message, r.output.c_str());
		}
	}
	fs::remove_all(dir);
}
