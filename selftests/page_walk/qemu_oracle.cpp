// SPDX-License-Identifier: MIT
/*
 * page_walk_oracle: the page-walk engine against QEMU's TCG, an independent
 * implementation of x86 paging that has protection keys for user (PKU) and
 * supervisor pages (PKS), which our hosts' CPUs lack.
 *
 * For each CPU model (--cpu, default: max, then Opteron_G3, a model without
 * Page1GB, LA57, PKU, PKS, SMEP and SMAP) and for 4-level and 5-level paging:
 * build the access matrix (access_matrix.cpp), boot the access-probe image
 * under `qemu-system-x86_64 -accel tcg -cpu MODEL`
 * with the case image loaded at PW_CASES_BASE and guest RAM in a file, read
 * the results back from that file when QEMU has exited, and compare every
 * case with the engine's prediction (VK_WALK_QUIRK_IMPLICIT_SMAP_AC and
 * VK_WALK_QUIRK_RSVD_NO_P: QEMU reports
 * reserved-bit faults with P=0). The engine is told the features the image
 * found in CPUID (but Page1GB: QEMU maps 1 GiB pages without it). Cases that need a feature the model lacks (CR4.SMEP,
 * keys) are not run under it; a paging mode it lacks (LA57) is a skip.
 * KTAP output; exit 0 when every case agrees, 1 otherwise.
 *
 * Usage: page_walk_oracle --probe PROBE.bin [--qemu PATH] [--timeout SECONDS]
 *                         [--keep DIR] [--cpu MODEL]...
 */
#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "access_matrix.hpp"
#include "page_walk.h"

extern char **environ;

namespace pwm = virtkit::page_walk_matrix;
namespace fs = std::filesystem;

namespace {

struct Args {
	std::string probe;
	std::string qemu = "qemu-system-x86_64";
	int timeout = 600;
	std::string keep;
	std::vector<std::string> cpus;
};

[[noreturn]] void usage()
{
	std::cerr << "usage: page_walk_oracle --probe PROBE.bin [--qemu PATH] "
		     "[--timeout SECONDS] [--keep DIR] [--cpu MODEL]...\n";
	std::exit(2);
}

Args parse(int argc, char **argv)
{
	Args a;
	for (int i = 1; i < argc; i++) {
		std::string s = argv[i];
		if (i + 1 >= argc)
			usage();
		if (s == "--probe")
			a.probe = argv[++i];
		else if (s == "--qemu")
			a.qemu = argv[++i];
		else if (s == "--timeout")
			a.timeout = std::atoi(argv[++i]);
		else if (s == "--keep")
			a.keep = argv[++i];
		else if (s == "--cpu")
			a.cpus.push_back(argv[++i]);
		else
			usage();
	}
	if (a.probe.empty() || a.timeout <= 0)
		usage();
	if (a.cpus.empty())
		a.cpus = {"max", "Opteron_G3"};
	return a;
}

void write_file(const fs::path &p, const std::vector<std::byte> &bytes)
{
	std::ofstream f(p, std::ios::binary | std::ios::trunc);
	f.write(reinterpret_cast<const char *>(bytes.data()), bytes.size());
	if (!f)
		throw std::runtime_error("writing " + p.string() + " failed");
}

std::vector<std::byte> read_file(const fs::path &p, std::uint64_t offset, std::size_t size)
{
	std::ifstream f(p, std::ios::binary);
	std::vector<std::byte> v(size);
	f.seekg(offset);
	f.read(reinterpret_cast<char *>(v.data()), size);
	if (!f)
		throw std::runtime_error("reading " + p.string() + " failed");
	return v;
}

/* Run argv with stdout and stderr to log; its exit status, or -1 on timeout. */
int run(const std::vector<std::string> &argv, const fs::path &log, int timeout)
{
	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
	posix_spawn_file_actions_adddup2(&fa, 1, 2);
	std::vector<char *> args;
	for (auto &s : argv)
		args.push_back(const_cast<char *>(s.c_str()));
	args.push_back(nullptr);
	pid_t pid;
	int err = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
	posix_spawn_file_actions_destroy(&fa);
	if (err)
		throw std::runtime_error("starting " + argv[0] + " failed: " + std::strerror(err));
	auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout);
	for (;;) {
		int status;
		pid_t r = waitpid(pid, &status, WNOHANG);
		if (r == pid)
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		if (r < 0)
			throw std::runtime_error(std::string("waitpid failed: ") + std::strerror(errno));
		if (std::chrono::steady_clock::now() > deadline) {
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			return -1;
		}
		std::this_thread::sleep_for(std::chrono::milliseconds(20));
	}
}

std::string features(std::uint32_t f)
{
	std::string s;
	const char *names[] = {"NX", "SMEP", "SMAP", "PKU", "PKS", "LA57", "Page1GB"};
	for (int i = 0; i < 7; i++)
		if (f & 1u << i)
			s += std::string(s.empty() ? "" : " ") + names[i];
	return s.empty() ? "none" : s;
}

struct Outcome {
	pwm::Matrix matrix;
	pwm::Report report;
	double seconds;
	bool no_la57 = false;	/* 5-level asked, the CPU model has no LA57 */
};

/* Build, boot, read back and compare one paging mode on one CPU model. */
Outcome run_mode(const Args &a, const fs::path &dir, const std::string &cpu, bool la57)
{
	pwm::Options o;
	o.la57 = la57;
	o.sets = {pwm::Set::keys, pwm::Set::keys_large, pwm::Set::paging, pwm::Set::reserved,
		  pwm::Set::noncanonical, pwm::Set::pks_c};
	pwm::Matrix m = pwm::build_matrix(o);

	const std::string tag = cpu + "-" + (la57 ? "5level" : "4level");
	const fs::path image = dir / ("cases-" + tag + ".bin");
	const fs::path ram = dir / ("ram-" + tag);
	const fs::path log = dir / ("qemu-" + tag + ".log");
	write_file(image, m.image);
	/* Guest RAM: the image and 2 MiB to spare, in whole MiB. */
	const std::uint64_t mib = (PW_CASES_BASE + m.image.size() + (2u << 20) + (1u << 20) - 1) >> 20;
	const std::vector<std::string> argv = {
		a.qemu, "-accel", "tcg", "-cpu", cpu, "-machine", "pc,memory-backend=ram",
		"-m", std::to_string(mib) + "M",
		"-object", "memory-backend-file,id=ram,size=" + std::to_string(mib) + "M,mem-path=" +
			ram.string() + ",share=on",
		"-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
		"-no-reboot", "-kernel", a.probe,
		"-device", "loader,file=" + image.string() + ",addr=" + std::to_string(PW_CASES_BASE) +
			",force-raw=on",
		"-device", "isa-debug-exit,iobase=" + std::to_string(PW_EXIT_PORT) + ",iosize=4"};
	std::cout << "# " << cpu << ", " << (la57 ? "5" : "4") << "-level: " << m.ncases()
		  << " cases;";
	for (auto &s : argv)
		std::cout << ' ' << s;
	std::cout << std::endl;

	auto start = std::chrono::steady_clock::now();
	int rc = run(argv, log, a.timeout);
	double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
	/*
	 * isa-debug-exit: QEMU exits with (value << 1) | 1, and the image
	 * wrote its status into the header too: compare() explains it.
	 */
	if (rc < 0 || !(rc & 1)) {
		std::string msg = rc < 0 ? "QEMU did not finish within " + std::to_string(a.timeout) + " s"
					 : "QEMU exited with status " + std::to_string(rc) +
						   " without the probe image's exit (a triple fault?)";
		std::ifstream l(log);
		std::string text((std::istreambuf_iterator<char>(l)), std::istreambuf_iterator<char>());
		throw std::runtime_error(msg + "; its output: " + (text.empty() ? "(none)" : text));
	}
	auto after = read_file(ram, PW_CASES_BASE, m.image.size());
	fs::remove(ram);
	pw_header out;
	std::memcpy(&out, after.data(), sizeof(out));
	if (la57 && out.out.status == PW_EXIT_NO_LA57)
		return {std::move(m), {}, secs, true};
	/*
	 * QEMU's TCG (7.2, measured with -cpu Opteron_G3) maps a PDPTE with
	 * PS as a 1 GiB page whatever CPUID says: the engine is told it has
	 * Page1GB. (KVM does check the rule against the vCPU's CPUID: see
	 * selftests/x86/page_walk_vcpu.cpp.)
	 */
	pwm::Report rep = pwm::compare(m, after,
				       VK_WALK_QUIRK_RSVD_NO_P | VK_WALK_QUIRK_IMPLICIT_SMAP_AC,
				       PW_FEAT_PAGE1GB);
	return {std::move(m), std::move(rep), secs};
}

} // namespace

int main(int argc, char **argv)
{
	Args a = parse(argc, argv);
	std::cout << "TAP version 13" << std::endl;

	fs::path dir;
	if (!a.keep.empty()) {
		dir = a.keep;
		fs::create_directories(dir);
	} else {
		std::string t = (fs::temp_directory_path() / "virtkit-pw-oracle.XXXXXX").string();
		if (!mkdtemp(t.data())) {
			std::cerr << "page_walk_oracle: mkdtemp: " << std::strerror(errno) << '\n';
			return 1;
		}
		dir = t;
	}

	struct Line {
		bool ok;
		std::string text;
	};
	std::vector<Line> lines;
	std::vector<std::string> diag;
	std::size_t total = 0, mismatches = 0;
	for (const std::string &cpu : a.cpus)
	for (bool la57 : {false, true}) {
		const std::string mode = cpu + ", " + (la57 ? "5-level" : "4-level");
		try {
			Outcome o = run_mode(a, dir, cpu, la57);
			if (o.no_la57) {
				lines.push_back({true, mode + " # SKIP the CPU model has no LA57 "
							      "(CPUID (7,0):ECX[16] clear in the guest)"});
				continue;
			}
			const pwm::Report &r = o.report;
			/* Cases left out are fine only where the model lacks what they need. */
			const std::uint32_t keyed = PW_FEAT_SMEP | PW_FEAT_SMAP | PW_FEAT_PKU |
						    PW_FEAT_PKS | PW_FEAT_NX;
			const bool narrow = (r.features & keyed) != keyed;
			char buf[200];
			std::snprintf(buf, sizeof(buf),
				      "%s: %zu cases in %.1f s; guest CPUID: %s, MAXPHYADDR %u",
				      mode.c_str(), r.cases, o.seconds, features(r.features).c_str(),
				      r.maxphyaddr);
			diag.push_back(buf);
			total += r.cases;
			mismatches += r.mismatches;
			for (auto &s : r.sets) {
				std::snprintf(buf, sizeof(buf), "%s: %s: %zu cases, %zu mismatches",
					      mode.c_str(), pwm::set_name(s.set), s.cases,
					      s.mismatches);
				std::string t = buf;
				if (s.not_run)
					t += ", " + std::to_string(s.not_run) +
					     " not run (the guest CPU lacks a feature they need)";
				if (s.cases > 0 && s.not_run == s.cases && narrow) {
					lines.push_back({true, t + " # SKIP the CPU model lacks what "
								   "every case of the set needs"});
					continue;
				}
				lines.push_back({s.mismatches == 0 && (s.not_run == 0 || narrow) &&
							 s.cases > s.not_run,
						 t});
			}
			for (auto &n : r.named)
				lines.push_back({n.engine_ok && n.cpu_ok,
						 mode + ": x86/pks.c: " + n.name +
							 (n.engine_ok ? "" : " (the engine disagrees with pks.c)") +
							 (n.cpu_ok ? "" : " (QEMU disagrees with pks.c)")});
			std::string outcomes;
			for (const auto &line : pwm::outcome_summary(r))
				outcomes += (outcomes.empty() ? "" : "; ") + line;
			diag.push_back(mode + " outcomes: " + outcomes);
			for (auto &s : r.first_mismatches)
				diag.push_back(mode + " mismatch: " + s);
		} catch (const std::exception &e) {
			lines.push_back({false, mode + ": the oracle did not run: " + e.what()});
		}
	}

	std::cout << "1.." << lines.size() << '\n';
	for (auto &d : diag)
		std::cout << "# " << d << '\n';
	std::size_t pass = 0, fail = 0, skip = 0;
	for (std::size_t i = 0; i < lines.size(); i++) {
		std::cout << (lines[i].ok ? "ok " : "not ok ") << i + 1 << ' ' << lines[i].text << '\n';
		if (lines[i].text.find("# SKIP") != std::string::npos)
			skip++;
		else
			(lines[i].ok ? pass : fail)++;
	}
	std::cout << "# matrix: " << total << " cases, " << mismatches << " mismatches\n";
	std::cout << "# Totals: pass:" << pass << " fail:" << fail
		  << " xfail:0 xpass:0 skip:" << skip << " error:0" << std::endl;
	std::string models;
	for (const auto &c : a.cpus)
		models += (models.empty() ? "" : ", ") + c;
	std::cout << "# summary: suite=page_walk_oracle platform=QEMU TCG (-cpu " << models
		  << ") pass=" << pass << " fail=" << fail << " skip=" << skip << std::endl;
	if (a.keep.empty())
		fs::remove_all(dir);
	return fail ? 1 : 0;
}
