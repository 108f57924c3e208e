// SPDX-License-Identifier: MIT
/*
 * virtkit trace (Documentation/trace.rst) as a user runs it, against guests
 * whose exits are known: a VM process whose guest does N `out` instructions
 * to one port, D writes to device MMIO (a GPA without memory) and M writes
 * to a page under sub-page protection (user backend: each is an MMIO
 * exit), and a second VM process doing other exits at the same time.
 * `virtkit trace --pid A --json` must count exactly N port-0x80 exits,
 * D + M MMIO writes and M SPP traps on that page for A, nothing of the
 * other process, and as many I/O exits by reason as port I/O events;
 * once more with the kmod SPP backend where virtkit.ko is loaded.
 *
 * Needs root (BPF), kernel BTF and KVM's tracepoints; tracefs is mounted in
 * a private mount namespace when it is not mounted. Where KVM does not
 * trace kvm_exit (kvm_pvm traces only some events) the count test skips
 * saying so.
 *
 *   VIRTKIT_TRACE_TOOL  the virtkit binary (default BUILD/bin/virtkit)
 */
#include "test.hpp"

#include <virtkit/spp.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace fs = std::filesystem;
using namespace virtkit;
using namespace virtkit::x86;

namespace {

constexpr std::uint16_t test_port = 0x80;
constexpr std::uint64_t spp_gpa = 0x40000000; /* 1 GiB */
/* A guest-physical address no region backs: accesses exit as MMIO. */
constexpr std::uint64_t mmio_gpa = 0xd0000000;

/* --- the guest workload: known exits --- */

void guest_workload(std::uint64_t outs, std::uint64_t page, std::uint64_t writes,
		    std::uint64_t device_writes)
{
	for (std::uint64_t i = 0; i < outs; i++)
		__asm__ volatile("outb %b0, %w1" ::"a"(std::uint8_t(i)), "Nd"(test_port));
	/* Device MMIO (no memslot): MMIO writes, not SPP traps. */
	for (std::uint64_t i = 0; i < device_writes; i++)
		*(volatile std::uint32_t *)(mmio_gpa + (i % 16) * 4) = std::uint32_t(i);
	/* Sub-page 0 is protected: every write traps, and is dropped. */
	for (std::uint64_t i = 0; i < writes; i++)
		*(volatile std::uint64_t *)(page + (i % 16) * 8) = i;
}

/*
 * A VM process: sets its guest up, says so on `ready`, waits for a byte on
 * `go`, runs the workload to DONE and exits 0 (1 on any failure).
 */
pid_t spawn_vm(SppBackendKind backend, std::uint64_t outs, std::uint64_t writes,
	       std::uint64_t device_writes, int ready, int go)
{
	pid_t pid = fork();
	TEST_ASSERT(pid >= 0, "fork: %s", std::strerror(errno));
	if (pid)
		return pid;
	int rc = 1;
	try {
		System sys = System::open();
		GuestVm g(sys);
		g.memory().add(spp_gpa, 4096, {.name = "trace-spp"});
		g.identity_map(spp_gpa, 4096);
		g.identity_map(mmio_gpa, 4096);
		auto &spp = SubpageProtection::enable(g.vm(), {.backend = backend});
		spp.set_access(spp_gpa / 4096, {~1u});
		spp.on_violation([](Vcpu &, const SppViolation &) { return SppDecision::drop; });
		Vcpu &v = g.add_vcpu(guest_workload, outs, spp_gpa, writes, device_writes);
		char c = 'r';
		if (write(ready, &c, 1) == 1 && read(go, &c, 1) == 1) {
			for (;;) {
				Exit e = v.run();
				if (auto *io = std::get_if<IoExit>(&e); io && io->port == test_port)
					continue;
				if (auto *m = std::get_if<MmioExit>(&e);
				    m && m->is_write() && m->gpa >= mmio_gpa && m->gpa < mmio_gpa + 4096)
					continue;
				auto uc = g.ucall(v, e);
				if (uc && uc->kind == Ucall::Kind::done)
					break;
				throw std::runtime_error("unexpected exit: " +
							 (uc ? uc->describe() : describe(e)));
			}
			rc = 0;
		}
	} catch (const std::exception &e) {
		std::fprintf(stderr, "# vm process %d: %s\n", getpid(), e.what());
	}
	_exit(rc);
}

int wait_status(pid_t pid)
{
	int st = 0;
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* --- the tool --- */

fs::path build_dir()
{
	return fs::read_symlink("/proc/self/exe").parent_path().parent_path().parent_path();
}

std::string tool()
{
	const char *v = std::getenv("VIRTKIT_TRACE_TOOL");
	std::string p = v && *v ? v : (build_dir() / "bin" / "virtkit").string();
	TEST_REQUIRE(fs::exists(p), "the virtkit tool (make tool) at " + p + " (set VIRTKIT_TRACE_TOOL)");
	return p;
}

/*
 * What virtkit trace needs that is not ours to change: root, kernel BTF,
 * tracefs (mounted here, in a mount namespace of this test only, when
 * missing) and the kvm tracepoints. Each missing one is a skip naming it.
 */
void require_tracing()
{
	TEST_REQUIRE(geteuid() == 0, "root (virtkit trace loads BPF programs: CAP_BPF, CAP_PERFMON)");
	TEST_REQUIRE(fs::exists("/sys/kernel/btf/vmlinux"), "kernel BTF (/sys/kernel/btf/vmlinux)");
	if (!fs::exists("/sys/kernel/tracing/events")) {
		TEST_REQUIRE(unshare(CLONE_NEWNS) == 0,
			     vkt::format("a mount namespace for tracefs (unshare: %s)",
					 std::strerror(errno)));
		TEST_ASSERT(mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0,
			    "mount --make-rprivate /: %s", std::strerror(errno));
		TEST_REQUIRE(mount("nodev", "/sys/kernel/tracing", "tracefs", 0, nullptr) == 0,
			     vkt::format("tracefs (mount -t tracefs nodev /sys/kernel/tracing: %s)",
					 std::strerror(errno)));
	}
	TEST_REQUIRE(fs::exists("/sys/kernel/tracing/events/kvm/kvm_exit"),
		     "KVM's tracepoints (/sys/kernel/tracing/events/kvm/kvm_exit)");
}

struct Traced {
	int status = -1;
	std::string out, err;
};

/* Read everything from fd into s until EOF; false on timeout. */
bool drain(int fd, std::string &s, int timeout_ms)
{
	char buf[4096];
	for (;;) {
		pollfd p = {fd, POLLIN, 0};
		int n = poll(&p, 1, timeout_ms);
		if (n <= 0)
			return false;
		ssize_t r = read(fd, buf, sizeof(buf));
		if (r <= 0)
			return true;
		s.append(buf, std::size_t(r));
	}
}

/*
 * Run `virtkit trace ARGS`; once it reports that it is attached (its first
 * line on stderr), call started(); then collect its output until it exits.
 */
template <class Fn> Traced run_trace(const std::vector<std::string> &args, Fn started)
{
	int out[2], err[2];
	TEST_ASSERT(pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0);
	std::string bin = tool();
	pid_t pid = fork();
	TEST_ASSERT(pid >= 0, "fork: %s", std::strerror(errno));
	if (pid == 0) {
		dup2(out[1], 1);
		dup2(err[1], 2);
		std::vector<char *> argv{const_cast<char *>(bin.c_str()), const_cast<char *>("trace")};
		for (auto &a : args)
			argv.push_back(const_cast<char *>(a.c_str()));
		argv.push_back(nullptr);
		execv(bin.c_str(), argv.data());
		_exit(127);
	}
	close(out[1]);
	close(err[1]);
	Traced t;
	/* Attached: "virtkit trace: tracing ..." (or a failure) on stderr. */
	char c;
	while (t.err.find('\n') == std::string::npos) {
		pollfd p = {err[0], POLLIN, 0};
		if (poll(&p, 1, 60000) <= 0 || read(err[0], &c, 1) != 1)
			break;
		t.err += c;
	}
	bool attached = t.err.starts_with("virtkit trace: tracing");
	if (attached)
		started();
	bool done = drain(out[0], t.out, 120000);
	drain(err[0], t.err, 1000);
	if (!done)
		kill(pid, SIGKILL);
	t.status = wait_status(pid);
	close(out[0]);
	close(err[0]);
	TEST_ASSERT(attached, "virtkit trace did not attach:\n%s", t.err.c_str());
	TEST_ASSERT(done, "virtkit trace did not end within 120 s");
	return t;
}

/* --- the JSON virtkit trace prints: objects, arrays, strings, numbers, true/false/null --- */

struct Json {
	enum Kind { null, boolean, number, string, array, object } kind = null;
	std::uint64_t num = 0; /* numbers: their integer part (no FPU in guest-code builds) */
	bool b = false;
	std::string str;
	std::vector<Json> items;
	std::map<std::string, Json> members;

	const Json &operator[](const std::string &k) const
	{
		static const Json none;
		auto it = members.find(k);
		return it == members.end() ? none : it->second;
	}
	std::uint64_t u64() const { return kind == number ? num : ~0ull; }
};

bool parse(const std::string &s, std::size_t &p, Json &v)
{
	auto ws = [&] {
		while (p < s.size() && std::isspace((unsigned char)s[p]))
			p++;
	};
	auto str = [&](std::string &o) {
		if (p >= s.size() || s[p] != '"')
			return false;
		for (p++; p < s.size() && s[p] != '"'; p++) {
			if (s[p] == '\\' && ++p >= s.size())
				return false;
			o += s[p];
		}
		return p++ < s.size();
	};
	ws();
	if (p >= s.size())
		return false;
	if (s[p] == '{') {
		v.kind = Json::object;
		p++;
		ws();
		if (p < s.size() && s[p] == '}')
			return ++p, true;
		for (;;) {
			std::string k;
			ws();
			if (!str(k))
				return false;
			ws();
			if (p >= s.size() || s[p++] != ':' || !parse(s, p, v.members[k]))
				return false;
			ws();
			if (p < s.size() && s[p] == ',') {
				p++;
				continue;
			}
			return p < s.size() && s[p++] == '}';
		}
	}
	if (s[p] == '[') {
		v.kind = Json::array;
		p++;
		ws();
		if (p < s.size() && s[p] == ']')
			return ++p, true;
		for (;;) {
			v.items.emplace_back();
			if (!parse(s, p, v.items.back()))
				return false;
			ws();
			if (p < s.size() && s[p] == ',') {
				p++;
				continue;
			}
			return p < s.size() && s[p++] == ']';
		}
	}
	if (s[p] == '"')
		return v.kind = Json::string, str(v.str);
	for (auto [word, kind, b] : {std::tuple{"true", Json::boolean, true},
				     std::tuple{"false", Json::boolean, false},
				     std::tuple{"null", Json::null, false}})
		if (s.compare(p, std::strlen(word), word) == 0) {
			p += std::strlen(word);
			v.kind = kind;
			v.b = b;
			return true;
		}
	char *end = nullptr;
	v.num = std::strtoull(s.c_str() + p, &end, 10);
	if (end == s.c_str() + p)
		return false;
	p = std::size_t(end - s.c_str());
	if (p < s.size() && s[p] == '.')
		for (p++; p < s.size() && std::isdigit((unsigned char)s[p]); p++)
			;
	v.kind = Json::number;
	return true;
}

/* The last line of `virtkit trace --json`, parsed. */
Json final_object(const std::string &out)
{
	std::string last;
	std::size_t b = 0;
	while (b < out.size()) {
		std::size_t e = out.find('\n', b);
		if (e == std::string::npos)
			e = out.size();
		if (e > b)
			last = out.substr(b, e - b);
		b = e + 1;
	}
	Json j;
	std::size_t p = 0;
	TEST_ASSERT(parse(last, p, j) && j.kind == Json::object, "not JSON: %s", last.c_str());
	TEST_ASSERT(j["final"].b, "last object is not final: %s", last.c_str());
	return j;
}

} // namespace

/*
 * Two VM processes with known exits, one traced: its counts must be exact,
 * the other's absent. Sub-page protection on the given backend.
 */
static void check_known_exits(SppBackendKind backend)
{
	require_tracing();
	tool();
	TEST_REQUIRE(vkt::kvm().has(KVM_CAP_READONLY_MEM), "KVM_CAP_READONLY_MEM (SPP)");
	if (backend == SppBackendKind::kmod) {
		struct stat st;
		TEST_REQUIRE(::stat("/dev/virtkit", &st) == 0, "virtkit.ko (/dev/virtkit)");
	}
	vkt::set_timeout(600);
	const std::uint64_t n = vkt::env_u64("VIRTKIT_TRACE_OUTS", 1000);
	const std::uint64_t m = vkt::env_u64("VIRTKIT_TRACE_WRITES", 100);
	const std::uint64_t d = 5; /* device MMIO writes */
	const std::uint64_t other_n = 300, other_m = 7, other_d = 3;

	int ready[2], go[2];
	TEST_ASSERT(pipe(ready) == 0 && pipe(go) == 0);
	pid_t a = spawn_vm(backend, n, m, d, ready[1], go[0]);
	pid_t b = spawn_vm(backend, other_n, other_m, other_d, ready[1], go[0]);
	close(ready[1]);
	close(go[0]);
	char c;
	TEST_ASSERT(read(ready[0], &c, 1) == 1 && read(ready[0], &c, 1) == 1,
		    "the VM processes did not get ready");

	int sa = -1, sb = -1;
	Traced t = run_trace({"--pid", std::to_string(a), "--json", "--interval", "0.5"}, [&] {
		/* Both start together; the trace ends when process a has gone. */
		TEST_ASSERT(write(go[1], "gg", 2) == 2);
		sa = wait_status(a);
		sb = wait_status(b);
	});
	TEST_ASSERT_EQ(sa, 0);
	TEST_ASSERT_EQ(sb, 0);
	TEST_ASSERT(t.status == 0, "virtkit trace exited %d:\n%s", t.status, t.err.c_str());
	Json j = final_object(t.out);
	TEST_ASSERT_EQ(j["pid"].u64(), std::uint64_t(a));

	const Json &vcpus = j["vcpus"];
	TEST_ASSERT(vcpus.kind == Json::array && vcpus.items.size() == 1,
		    "expected one vCPU of pid %d:\n%s", a, t.out.c_str());
	const Json &v = vcpus.items[0];
	TEST_ASSERT_EQ(v["pid"].u64(), std::uint64_t(a)); /* nothing of pid b */
	if (v["exits"].u64() == 0 && v["pio_out"].u64() > 0)
		throw vkt::Skip{"requires a KVM that traces kvm_exit: this one (" +
				std::string(fs::exists("/sys/module/kvm_pvm") ? "kvm_pvm" : "?") +
				") fires kvm_pio but not kvm_exit; virtkit trace counted " +
				std::to_string(v["pio_out_by_port"]["0x80"].u64()) +
				" port 0x80 exits of " + std::to_string(n)};
	TEST_ASSERT_EQ(v["vcpu"].u64(), 0u);
	vkt::diag("pid %d vcpu 0: %llu exits, %llu port 0x80, %llu SPP traps, %llu MMIO writes "
		  "(want %llu, %llu, %llu+%llu)", a,
		  (unsigned long long)v["exits"].u64(),
		  (unsigned long long)v["pio_out_by_port"]["0x80"].u64(),
		  (unsigned long long)v["spp_traps"].u64(),
		  (unsigned long long)v["mmio_writes"].u64(), (unsigned long long)n,
		  (unsigned long long)m, (unsigned long long)m, (unsigned long long)d);

	/* N outs to the port; every port I/O event is one I/O exit by reason. */
	TEST_ASSERT_EQ(v["pio_out_by_port"]["0x80"].u64(), n);
	const Json &reasons = v["exits_by_reason"];
	std::uint64_t io = reasons["io"].kind == Json::number ? reasons["io"].u64()
							     : reasons["IO_INSTRUCTION"].u64();
	TEST_ASSERT_EQ(io, v["pio_out"].u64() + v["pio_in"].u64());
	TEST_ASSERT(io >= n, "io exits %llu < %llu", (unsigned long long)io, (unsigned long long)n);

	/*
	 * M trapped writes, all on the protected page; the D device writes are
	 * MMIO writes but no traps - unless KVM's MMIO caching is off, when
	 * nothing tells them apart (trace.rst).
	 */
	std::string caching;
	std::ifstream("/sys/module/kvm/parameters/enable_mmio_caching") >> caching;
	TEST_ASSERT_EQ(v["mmio_writes"].u64(), m + d);
	TEST_ASSERT_EQ(v["spp_traps"].u64(), caching == "N" ? m + d : m);
	const Json &pages = v["spp_traps_by_page"];
	if (caching != "N") {
		TEST_ASSERT_EQ(pages.members.size(), 1u);
		TEST_ASSERT_EQ(pages["0x40000000"].u64(), m);
	}

	/* Every exit that re-entered has its latency measured. */
	const Json &lat = v["latency_ns"];
	std::uint64_t hist = 0;
	for (auto &bucket : lat["log2_buckets"].items)
		hist += bucket["count"].u64();
	TEST_ASSERT_EQ(hist, lat["count"].u64());
	TEST_ASSERT(lat["count"].u64() + 1 >= v["exits"].u64() && lat["count"].u64() <= v["exits"].u64(),
		    "latencies %llu, exits %llu", (unsigned long long)lat["count"].u64(),
		    (unsigned long long)v["exits"].u64());
}

VK_TEST(trace_counts_known_exits_of_one_vm)
{
	check_known_exits(SppBackendKind::user);
}

/*
 * The kmod backend completes allowed writes in the kernel, but each one is
 * still KVM's MMIO exit (to the module): counted all the same.
 */
VK_TEST(trace_counts_known_exits_kmod_backend)
{
	check_known_exits(SppBackendKind::kmod);
}

/* Without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (dropped from the bounding set): one line saying so. */
VK_TEST(trace_names_missing_privileges)
{
	require_tracing();
	std::string bin = tool();
	int err[2];
	TEST_ASSERT(pipe2(err, O_CLOEXEC) == 0);
	pid_t p = fork();
	TEST_ASSERT(p >= 0);
	if (p == 0) {
		for (int cap : {21 /* CAP_SYS_ADMIN */, 38 /* CAP_PERFMON */, 39 /* CAP_BPF */})
			if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL)
				_exit(126);
		dup2(err[1], 2);
		execl(bin.c_str(), bin.c_str(), "trace", "--duration", "1", (char *)nullptr);
		_exit(127);
	}
	close(err[1]);
	std::string text;
	drain(err[0], text, 30000);
	close(err[0]);
	TEST_ASSERT_EQ(wait_status(p), 1);
	TEST_ASSERT(text.starts_with("virtkit trace: needs CAP_BPF and CAP_PERFMON (run as root): "
				     "bpf: Operation not permitted"),
		    "%s", text.c_str());
	TEST_ASSERT(text.find('\n') == text.size() - 1, "more than one line:\n%s", text.c_str());
}

VK_TEST(trace_refuses_a_missing_pid)
{
	require_tracing();
	tool();
	/* A pid that was just reaped. */
	pid_t gone = fork();
	TEST_ASSERT(gone >= 0);
	if (gone == 0)
		_exit(0);
	wait_status(gone);
	int out[2];
	TEST_ASSERT(pipe2(out, O_CLOEXEC) == 0);
	std::string bin = tool(), pid = std::to_string(gone);
	pid_t p = fork();
	if (p == 0) {
		dup2(out[1], 2);
		execl(bin.c_str(), bin.c_str(), "trace", "--pid", pid.c_str(), (char *)nullptr);
		_exit(127);
	}
	close(out[1]);
	std::string err;
	drain(out[0], err, 30000);
	close(out[0]);
	TEST_ASSERT_EQ(wait_status(p), 1);
	TEST_ASSERT(err == "virtkit trace: no process with pid " + pid + "\n", "%s", err.c_str());
}
