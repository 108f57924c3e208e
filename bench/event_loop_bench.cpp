// SPDX-License-Identifier: MIT
/*
 * event_loop_bench - what EventLoop's backends cost per event, in figures.
 *
 * Not a test: no thresholds, a plain table on stdout. No KVM either: each
 * VMM is a thread of this program on one end of a socketpair that sends a
 * KVMI PAUSE_VCPU event and waits for the reply, over and over (the vCPU of
 * a real VMM waits the same way); the tool end is an EventLoop that answers
 * every event CONTINUE. With 1 VMM the figure is the event round trip; with
 * 8 it is how many events one loop thread serves while all of them wait.
 *
 * Rounds alternate: io_uring, epoll, and the baseline - the same VMMs each
 * served by a thread of its own calling Session::next_event() and reply()
 * (a blocking poll(2) and recv per event, no loop). Medians of the rounds
 * and the ratio of medians are printed. Built with -DEVENT_LOOP_BENCH_LEGACY
 * against an older libvirtkit-introspect (without LoopBackend), it measures
 * that library's EventLoop in the io_uring column instead, for a
 * before/after comparison on the same machine.
 *
 * Guest-code build flags (like the other benchmarks): integer arithmetic.
 */
#include <virtkit/introspect.hpp>

#include "bench_util.hpp"

#include <linux/virtkit_kvmi.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

using namespace virtkit;
namespace intro = virtkit::introspect;

namespace {

constexpr int rounds = 5;
constexpr std::uint64_t events_per_round = 20000;

void write_all(int fd, const void *p, std::size_t n)
{
	auto *b = static_cast<const char *>(p);
	while (n) {
		ssize_t w = ::send(fd, b, n, MSG_NOSIGNAL);
		check(w > 0, "VMM send: %s", std::strerror(errno));
		b += w;
		n -= std::size_t(w);
	}
}

void read_exact(int fd, void *p, std::size_t n)
{
	auto *b = static_cast<char *>(p);
	while (n) {
		ssize_t r = ::recv(fd, b, n, 0);
		check(r > 0, "VMM recv: %s", r == 0 ? "EOF" : std::strerror(errno));
		b += r;
		n -= std::size_t(r);
	}
}

/* One VMM: handshake, then events one at a time until count replies came. */
struct Vmm {
	FileDesc fd;
	std::uint64_t count;

	void handshake()
	{
		kvmi_qemu2introspector q{};
		q.struct_size = sizeof(q);
		std::strcpy(q.name, "bench");
		write_all(fd.get(), &q, sizeof(q));
		kvmi_introspector2qemu a;
		read_exact(fd.get(), &a, sizeof(a));
	}

	void run()
	{
		struct {
			kvmi_msg_hdr hdr;
			kvmi_event ev;
		} msg{};
		msg.hdr.id = KVMI_EVENT;
		msg.hdr.size = sizeof(msg.ev);
		msg.ev.size = sizeof(msg.ev);
		msg.ev.event = KVMI_EVENT_PAUSE_VCPU;
		msg.ev.arch.mode = 8;
		char reply[256];
		for (std::uint64_t i = 0; i < count; i++) {
			msg.hdr.seq = std::uint32_t(i + 1);
			write_all(fd.get(), &msg, sizeof(msg));
			kvmi_msg_hdr h;
			read_exact(fd.get(), &h, sizeof(h));
			check(h.id == KVMI_EVENT_REPLY && h.seq == msg.hdr.seq && h.size <= sizeof(reply),
			      "reply id %u seq %u", h.id, h.seq);
			read_exact(fd.get(), reply, h.size);
		}
		fd.close(); /* the session ends; the loop has nothing left */
	}
};

enum class Mode { io_uring, epoll, threads };

/* Sessions and their VMMs on socketpairs, handshakes done. */
void connect(int vms, std::vector<intro::Session> &sessions, std::vector<Vmm> &vmm)
{
	for (int v = 0; v < vms; v++) {
		int sv[2];
		check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
		auto tool = FileDesc::adopt(sv[0], "socketpair");
		vmm.push_back(Vmm{FileDesc::adopt(sv[1], "socketpair"), events_per_round / vms});
		std::thread t([&vmm, v] { vmm[v].handshake(); });
		sessions.push_back(intro::Session::handshake(std::move(tool), "", std::chrono::seconds(5)));
		t.join();
	}
}

/* Nanoseconds for events_per_round events from vms VMMs. */
std::uint64_t round_ns(Mode mode, int vms, std::string &backend)
{
	std::vector<intro::Session> sessions;
	std::vector<Vmm> vmm;
	vmm.reserve(vms);
	connect(vms, sessions, vmm);
	std::atomic<std::uint64_t> answered{0};
	std::vector<std::thread> peers;
	std::exception_ptr failed;

	auto start = Clock::now();
	for (auto &m : vmm)
		peers.emplace_back([&m, &failed] {
			try {
				m.run();
			} catch (...) {
				failed = std::current_exception();
			}
		});
	if (mode == Mode::threads) {
		std::vector<std::thread> servers;
		for (auto &s : sessions)
			servers.emplace_back([&s, &answered] {
				try {
					while (auto ev = s.next_event(std::chrono::seconds(10))) {
						s.reply(*ev, intro::Action::continue_);
						answered++;
					}
				} catch (const Error &) {
					/* the VMM closed its end: done */
				}
			});
		for (auto &p : peers)
			p.join();
		for (auto &t : servers)
			t.join();
		backend = "a thread per session";
	} else {
		intro::EventLoop::Handlers h;
		h.on_event = [&](intro::Session &s, intro::Event &ev) {
			s.reply(ev, intro::Action::continue_);
			answered++;
		};
#ifdef EVENT_LOOP_BENCH_LEGACY
		intro::EventLoop loop(h);
		backend = "io_uring (legacy: one-shot poll)";
#else
		intro::EventLoop loop(h, mode == Mode::io_uring ? intro::LoopBackend::io_uring
								 : intro::LoopBackend::epoll);
		backend = loop.backend();
#endif
		for (auto &s : sessions)
			loop.add(std::move(s));
		loop.run(); /* until every VMM has closed */
		for (auto &p : peers)
			p.join();
	}
	auto ns = ns_since(start);
	if (failed)
		std::rethrow_exception(failed);
	std::uint64_t expect = (events_per_round / vms) * vms;
	check(answered == expect, "%llu events answered, expected %llu",
	      (unsigned long long)answered.load(), (unsigned long long)expect);
	return ns;
}

std::uint64_t median(std::vector<std::uint64_t> v)
{
	std::sort(v.begin(), v.end());
	return v[v.size() / 2];
}

} // namespace

int main()
{
	try {
		std::printf("event_loop_bench: %d rounds of %llu events, alternating; medians\n",
			    rounds, (unsigned long long)events_per_round);
		const Mode modes[] = {Mode::io_uring, Mode::epoll, Mode::threads};
		for (int vms : {1, 8}) {
			std::vector<std::uint64_t> ns[3];
			std::string names[3];
			for (int r = 0; r < rounds; r++)
				for (int m = 0; m < 3; m++)
					ns[m].push_back(round_ns(modes[m], vms, names[m]));
			std::uint64_t n = (events_per_round / vms) * vms;
			std::printf("\n%d VMM%s:\n", vms, vms == 1 ? "" : "s");
			for (int m = 0; m < 3; m++) {
				auto med = median(ns[m]);
				std::printf("  %-58s %9s events/s  %7s us/event  (min..max %s..%s ms/round)\n",
					    names[m].c_str(), fixed(n * 1000000000ull, med, 0).c_str(),
					    fixed(med, n * 1000, 2).c_str(),
					    fixed(*std::min_element(ns[m].begin(), ns[m].end()), 1000000, 1).c_str(),
					    fixed(*std::max_element(ns[m].begin(), ns[m].end()), 1000000, 1).c_str());
			}
			std::printf("  ratio io_uring/epoll time %s, io_uring/threads %s\n",
				    fixed(median(ns[0]), median(ns[1]), 3).c_str(),
				    fixed(median(ns[0]), median(ns[2]), 3).c_str());
		}
		return 0;
	} catch (const std::exception &e) {
		std::fprintf(stderr, "event_loop_bench: %s\n", e.what());
		return 1;
	}
}
