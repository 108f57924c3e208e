// SPDX-License-Identifier: MIT
/*
 * kvmi_scale_bench - what one tool's event loop costs per event when it
 * watches many VMs at once, against one VM.
 *
 * Usage: kvmi_scale_bench [VMS [VCPUS]]   (default 64 VMs x 4 vCPUs)
 *
 * Not a test: no thresholds, a plain table on stdout. Every VM is a
 * libvirtkit Vm whose vCPUs run the hand-assembled WRMSR loop of
 * bench_rounds.hpp, each on a thread of its own; each WRMSR is a KVMI MSR
 * event. The tool is one thread of this program running one
 * introspect::EventLoop (the one a tool watching many VMs uses), which has
 * every vCPU's MSR events enabled and answers each event CONTINUE (the
 * loop's default). Two configurations are set up once and then run in
 * alternating rounds: the baseline, one VM with one vCPU, and the subject,
 * VMS VMs with VCPUS vCPUs each, all running at once.
 *
 * The figure is CPU time per event: the user and system time of this whole
 * process (vCPU threads, the library's threads, the tool's loop) from
 * getrusage(RUSAGE_SELF), over the round's events. On a machine with fewer
 * cores than vCPUs the wall-clock round trip grows with the number of vCPUs
 * waiting; the CPU each event costs should not (issue 19: <= 1.3x). Also
 * printed: events per second per core (events / CPU seconds) and the
 * wall-clock time of the rounds. Every round checks that each vCPU made
 * exactly its writes (the last value of its MSR) and that the tool saw every
 * event.
 *
 * Like the other benchmarks, this file is built as guest code
 * (-mgeneral-regs-only): integer arithmetic only.
 */
#include <virtkit/introspect.hpp>
#include <virtkit/introspection.hpp>
#include <virtkit/virtkit.hpp>

#include "bench_rounds.hpp"
#include "bench_util.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace virtkit;
namespace intro = virtkit::introspect;

namespace {

constexpr std::uint32_t bench_msr = rounds::msr_index;
constexpr int n_rounds = 7;
/* Events per round: the baseline's one vCPU makes all of them; each of
 * the subject's vCPUs makes its share (at least min_per_vcpu). */
constexpr std::uint64_t events_per_round = 4000;
constexpr std::uint64_t min_per_vcpu = 16;
constexpr const char *secret = "kvmi-scale-bench";

std::uint64_t cpu_ns()
{
	rusage u{};
	check(::getrusage(RUSAGE_SELF, &u) == 0, "getrusage: %s", std::strerror(errno));
	auto ns = [](const timeval &t) {
		return std::uint64_t(t.tv_sec) * 1000000000ull + std::uint64_t(t.tv_usec) * 1000ull;
	};
	return ns(u.ru_utime) + ns(u.ru_stime);
}

/*
 * The tool: one EventLoop on its own thread. Each session gets MSR events
 * for bench_msr on every vCPU before it counts as ready; every event is
 * counted and answered CONTINUE.
 */
class Tool {
public:
	explicit Tool(const std::string &path)
		: path_(path), loop_(intro::EventLoop::Handlers{
				       .on_session = [this](intro::Session &s) { setup(s); },
				       .on_event =
					       [this](intro::Session &s, intro::Event &e) {
						       events_.fetch_add(1, std::memory_order_relaxed);
						       s.reply(e, intro::Action::continue_);
					       },
				       .on_disconnect = {},
				       .on_error = [this](const Error &e) { note_error(e.what()); },
			       })
	{
		loop_.listen(intro::Listener::unix_socket(path), secret);
		thread_ = std::thread([this] {
			try {
				loop_.run();
			} catch (const std::exception &e) {
				note_error(e.what());
			}
		});
	}
	~Tool()
	{
		loop_.stop();
		if (thread_.joinable())
			thread_.join();
		::unlink(path_.c_str());
	}

	const std::string &path() const { return path_; }
	const std::string &backend() const { return loop_.backend(); }
	std::uint64_t events() const { return events_.load(); }
	std::uint32_t ready() const { return ready_.load(); }
	void check_ok()
	{
		std::lock_guard lock(mutex_);
		check(error_.empty(), "tool: %s", error_.c_str());
	}

private:
	void setup(intro::Session &s)
	{
		std::uint32_t n = s.get_guest_info();
		for (std::uint16_t v = 0; v < n; v++) {
			s.control_events(v, intro::EventId::msr, true);
			s.control_msr(v, bench_msr, true);
		}
		ready_++;
	}
	void note_error(const std::string &what)
	{
		std::lock_guard lock(mutex_);
		if (error_.empty())
			error_ = what;
	}

	std::string path_;
	intro::EventLoop loop_;
	std::thread thread_;
	std::atomic<std::uint64_t> events_{0};
	std::atomic<std::uint32_t> ready_{0};
	std::mutex mutex_;
	std::string error_;
};

/* One VM running the WRMSR blob on each of its vCPUs, introspected by the tool. */
struct BlobVm {
	Vm vm;
	std::vector<Vcpu> vcpus;
	Introspection intro;

	BlobVm(const System &sys, int kvm_fd, unsigned n_vcpus, const Tool &tool, unsigned index)
		: vm(sys.create_vm())
	{
		vm.memory().add(rounds::ram_gpa, rounds::ram_size, {.name = "ram"});
		rounds::write_image(reinterpret_cast<std::uint8_t *>(vm.memory().host_ptr(
					    rounds::ram_gpa, rounds::ram_size)),
				    rounds::blob_wrmsr, sizeof(rounds::blob_wrmsr));
		for (unsigned i = 0; i < n_vcpus; i++) {
			vcpus.push_back(vm.create_vcpu(i));
			rounds::setup_long_mode(kvm_fd, vcpus.back().fd());
		}
		IntrospectionOptions o;
		o.address = "unix:" + tool.path();
		o.secret = secret;
		o.name = "scale-" + std::to_string(index);
		intro = Introspection::connect(vm, o);
	}
};

struct Config {
	const char *label;
	std::vector<std::unique_ptr<BlobVm>> vms;
	std::uint64_t per_vcpu = 0;

	std::uint64_t vcpu_count() const
	{
		std::uint64_t n = 0;
		for (auto &v : vms)
			n += v->vcpus.size();
		return n;
	}
	std::uint64_t events() const { return vcpu_count() * per_vcpu; }
};

struct Round {
	std::uint64_t cpu_ns, wall_ns, events;
};

/* Runs every vCPU of c through per_vcpu WRMSRs at once; the values written
 * start at `first` (a different value every round, checked at the end). */
Round run(Config &c, Tool &tool, std::uint64_t first)
{
	std::vector<Vcpu *> all;
	for (auto &vm : c.vms)
		for (auto &v : vm->vcpus)
			all.push_back(&v);
	std::barrier start(std::ptrdiff_t(all.size() + 1));
	std::vector<std::string> errors(all.size());
	std::vector<std::thread> threads;
	for (std::size_t i = 0; i < all.size(); i++) {
		threads.emplace_back([&, i] {
			Vcpu &v = *all[i];
			try {
				v.set_regs(rounds::blob_regs(first, bench_msr, 0, c.per_vcpu, 0));
			} catch (const std::exception &e) {
				errors[i] = e.what();
			}
			start.arrive_and_wait();
			if (!errors[i].empty())
				return;
			try {
				for (;;) {
					Exit e = v.run();
					if (std::holds_alternative<HltExit>(e))
						break;
					errors[i] = "unexpected exit " + std::to_string(e.index());
					return;
				}
				if (v.msr(bench_msr) != first + c.per_vcpu - 1)
					errors[i] = "the last MSR value is wrong";
			} catch (const std::exception &e) {
				errors[i] = e.what();
			}
		});
	}
	std::uint64_t e0 = tool.events();
	std::uint64_t c0 = cpu_ns();
	auto t0 = Clock::now();
	start.arrive_and_wait();
	for (auto &t : threads)
		t.join();
	Round r{cpu_ns() - c0, ns_since(t0), tool.events() - e0};
	for (std::size_t i = 0; i < errors.size(); i++)
		check(errors[i].empty(), "%s, vCPU thread %zu: %s", c.label, i, errors[i].c_str());
	tool.check_ok();
	check(r.events == c.events(), "%s: the tool saw %llu events, %llu expected", c.label,
	      (unsigned long long)r.events, (unsigned long long)c.events());
	return r;
}

unsigned arg(int argc, char **argv, int i, unsigned dflt, unsigned max)
{
	if (argc <= i)
		return dflt;
	char *end = nullptr;
	unsigned long v = std::strtoul(argv[i], &end, 10);
	if (!*argv[i] || *end || v < 1 || v > max) {
		std::fprintf(stderr, "usage: kvmi_scale_bench [VMS [VCPUS]] (VMS 1-%u, VCPUS 1-8)\n",
			     256u);
		std::exit(2);
	}
	return unsigned(v);
}

} // namespace

int main(int argc, char **argv)
{
	unsigned n_vms = arg(argc, argv, 1, 64, 256), n_vcpus = arg(argc, argv, 2, 4, 8);
	try {
		System sys = System::open();
		for (long cap : {KVM_CAP_X86_USER_SPACE_MSR, KVM_CAP_X86_MSR_FILTER}) {
			if (!sys.check_extension(cap)) {
				std::printf("kvmi_scale_bench: skipped: requires %s\n",
					    cap == KVM_CAP_X86_USER_SPACE_MSR
						    ? "KVM_CAP_X86_USER_SPACE_MSR"
						    : "KVM_CAP_X86_MSR_FILTER");
				return 4;
			}
		}
		int kvm_fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
		check(kvm_fd >= 0, "open /dev/kvm: %s", std::strerror(errno));
		long cores = ::sysconf(_SC_NPROCESSORS_ONLN);
		Tool tool("/tmp/kvmi-scale-bench-" + std::to_string(::getpid()) + ".sock");

		auto t_setup = Clock::now();
		Config base{"1 VM x 1 vCPU", {}, events_per_round};
		base.vms.push_back(std::make_unique<BlobVm>(sys, kvm_fd, 1, tool, 0));
		Config subj{"many VMs", {}, 0};
		for (unsigned i = 0; i < n_vms; i++)
			subj.vms.push_back(std::make_unique<BlobVm>(sys, kvm_fd, n_vcpus, tool, i + 1));
		subj.per_vcpu = std::max<std::uint64_t>(min_per_vcpu,
							events_per_round / subj.vcpu_count());
		auto deadline = Clock::now() + std::chrono::seconds(30);
		while (tool.ready() < n_vms + 1) {
			check(Clock::now() < deadline, "only %u of %u sessions set up in 30 s",
			      tool.ready(), n_vms + 1);
			tool.check_ok();
			std::this_thread::sleep_for(std::chrono::milliseconds(5));
		}
		std::printf("kvmi_scale_bench: libvirtkit %s, %ld CPUs; the tool's loop: %s\n"
			    "  set up %u + 1 introspected VMs in %s ms\n",
			    VIRTKIT_VERSION_STRING, cores, tool.backend().c_str(), n_vms,
			    fixed(ns_since(t_setup), 1000000, 0).c_str());
		std::string subj_label = std::to_string(n_vms) + " VMs x " +
					 std::to_string(n_vcpus) + " vCPUs at once";
		subj.label = subj_label.c_str();

		/* Warm-up, then alternating rounds (which goes first alternates too). */
		std::uint64_t value = 1;
		run(base, tool, value);
		value += 1000000;
		run(subj, tool, value);
		rounds::Series cpu_b, cpu_s, wall_b, wall_s;
		for (int r = 0; r < n_rounds; r++) {
			for (int k = 0; k < 2; k++) {
				bool b = (k == 0) != bool(r & 1);
				value += 1000000;
				Round x = run(b ? base : subj, tool, value);
				(b ? cpu_b : cpu_s).add(x.cpu_ns, x.events);
				(b ? wall_b : wall_s).add(x.wall_ns, x.events);
			}
		}
		rounds::Comparison c{cpu_b, cpu_s};
		auto row = [](const std::string &label, const rounds::Series &s) {
			std::printf("  %-44s %10s  [%s - %s]\n", label.c_str(),
				    rounds::ps_str(s.median()).c_str(), rounds::ps_str(s.min()).c_str(),
				    rounds::ps_str(s.max()).c_str());
		};
		std::printf("\nCPU time per MSR event, the whole process (%d rounds; %llu events "
			    "a round for 1 VM, %llu for %s; median [min-max]):\n",
			    n_rounds, (unsigned long long)base.events(),
			    (unsigned long long)subj.events(), subj.label);
		row(std::string(base.label), cpu_b);
		row(subj_label, cpu_s);
		std::printf("  %-44s %10s\n", "ratio many/one (medians)", c.ratio().c_str());
		auto per_core = [](const rounds::Series &s) {
			return fixed(1000000000000ull, s.median() ? s.median() : 1, 0);
		};
		std::printf("  events/s per core:  1 VM %s, %s %s\n", per_core(cpu_b).c_str(),
			    subj.label, per_core(cpu_s).c_str());
		std::printf("wall-clock time per event (all vCPUs wait on %ld CPUs):\n", cores);
		row(std::string(base.label), wall_b);
		row(subj_label, wall_s);

		std::string g = "KVMI CPU per event, " + std::to_string(n_vms) + " VMs x " +
				std::to_string(n_vcpus) + " vCPUs <= 1.3x 1 VM";
		rounds::goal(g,
			     c.ratio() + "x (" + rounds::ps_str(cpu_s.median()) + " vs " +
				     rounds::ps_str(cpu_b.median()) + "; " + per_core(cpu_s) +
				     " events/s/core)",
			     c.ratio_x100() <= 130);
		::close(kvm_fd);
	} catch (const std::exception &e) {
		std::fprintf(stderr, "kvmi_scale_bench: %s\n", e.what());
		return 1;
	}
	return 0;
}
