// SPDX-License-Identifier: MIT
/*
 * virtkit::introspect::Listener and EventLoop on the host: unix sockets in
 * a temporary directory, VMM peers (introspect_peer.hpp) on their own
 * threads. Every EventLoop test runs on each backend this kernel offers
 * (io_uring, epoll); io_uring made unavailable by a seccomp filter is
 * tested in a child process.
 */
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "introspect_peer.hpp"
#include "kvmi/tool/poller.hpp"

using namespace std::chrono_literals;
using namespace introspect_test;
using virtkit::Error;
using virtkit::introspect::Action;
using virtkit::introspect::Event;
using virtkit::introspect::EventId;
using virtkit::introspect::EventLoop;
using virtkit::introspect::Listener;
using virtkit::introspect::LoopBackend;
using virtkit::introspect::Session;
using virtkit::introspect::SessionOptions;
using Catch::Matchers::Contains;

namespace {

/* A fresh directory, removed with what is left in it. */
struct TempDir {
	std::string path;
	TempDir()
	{
		char t[] = "/tmp/virtkit-introspect-XXXXXX";
		if (!::mkdtemp(t))
			throw std::runtime_error("mkdtemp");
		path = t;
	}
	~TempDir()
	{
		std::string cmd = "rm -rf '" + path + "'";
		if (std::system(cmd.c_str()) != 0) {
		}
	}
	std::string operator/(const std::string &name) const { return path + "/" + name; }
};

template <class F> Error error_of(F &&f)
{
	try {
		f();
	} catch (const Error &e) {
		return e;
	}
	FAIL("no exception");
	return Error("none", 0);
}

bool exists(const std::string &path)
{
	struct stat st;
	return ::lstat(path.c_str(), &st) == 0;
}

/* The backends an EventLoop can have here: epoll always, io_uring where
 * it can be set up (else a warning says why it is not tested). */
std::vector<LoopBackend> loop_backends()
{
	static const std::vector<LoopBackend> found = [] {
		std::vector<LoopBackend> b;
		try {
			EventLoop probe({}, LoopBackend::io_uring);
			b.push_back(LoopBackend::io_uring);
		} catch (const Error &e) {
			WARN("io_uring backend not tested: " << e.what());
		}
		b.push_back(LoopBackend::epoll);
		return b;
	}();
	return found;
}

const char *name(LoopBackend b)
{
	return b == LoopBackend::io_uring ? "io_uring" : b == LoopBackend::epoll ? "epoll" : "auto";
}

/* A VMM: connect, handshake, then script(peer). */
Peer vmm_connect(const std::string &path, const std::string &name)
{
	auto p = Peer::connect_unix(path);
	p.write_all(Peer::handshake_bytes(104, name, 0x10000000));
	p.read_handshake_reply();
	return p;
}

} // namespace

/* --- Listener --- */

TEST_CASE("Listener: a unix socket, mode 0600, removed at the end", "[introspect][listener]")
{
	TempDir dir;
	auto path = dir / "kvmi.sock";
	{
		auto l = Listener::unix_socket(path);
		CHECK(l.address() == "unix:" + path);
		CHECK(l.fd() >= 0);
		struct stat st;
		REQUIRE(::lstat(path.c_str(), &st) == 0);
		CHECK(S_ISSOCK(st.st_mode));
		CHECK((st.st_mode & 0777) == 0600);
		Listener moved = std::move(l);
		CHECK(exists(path));
	}
	CHECK_FALSE(exists(path));
}

TEST_CASE("Listener: what is already at the path", "[introspect][listener]")
{
	TempDir dir;
	auto path = dir / "kvmi.sock";

	SECTION("a regular file is left alone: EEXIST") {
		std::ofstream(path) << "precious";
		auto e = error_of([&] { Listener::unix_socket(path); });
		CHECK(e.err() == EEXIST);
		CHECK_THAT(e.what(), Contains("not a socket"));
		std::ifstream in(path);
		std::string s;
		in >> s;
		CHECK(s == "precious");
	}
	SECTION("a stale socket is replaced") {
		{
			/* Bound, then closed without unlink: nobody listens. */
			auto fd = virtkit::FileDesc::adopt(::socket(AF_UNIX, SOCK_STREAM, 0), "socket");
			sockaddr_un a{};
			a.sun_family = AF_UNIX;
			std::memcpy(a.sun_path, path.data(), path.size());
			REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof(a)) == 0);
		}
		REQUIRE(exists(path));
		auto l = Listener::unix_socket(path);
		CHECK(l.fd() >= 0);
	}
	SECTION("a live socket: EADDRINUSE") {
		auto first = Listener::unix_socket(path);
		auto e = error_of([&] { Listener::unix_socket(path); });
		CHECK(e.err() == EADDRINUSE);
		/* The probe that found it alive was a connection that closed at
		 * once; after it, the first socket still works. */
		CHECK(error_of([&] { Session::accept(first, "secret", 5s); }).err() == ECONNRESET);
		PeerThread t([&] { vmm_connect(path, "x"); });
		auto s = Session::accept(first, "secret", 5s);
		t.join();
		CHECK(s.info().name == "x");
	}
	SECTION("a path too long for sun_path") {
		auto e = error_of([&] { Listener::unix_socket(std::string(200, 'p')); });
		CHECK(e.err() == ENAMETOOLONG);
	}
}

TEST_CASE("Listener::parse", "[introspect][listener]")
{
	TempDir dir;
	auto l = Listener::parse("unix:" + (dir / "p.sock"));
	CHECK(l.address() == "unix:" + (dir / "p.sock"));
	for (auto bad : {"", "unix:", "vsock:", "vsock:12x", "tcp:1234", "vsock:-1"})
		CHECK(error_of([&] { Listener::parse(bad); }).err() == EINVAL);
}

TEST_CASE("Session::accept: timeout, then a VMM", "[introspect][listener]")
{
	TempDir dir;
	auto path = dir / "kvmi.sock";
	auto l = Listener::unix_socket(path);
	CHECK(error_of([&] { Session::accept(l, "secret", 20ms); }).err() == ETIMEDOUT);

	Peer vmm;
	PeerThread t([&] { vmm = vmm_connect(path, "accepted"); });
	auto s = Session::accept(l, "secret", 5s);
	t.join();
	CHECK(s.connected());
	CHECK(s.info().name == "accepted");
	CHECK(*s.info().max_gpa == 0x10000000);
}

/* --- EventLoop --- */

TEST_CASE("EventLoop: many VMs, events, disconnects", "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	TempDir dir;
	auto path = dir / "kvmi.sock";
	constexpr int vms = 3, events_per_vm = 4;

	std::vector<std::string> names;
	std::atomic<int> events{0};
	int disconnects = 0;
	std::vector<std::uint32_t> replied_seqs;

	EventLoop *loop_ptr = nullptr;
	EventLoop::Handlers h;
	/* Every callback gets the same Session object for one VM. */
	std::set<const Session *> live;
	h.on_session = [&](Session &s) {
		names.push_back(s.info().name);
		live.insert(&s);
	};
	h.on_event = [&](Session &s, Event &ev) {
		events++;
		CHECK(live.count(&s) == 1);
		CHECK(ev.id == EventId::breakpoint);
		s.reply(ev, Action::retry);
	};
	h.on_disconnect = [&](Session &s) {
		CHECK(live.erase(&s) == 1);
		CHECK_THAT(s.disconnect_reason(), Contains("closed"));
		if (++disconnects == vms)
			loop_ptr->stop();
	};
	h.on_error = [&](const Error &e) { FAIL(e.what()); };
	EventLoop loop(h, backend);
	loop_ptr = &loop;
	loop.listen(Listener::unix_socket(path), "secret");

	/* Each VMM sends an event, waits for its reply, repeats, closes. */
	std::vector<std::unique_ptr<PeerThread>> peers;
	std::atomic<int> good_replies{0};
	for (int v = 0; v < vms; v++)
		peers.push_back(std::make_unique<PeerThread>([&, v] {
			auto p = vmm_connect(path, "vm" + std::to_string(v));
			for (int i = 0; i < events_per_vm; i++) {
				kvmi_event_breakpoint bp{};
				bp.gpa = 0x1000 + i;
				bp.insn_len = 1;
				std::uint32_t seq = 100 * v + i;
				p.send_message(KVMI_EVENT, seq,
					       event_payload(std::uint16_t(v), KVMI_EVENT_BREAKPOINT,
							     bytes_of(bp)));
				auto r = p.read_message();
				auto er = load<kvmi_event_reply>(r.payload, 8);
				if (r.hdr.id == KVMI_EVENT_REPLY && r.hdr.seq == seq &&
				    er.action == KVMI_EVENT_ACTION_RETRY &&
				    er.event == KVMI_EVENT_BREAKPOINT)
					good_replies++;
			}
		}));

	CHECK(loop.run_for(10s));
	for (auto &p : peers)
		p->join();
	CHECK(names.size() == vms);
	CHECK(events == vms * events_per_vm);
	CHECK(good_replies == vms * events_per_vm);
	CHECK(disconnects == vms);
	CHECK(loop.session_count() == 0);
}

TEST_CASE("EventLoop: a command from a callback; events it read are still dispatched",
	  "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	auto [fd, peer] = Peer::pair();
	peer.write_all(Peer::handshake_bytes(104, "cb", 0));
	auto session = Session::handshake(std::move(fd), "secret", 5s);
	peer.read_handshake_reply();

	std::vector<std::uint32_t> seen;
	std::uint32_t vcpus = 0;
	EventLoop::Handlers h;
	EventLoop *lp = nullptr;
	h.on_event = [&](Session &s, Event &ev) {
		seen.push_back(ev.seq);
		if (ev.seq == 1)
			vcpus = s.get_guest_info(); /* the VMM sends event 2 first */
		s.reply(ev, Action::continue_);
		if (seen.size() == 2)
			lp->stop();
	};
	EventLoop loop(h, backend);
	lp = &loop;
	loop.add(std::move(session));

	PeerThread t([&, &peer = peer] {
		peer.send_message(KVMI_EVENT, 1, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
		auto cmd = peer.read_message();
		/* Event 2 and the reply in one write: the command's read takes
		 * both, and no poll will report event 2 again. */
		kvmi_error_code ec{};
		kvmi_get_guest_info_reply gi{};
		gi.vcpu_count = 7;
		auto both = Peer::message(KVMI_EVENT, 2, event_payload(1, KVMI_EVENT_PAUSE_VCPU));
		auto reply = Peer::message(cmd.hdr.id, cmd.hdr.seq, pack(ec, gi));
		both.insert(both.end(), reply.begin(), reply.end());
		peer.write_all(both);
		auto r1 = peer.read_message();
		auto r2 = peer.read_message();
		if (r1.hdr.seq != 1 || r2.hdr.seq != 2)
			throw std::runtime_error("replies out of order");
	});
	CHECK(loop.run_for(5s));
	t.join();
	CHECK(vcpus == 7);
	CHECK(seen == std::vector<std::uint32_t>{1, 2});
	CHECK(loop.session_count() == 1);
}

TEST_CASE("EventLoop: stop() from another thread, run_for timeout", "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	TempDir dir;
	EventLoop loop({}, backend);
	loop.listen(Listener::unix_socket(dir / "s.sock"), "secret");

	auto t0 = std::chrono::steady_clock::now();
	CHECK_FALSE(loop.run_for(30ms));
	CHECK(std::chrono::steady_clock::now() - t0 >= 30ms);

	std::thread stopper([&] {
		std::this_thread::sleep_for(20ms);
		loop.stop();
	});
	t0 = std::chrono::steady_clock::now();
	loop.run();
	stopper.join();
	CHECK(std::chrono::steady_clock::now() - t0 < 5s);

	/* stop() before run(): run returns at once. */
	loop.stop();
	CHECK(loop.run_for(5s));
}

TEST_CASE("EventLoop: run() returns when there is nothing to wait for", "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	EventLoop loop({}, backend);
	CHECK(loop.run_for(5s));
	loop.run();
}

TEST_CASE("EventLoop: failed handshakes go to on_error", "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	TempDir dir;
	auto path = dir / "kvmi.sock";
	std::vector<int> errors;
	EventLoop *lp = nullptr;
	EventLoop::Handlers h;
	h.on_session = [&](Session &) { FAIL("no session expected"); };
	h.on_error = [&](const Error &e) {
		errors.push_back(e.err());
		if (errors.size() == 2)
			lp->stop();
	};
	EventLoop loop(h, backend);
	lp = &loop;
	SessionOptions opts;
	opts.handshake_timeout = 100ms;
	loop.listen(Listener::unix_socket(path), "secret", opts);

	/* One VMM says nothing; one sends a struct_size below the minimum. */
	auto silent = Peer::connect_unix(path);
	auto bad = Peer::connect_unix(path);
	bad.write_all(Peer::handshake_bytes(8, ""));
	CHECK(loop.run_for(5s));
	std::sort(errors.begin(), errors.end());
	CHECK(errors == std::vector<int>{std::min(EPROTO, ETIMEDOUT), std::max(EPROTO, ETIMEDOUT)});
	CHECK(loop.session_count() == 0);
	CHECK(silent.sees_eof(1s));
}

TEST_CASE("EventLoop: the tool closes a session from a callback", "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	auto [fd, peer] = Peer::pair();
	peer.write_all(Peer::handshake_bytes(104, "closing", 0));
	auto session = Session::handshake(std::move(fd), "secret", 5s);
	peer.read_handshake_reply();

	std::string reason;
	EventLoop::Handlers h;
	h.on_event = [&](Session &s, Event &) { s.close(); };
	h.on_disconnect = [&](Session &s) { reason = s.disconnect_reason(); };
	EventLoop loop(h, backend);
	loop.add(std::move(session));
	peer.send_message(KVMI_EVENT, 1, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
	CHECK(loop.run_for(5s)); /* nothing left after the session ends */
	CHECK(reason == "closed by the tool");
	CHECK(peer.sees_eof());
}

TEST_CASE("EventLoop: a broken message ends the session, the loop goes on", "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	auto [fd1, peer1] = Peer::pair();
	auto [fd2, peer2] = Peer::pair();
	for (auto *p : {&peer1, &peer2})
		p->write_all(Peer::handshake_bytes(104, "vm", 0));
	auto s1 = Session::handshake(std::move(fd1), "secret", 5s);
	auto s2 = Session::handshake(std::move(fd2), "secret", 5s);
	peer1.read_handshake_reply();
	peer2.read_handshake_reply();

	int events = 0;
	std::string reason;
	EventLoop *lp = nullptr;
	EventLoop::Handlers h;
	h.on_event = [&](Session &s, Event &ev) {
		events++;
		s.reply(ev, Action::continue_);
		lp->stop();
	};
	h.on_disconnect = [&](Session &s) { reason = s.disconnect_reason(); };
	EventLoop loop(h, backend);
	lp = &loop;
	loop.add(std::move(s1));
	loop.add(std::move(s2));

	kvmi_msg_hdr big{};
	big.id = KVMI_EVENT;
	big.size = KVMI_MSG_SIZE + 100;
	peer1.write_all(bytes_of(big));
	CHECK_FALSE(loop.run_for(200ms));
	CHECK_THAT(reason, Contains("KVMI_MSG_SIZE"));
	CHECK(loop.session_count() == 1);
	CHECK(peer1.sees_eof());

	peer2.send_message(KVMI_EVENT, 5, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
	CHECK(loop.run_for(5s));
	CHECK(events == 1);
	CHECK(peer2.read_message().hdr.seq == 5);
}

TEST_CASE("EventLoop: the tool closes a session, the next VMM (its descriptor number) is served",
	  "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	TempDir dir;
	auto path = dir / "kvmi.sock";
	std::vector<int> fds;
	std::vector<std::string> replied;
	EventLoop *lp = nullptr;
	EventLoop::Handlers h;
	h.on_event = [&](Session &s, Event &ev) {
		fds.push_back(s.fd());
		if (s.info().name == "first") {
			s.close(); /* its number is free for the next accept */
			return;
		}
		s.reply(ev, Action::continue_);
		replied.push_back(s.info().name);
		lp->stop();
	};
	h.on_error = [&](const Error &e) { FAIL(e.what()); };
	EventLoop loop(h, backend);
	lp = &loop;
	loop.listen(Listener::unix_socket(path), "secret");

	PeerThread t([&] {
		auto first = vmm_connect(path, "first");
		first.send_message(KVMI_EVENT, 1, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
		if (!first.sees_eof(5s))
			throw std::runtime_error("the first session was not closed");
		auto second = vmm_connect(path, "second");
		second.send_message(KVMI_EVENT, 2, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
		if (second.read_message().hdr.seq != 2)
			throw std::runtime_error("no reply to the second VMM");
	});
	CHECK(loop.run_for(10s));
	t.join();
	/* Usually the same number (not always: the peer's own socket, made on
	 * its thread, may take it first, and io_uring's accept may run before
	 * the close); what matters is that the second VMM is served. */
	REQUIRE(fds.size() == 2);
	INFO("descriptors " << fds[0] << ", " << fds[1]);
	CHECK(replied == std::vector<std::string>{"second"});
}

TEST_CASE("EventLoop: run() on another thread than the run before", "[introspect][loop]")
{
	auto backend = GENERATE(from_range(loop_backends()));
	INFO("backend " << name(backend));
	TempDir dir;
	auto path = dir / "kvmi.sock";
	std::vector<std::string> names;
	EventLoop *lp = nullptr;
	EventLoop::Handlers h;
	h.on_event = [&](Session &s, Event &ev) {
		names.push_back(s.info().name);
		s.reply(ev, Action::continue_);
		lp->stop();
	};
	h.on_error = [&](const Error &e) { FAIL(e.what()); };
	/* Made on this thread, run on two others in turn. */
	EventLoop loop(h, backend);
	lp = &loop;
	loop.listen(Listener::unix_socket(path), "secret");
	std::vector<Peer> vmms;
	for (std::string vm : {"a", "b", "c"}) {
		bool ended = false;
		PeerThread runner([&] { ended = loop.run_for(10s); });
		PeerThread t([&] {
			auto p = vmm_connect(path, vm);
			p.send_message(KVMI_EVENT, 7, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
			if (p.read_message().hdr.seq != 7)
				throw std::runtime_error("no reply");
			vmms.push_back(std::move(p));
		});
		t.join();
		runner.join();
		CHECK(ended);
	}
	CHECK(names == std::vector<std::string>{"a", "b", "c"});
	CHECK(loop.session_count() == 3);
}

TEST_CASE("EventLoop: the backend is reported; VIRTKIT_EVENT_LOOP chooses it",
	  "[introspect][loop]")
{
	/* Restored at the end: the suite may run with it set. */
	struct SavedEnv {
		std::optional<std::string> value;
		SavedEnv()
		{
			if (const char *v = std::getenv("VIRTKIT_EVENT_LOOP"))
				value = v;
		}
		~SavedEnv()
		{
			if (value)
				::setenv("VIRTKIT_EVENT_LOOP", value->c_str(), 1);
			else
				::unsetenv("VIRTKIT_EVENT_LOOP");
		}
	} saved;

	EventLoop e({}, LoopBackend::epoll);
	CHECK(e.backend_kind() == LoopBackend::epoll);
	CHECK(e.backend() == "epoll (chosen by the program)");

	::setenv("VIRTKIT_EVENT_LOOP", "epoll", 1);
	EventLoop by_env({});
	CHECK(by_env.backend_kind() == LoopBackend::epoll);
	CHECK(by_env.backend() == "epoll (chosen by VIRTKIT_EVENT_LOOP)");
	/* The program's choice wins. */
	if (loop_backends().front() == LoopBackend::io_uring)
		CHECK(EventLoop({}, LoopBackend::io_uring).backend_kind() == LoopBackend::io_uring);

	::setenv("VIRTKIT_EVENT_LOOP", "kqueue", 1);
	auto err = error_of([] { EventLoop({}); });
	CHECK(err.err() == EINVAL);
	CHECK_THAT(err.what(), Contains("kqueue"));

	::unsetenv("VIRTKIT_EVENT_LOOP");
	EventLoop automatic({});
	INFO("automatic: " << automatic.backend());
	if (loop_backends().front() == LoopBackend::io_uring) {
		CHECK(automatic.backend_kind() == LoopBackend::io_uring);
		CHECK_THAT(automatic.backend(), Contains("io_uring (") && Contains("poll") &&
							Contains("accept"));
	} else {
		CHECK(automatic.backend_kind() == LoopBackend::epoll);
		CHECK_THAT(automatic.backend(), Contains("epoll (io_uring: "));
	}
}

namespace {

/* A seccomp filter on this thread (and what it creates) that fails
 * io_uring_setup(2) with err, as container runtimes and sandboxes do. */
void deny_io_uring_setup(int err)
{
	sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (unsigned(err) & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	sock_fprog prog{static_cast<unsigned short>(std::size(filter)), filter};
	if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		throw Error("prctl", errno, "PR_SET_NO_NEW_PRIVS");
	if (::syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
		throw Error("seccomp", errno, "SECCOMP_SET_MODE_FILTER");
}

/* In the child: io_uring denied, the loop on epoll serves a VMM. "" if all
 * went as expected, else what did not. */
std::string loop_without_io_uring(int err)
{
	deny_io_uring_setup(err);
	::unsetenv("VIRTKIT_EVENT_LOOP");

	/* Asked for by name: the error says why. */
	try {
		EventLoop({}, LoopBackend::io_uring);
		return "LoopBackend::io_uring was set up under the filter";
	} catch (const Error &e) {
		if (e.err() != err || e.operation() != "io_uring_setup")
			return std::string("LoopBackend::io_uring: ") + e.what();
	}

	std::vector<std::uint32_t> seen;
	EventLoop *lp = nullptr;
	EventLoop::Handlers h;
	h.on_event = [&](Session &s, Event &ev) {
		seen.push_back(ev.seq);
		s.reply(ev, Action::continue_);
		if (seen.size() == 2)
			lp->stop();
	};
	EventLoop loop(h);
	lp = &loop;
	std::string expect = "epoll (io_uring: io_uring_setup: " + virtkit::errno_name(err) + " (";
	if (loop.backend_kind() != LoopBackend::epoll || !loop.backend().starts_with(expect))
		return "backend " + loop.backend() + ", expected " + expect + "...";

	Peer peer;
	loop.add(connect(peer));
	peer.send_message(KVMI_EVENT, 1, event_payload(0, KVMI_EVENT_PAUSE_VCPU));
	peer.send_message(KVMI_EVENT, 2, event_payload(1, KVMI_EVENT_PAUSE_VCPU));
	if (!loop.run_for(5s))
		return "the loop did not stop";
	if (seen != std::vector<std::uint32_t>{1, 2})
		return "events not dispatched";
	if (peer.read_message().hdr.seq != 1 || peer.read_message().hdr.seq != 2)
		return "replies missing";
	return {};
}

} // namespace

TEST_CASE("EventLoop: io_uring denied by seccomp: epoll, and the reason", "[introspect][loop]")
{
	int err = GENERATE(EPERM, ENOSYS);
	INFO("io_uring_setup fails with " << virtkit::errno_name(err));
	int pipefd[2];
	REQUIRE(::pipe2(pipefd, O_CLOEXEC) == 0);
	pid_t pid = ::fork();
	REQUIRE(pid >= 0);
	if (pid == 0) {
		::close(pipefd[0]);
		std::string result;
		try {
			result = loop_without_io_uring(err);
		} catch (const std::exception &e) {
			result = std::string("exception: ") + e.what();
		}
		if (::write(pipefd[1], result.data(), result.size()) < 0)
			::_exit(2);
		::_exit(result.empty() ? 0 : 1);
	}
	::close(pipefd[1]);
	std::string result;
	char buf[512];
	ssize_t n;
	while ((n = ::read(pipefd[0], buf, sizeof(buf))) > 0)
		result.append(buf, std::size_t(n));
	::close(pipefd[0]);
	int status = 0;
	REQUIRE(::waitpid(pid, &status, 0) == pid);
	INFO("child: " << result);
	CHECK(WIFEXITED(status));
	CHECK(WEXITSTATUS(status) == 0);
	CHECK(result.empty());
}

/* --- the backends themselves (kvmi/tool/poller.hpp) --- */

TEST_CASE("Poller: readable and accept watches, multishot and one-shot", "[introspect][loop]")
{
	using namespace virtkit::introspect::detail;
	struct Case {
		const char *name;
		std::function<std::unique_ptr<Poller>()> make;
		bool repeats; /* a watch reports again without being made again */
	};
	auto which = GENERATE(0, 1, 2);
	const Case cases[] = {
		{"io_uring multishot", [] { return make_ring_poller(16, true); }, true},
		{"io_uring one-shot", [] { return make_ring_poller(16, false); }, false},
		{"epoll", [] { return make_epoll_poller("test"); }, true},
	};
	const Case &c = cases[which];
	INFO(c.name);
	std::unique_ptr<Poller> p;
	try {
		p = c.make();
	} catch (const RingUnavailable &e) {
		WARN(c.name << " not tested: " << e.what());
		return;
	}
	if (which == 1)
		CHECK_THAT(p->description(), Contains("one-shot poll, one-shot accept"));
	auto deadline = [] { return Clock::now() + std::chrono::seconds(5); };

	int sv[2];
	REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) == 0);
	auto a = virtkit::FileDesc::adopt(sv[0], "socketpair");
	auto b = virtkit::FileDesc::adopt(sv[1], "socketpair");
	p->watch(a.get(), 1, Watch::readable);
	CHECK(p->watching(1));
	for (int round = 0; round < 3; round++) {
		char x = 'x';
		REQUIRE(::write(b.get(), &x, 1) == 1);
		std::vector<Completion> out;
		p->wait(deadline(), out);
		REQUIRE(out.size() == 1);
		CHECK(out[0].tag == 1);
		CHECK((out[0].res & POLLIN) != 0);
		CHECK(out[0].more == c.repeats);
		CHECK(p->watching(1) == c.repeats);
		REQUIRE(::read(a.get(), &x, 1) == 1);
		if (!p->watching(1))
			p->watch(a.get(), 1, Watch::readable);
	}
	p->unwatch(1);
	CHECK_FALSE(p->watching(1));
	p->unwatch(1); /* idempotent */

	TempDir dir;
	auto l = Listener::unix_socket(dir / "p.sock");
	p->watch(l.fd(), 2, Watch::accept);
	auto c1 = Peer::connect_unix(dir / "p.sock");
	auto c2 = Peer::connect_unix(dir / "p.sock");
	std::vector<virtkit::FileDesc> accepted;
	for (int i = 0; i < 10 && accepted.size() < 2; i++) {
		std::vector<Completion> out;
		p->wait(deadline(), out);
		for (auto &done : out) {
			REQUIRE(done.tag == 2);
			REQUIRE(done.res >= 0);
			accepted.push_back(virtkit::FileDesc::adopt(done.res, "accept"));
			CHECK(done.more == c.repeats);
		}
		if (!p->watching(2))
			p->watch(l.fd(), 2, Watch::accept);
	}
	CHECK(accepted.size() == 2);
	for (auto &fd : accepted)
		CHECK((::fcntl(fd.get(), F_GETFL) & O_NONBLOCK) != 0);
	p->unwatch(2);
	CHECK_FALSE(p->watching(2));
}
