// SPDX-License-Identifier: MIT
#include "test.hpp"

#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstring>
#include <exception>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <vector>

#include <virtkit/x86/guest_vm.hpp>

namespace vkt {

namespace {

struct Test {
	const char *name;
	TestFn fn;
};

std::vector<Test> &tests()
{
	static std::vector<Test> t;
	return t;
}

/* Per-test time limit: a hung guest fails the test instead of the run. */
constexpr unsigned timeout_seconds = 300;

std::string vformat(const char *fmt, va_list ap)
{
	va_list ap2;
	va_copy(ap2, ap);
	int n = std::vsnprintf(nullptr, 0, fmt, ap2);
	va_end(ap2);
	std::string s(n > 0 ? n : 0, '\0');
	std::vsnprintf(s.data(), s.size() + 1, fmt, ap);
	return s;
}

} // namespace

void set_timeout(unsigned seconds)
{
	alarm(seconds);
}

namespace {

/* Child side: run one test; the exit code and a line on the pipe report it. */
[[noreturn]] void run_child(const Test &t, int report_fd)
{
	int code = 0;
	std::string reason;
	alarm(timeout_seconds);
	try {
		t.fn();
	} catch (const Skip &s) {
		code = 4;
		reason = s.reason;
	} catch (const Failure &f) {
		code = 1;
		reason = f.message;
	} catch (const virtkit::x86::GuestFailure &g) {
		code = 1;
		reason = std::string("guest failed: ") + g.what();
	} catch (const virtkit::Error &e) {
		code = 1;
		reason = std::string("unexpected virtkit::Error: ") + e.what();
	} catch (const std::exception &e) {
		code = 1;
		reason = std::string("unexpected exception: ") + e.what();
	}
	std::fflush(stdout);
	if (!reason.empty()) {
		for (auto &c : reason)
			if (c == '\n')
				c = ' ';
		(void)!write(report_fd, reason.data(), reason.size());
	}
	_exit(code);
}

} // namespace

Registrar::Registrar(const char *name, TestFn fn) { tests().push_back({name, fn}); }

void fail(const char *file, int line, const std::string &what)
{
	throw Failure{std::string(file) + ":" + std::to_string(line) + ": " + what};
}

void fail_cond(const char *file, int line, const char *cond)
{
	fail(file, line, std::string("assertion failed: ") + cond);
}

void fail_cond(const char *file, int line, const char *cond, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	std::string s = vformat(fmt, ap);
	va_end(ap);
	fail(file, line, std::string("assertion failed: ") + cond + ": " + s);
}

std::string format(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	std::string s = vformat(fmt, ap);
	va_end(ap);
	return s;
}

void diag(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	std::string s = vformat(fmt, ap);
	va_end(ap);
	std::printf("# %s\n", s.c_str());
	std::fflush(stdout);
}

virtkit::System &kvm()
{
	static std::optional<virtkit::System> sys;
	if (!sys) {
		if (access("/dev/kvm", R_OK | W_OK) != 0)
			throw Skip{"requires read/write access to /dev/kvm"};
		sys.emplace(virtkit::System::open());
	}
	return *sys;
}

std::uint64_t env_u64(const char *name, std::uint64_t dflt)
{
	const char *v = getenv(name);
	return v && *v ? strtoull(v, nullptr, 0) : dflt;
}

int open_fd_count()
{
	int n = 0;
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		fail(__FILE__, __LINE__, "opendir(/proc/self/fd) failed");
	while (auto *e = readdir(d))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the directory stream itself */
}

/*
 * Built with AddressSanitizer or ThreadSanitizer (make check-asan,
 * check-tsan), the runtime maps and unmaps anonymous memory of its own at
 * any time and anywhere: shadow, allocator regions, per-thread state. Then
 * only the mappings with a name are counted. That leaves out nothing
 * virtkit maps: guest memory is a memfd ("/memfd:virtkit-... (deleted)"),
 * kvm_run and the dirty ring are the vCPU's anon_inode
 * ("anon_inode:kvm-vcpu:N"), and the library makes no anonymous mappings.
 * Without a sanitizer every mapping is counted.
 */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
static constexpr bool sanitized = true;
#else
static constexpr bool sanitized = false;
#endif

bool sanitizer_build()
{
	return sanitized;
}

/* The path or name column of a /proc/self/maps line; empty if anonymous. */
static std::string mapping_name(const std::string &line)
{
	std::istringstream in(line);
	std::string field, name;
	for (int i = 0; i < 5 && in >> field; i++)
		;
	std::getline(in >> std::ws, name);
	return name;
}

std::vector<std::string> mappings()
{
	std::ifstream maps("/proc/self/maps");
	std::vector<std::string> v;
	for (std::string line; std::getline(maps, line);) {
		/*
		 * In a forked test, heap growth adds a second [heap] line instead
		 * of extending the inherited one: the heap is not what a leak
		 * check looks for, so it is left out.
		 */
		if (line.ends_with("[heap]"))
			continue;
		if (sanitized && mapping_name(line).empty())
			continue;
		v.push_back(line);
	}
	return v;
}

int mapping_count()
{
	return static_cast<int>(mappings().size());
}

bool same_region(const virtkit::RegionInfo &a, const virtkit::RegionInfo &b)
{
	return a.id == b.id && a.gpa == b.gpa && a.size == b.size && a.host == b.host &&
	       a.options.readonly == b.options.readonly &&
	       a.options.dirty_log == b.options.dirty_log && a.options.name == b.options.name;
}

bool same_layout(const std::vector<virtkit::RegionInfo> &a,
		 const std::vector<virtkit::RegionInfo> &b)
{
	return std::equal(a.begin(), a.end(), b.begin(), b.end(), same_region);
}

} // namespace vkt

int main(int argc, char **argv)
{
	using namespace vkt;
	std::set<std::string> only;
	int opt;
	while ((opt = getopt(argc, argv, "lt:h")) != -1) {
		switch (opt) {
		case 'l':
			for (auto &t : tests())
				std::printf("%s\n", t.name);
			return 0;
		case 't':
			only.insert(optarg);
			break;
		default:
			std::fprintf(stderr, "usage: %s [-l] [-t TEST]...\n", argv[0]);
			return opt == 'h' ? 0 : 2;
		}
	}
	std::vector<Test> run;
	for (auto &t : tests())
		if (only.empty() || only.count(t.name))
			run.push_back(t);

	std::printf("TAP version 13\n1..%zu\n", run.size());
	std::fflush(stdout);
	unsigned pass = 0, failed = 0, skip = 0, n = 0;
	for (auto &t : run) {
		n++;
		int pfd[2];
		if (pipe(pfd) < 0) {
			std::perror("pipe");
			return 1;
		}
		pid_t pid = fork();
		if (pid < 0) {
			std::perror("fork");
			return 1;
		}
		if (pid == 0) {
			close(pfd[0]);
			run_child(t, pfd[1]);
		}
		close(pfd[1]);
		std::string reason;
		char buf[512];
		ssize_t r;
		while ((r = read(pfd[0], buf, sizeof(buf))) > 0)
			reason.append(buf, r);
		close(pfd[0]);
		int status = 0;
		waitpid(pid, &status, 0);
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
			pass++;
			std::printf("ok %u %s\n", n, t.name);
		} else if (WIFEXITED(status) && WEXITSTATUS(status) == 4) {
			skip++;
			std::printf("ok %u %s # SKIP %s\n", n, t.name, reason.c_str());
		} else {
			failed++;
			if (WIFSIGNALED(status))
				reason = std::string("killed by signal ") + strsignal(WTERMSIG(status)) +
					 (WTERMSIG(status) == SIGALRM ? " (test timed out)" : "");
			std::printf("# %s: %s\nnot ok %u %s\n", t.name, reason.c_str(), n, t.name);
		}
		std::fflush(stdout);
	}
	std::printf("# Totals: pass:%u fail:%u xfail:0 xpass:0 skip:%u error:0\n", pass, failed,
		    skip);
	if (failed)
		return 1;
	if (skip && !pass)
		return 4;
	return 0;
}
