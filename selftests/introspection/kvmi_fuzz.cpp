// SPDX-License-Identifier: MIT
/*
 * A seeded, replayable fuzzer of the VMM's KVMI server, from a hand-made
 * tool on a raw socket. Many sessions against one VM whose two vCPUs keep
 * running a loop of memory and MSR writes (so that events happen). Each
 * session sends messages generated from the protocol's message table
 * (kvmi/protocol/messages.hpp) - every id, a payload per its size rule -
 * and mutations of them: flipped bytes, payloads too short or too long,
 * header sizes that do not match the bytes (truncation: what follows
 * becomes payload), oversized messages, wrong vCPU indexes and paddings,
 * unknown ids, event replies nobody asked for or answering twice, libkvmi
 * batches mixing good and bad commands, writes split into many partial
 * writes with pauses, and sessions that end by a close or a reset in the
 * middle of a message.
 *
 * The oracle runs the VMM's framing over the same bytes: each message
 * gets a reply, in order, with an error the protocol allows for exactly
 * that message (exact where the protocol says which), or - for a framing
 * error or a bad event reply - the connection closes after the replies to
 * what came before it. Events must be well-formed and one at a time per
 * vCPU. After each session the VMM has counted exactly the commands
 * framed, the guest still makes progress and no file descriptor is left.
 * Every wait has a deadline: a hang fails the test naming seed and session.
 *
 *   VIRTKIT_FUZZ_SEED=N   repeat a run (the seed is printed first)
 *   VIRTKIT_FUZZ_ITERS=N  sessions (default 400, a few seconds)
 *   VIRTKIT_FUZZ_FIRST=N  start at session N (each session has its own
 *                         generator, derived from the seed and N)
 *   VIRTKIT_FUZZ_VERBOSE  log every message, reply and event
 */
#include "guest_code.hpp"
#include "kvmi_util.hpp"

#include <virtkit/spp.hpp>
/* The protocol table, and the handshake's SHA-1 (libvirtkit-internal). */
#include "kvmi/protocol/handshake.hpp"
#include "kvmi/protocol/layout.hpp"
#include "kvmi/protocol/messages.hpp"

#include <linux/virtkit_kvmi.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <ctime>
#include <deque>
#include <functional>
#include <map>
#include <set>

using namespace virtkit;
using namespace virtkit::x86;
using namespace vkt;
namespace g_ = kvmi_guest;
namespace kp = virtkit::detail::kvmi;

namespace {

using u64 = std::uint64_t;
using Bytes = std::vector<std::byte>;

constexpr unsigned nvcpus = 2;
constexpr u64 stop_gpa = data_gpa;
constexpr u64 counters_gpa = data_gpa + 8; /* one u64 per vCPU */
constexpr u64 write_gpa = data_gpa + 2 * 4096; /* the page vCPU i writes: + i pages */
constexpr u64 scratch_gpa = data_gpa + 8 * 4096; /* WRITE_PHYSICAL lands here */
constexpr u64 scratch_pages = 8;
constexpr std::uint32_t guest_msr = 0x174; /* SYSENTER_CS: any value is harmless */
constexpr auto deadline = 30s;
const bool verbose = getenv("VIRTKIT_FUZZ_VERBOSE");

/* Forever: count, write the page, write the MSR. */
void guest_loop(u64 stop, u64 counter, u64 page)
{
	u64 i = 0;
	while (!g_::read64(stop)) {
		g_::write64(counter, g_::read64(counter) + 1);
		g_::write64(page + (i % 512) * 8, i);
		guest_wrmsr(guest_msr, i & 0xffff);
		i++;
		guest_pause();
	}
	GUEST_SYNC(1, i);
}

template <class T> T load(const Bytes &b, std::size_t off)
{
	T v{};
	if (off + sizeof(T) <= b.size())
		std::memcpy(&v, b.data() + off, sizeof(T));
	return v;
}
template <class T> void store(Bytes &b, std::size_t off, const T &v)
{
	if (off + sizeof(T) <= b.size())
		std::memcpy(b.data() + off, &v, sizeof(T));
}

/*
 * The size rule of the table, computed here rather than with
 * PayloadSize::fits(): a bug there must show as a wrong answer.
 */
bool size_ok(const kp::PayloadSize &ps, const Bytes &p, std::size_t off)
{
	using K = kp::PayloadSize::Kind;
	std::size_t n = p.size() - off;
	switch (ps.kind) {
	case K::fixed:
		return n == ps.size;
	case K::counted: {
		if (n < ps.size)
			return false;
		u64 count = ps.count_bytes == 2 ? load<std::uint16_t>(p, off + ps.count_offset)
						 : load<u64>(p, off + ps.count_offset);
		return count <= n && n - ps.size == count * ps.entry;
	}
	case K::at_least:
		return n >= ps.size && n % ps.entry == 0;
	default:
		return false;
	}
}

const kp::MessageInfo *command_info(std::uint16_t id)
{
	auto *m = kp::find_message(id);
	return m && m->command ? m : nullptr;
}

/* A message as the VMM frames it: where it lies in the bytes sent. */
struct Framed {
	std::size_t offset;
	kvmi_msg_hdr hdr;
};

/* What one reply must look like. */
struct Expect {
	std::uint16_t id;
	std::uint32_t seq;
	std::set<int> errs; /* negative, as on the wire */
	std::size_t min_data = 0, max_data = 0; /* with err 0 */
	std::function<void(const Bytes &)> check;
	u64 commands = 0; /* framed up to this one */
};

struct PendingEvent {
	std::uint16_t vcpu, event;
	bool answered = false;
};

struct Policy {
	std::optional<std::set<std::uint16_t>> commands, events;
	bool command(std::uint16_t id) const
	{
		return !commands || commands->count(id) || id == KVMI_GET_VERSION ||
		       id == KVMI_CHECK_COMMAND || id == KVMI_CHECK_EVENT ||
		       id == KVMI_CONTROL_CMD_RESPONSE;
	}
	bool event(std::uint16_t id) const { return !events || events->count(id); }
};

std::string err_list(const std::set<int> &s)
{
	std::string out;
	for (int e : s)
		out += (out.empty() ? "" : "|") + std::to_string(e);
	return out;
}

struct Totals {
	u64 sessions = 0, messages = 0, bytes = 0, replies = 0, error_replies = 0, events = 0,
	    event_replies = 0, closes_by_vmm = 0, partial_writes = 0;
	std::map<std::string, u64> endings;
};

class Session;

/* The VM, shared by every session. */
struct Fuzzer {
	KvmiTest t;
	u64 seed;
	Totals totals;
	std::vector<std::uint16_t> ids; /* every id of the table */
	std::vector<std::pair<u64, u64>> regions; /* guest memory: gpa, size */
	u64 max_end = 0;

	explicit Fuzzer(u64 s) : seed(s)
	{
		for (unsigned i = 0; i < nvcpus; i++)
			t.add_vcpu(guest_loop, stop_gpa, counters_gpa + 8 * i, write_gpa + 4096 * i);
		for (auto &m : kp::messages())
			ids.push_back(m.id);
		for (auto &r : t.g.memory().regions()) {
			regions.emplace_back(r.gpa, r.size);
			max_end = std::max<u64>(max_end, r.gpa + r.size);
		}
		for (unsigned i = 0; i < nvcpus; i++)
			t.runner(i).resume();
		for (unsigned i = 0; i < nvcpus; i++)
			expect_progress(i);
	}

	bool in_memory(u64 gpa, u64 size) const
	{
		for (auto [g, s] : regions)
			if (gpa >= g && size <= s && gpa - g <= s - size)
				return true;
		return false;
	}
	std::optional<std::pair<u64, u64>> region_at(u64 gpa) const
	{
		for (auto [g, s] : regions)
			if (gpa >= g && gpa - g < s)
				return std::make_pair(g, s);
		return std::nullopt;
	}

	/*
	 * The vCPU's loop still runs. Any exit the VMM's own loop sees fails
	 * the test: an MSR filter or single-step exit in flight when a
	 * session ends must be consumed by the introspection (it was not, in
	 * about 1 % of sessions, before the fix of issue 18 item 8).
	 */
	void check_runner(unsigned i)
	{
		auto r = t.runner(i).try_wait(0ms);
		if (!r)
			return;
		std::string why = "an exception";
		if (auto *u = std::get_if<VcpuRunner::Ucall>(&*r)) {
			why = u->describe();
		} else if (auto *x = std::get_if<virtkit::Exit>(&*r)) {
			why = virtkit::describe(*x);
		} else if (auto *e = std::get_if<std::exception_ptr>(&*r)) {
			try {
				std::rethrow_exception(*e);
			} catch (const std::exception &ex) {
				why = ex.what();
			} catch (...) {
			}
		}
		fail(__FILE__, __LINE__, format("vcpu %u left its loop: %s", i, why.c_str()));
	}

	void expect_progress(unsigned i)
	{
		check_runner(i);
		u64 c = t.peek(counters_gpa + 8 * i);
		if (!wait_until(
			    [&] {
				    check_runner(i);
				    return t.peek(counters_gpa + 8 * i) > c;
			    },
			    deadline))
			fail(__FILE__, __LINE__, format("vcpu %u makes no progress", i));
	}

	void stop()
	{
		t.poke(stop_gpa, 1);
		for (unsigned i = 0; i < nvcpus; i++)
			t.runner(i).expect_sync(1, deadline);
	}
};

/* One connection: generation, the model of the VMM and the checks. */
class Session {
public:
	Session(Fuzzer &f, u64 index)
		: f_(f), gen_(f.seed ^ (index * 0xd1342543de82ef95ull)),
		  evr_(f.seed ^ (index * 0xd1342543de82ef95ull) ^ 0x5eed5eedull)
	{
	}

	void run();

private:
	/* ---- the connection ---- */
	void connect();
	void send(const Bytes &b, bool split);
	void pump(int timeout_ms);
	void receive(const kvmi_msg_hdr &h, const Bytes &data);
	void wait_replies();
	void finish(const char *how);

	/* ---- generation ---- */
	Bytes payload_for(const kp::MessageInfo &m);
	Bytes message(std::uint16_t id, const Bytes &payload, std::optional<std::uint16_t> size = {});
	Bytes mutated();
	Bytes event_replies();
	Bytes events_on();
	Bytes step_bytes();

	/* ---- the model ---- */
	void frame(Bytes &b);
	void predict(Bytes &b, const Framed &m);
	bool event_reply_ok(const Bytes &p, std::uint32_t seq);
	Expect command_expect(std::uint16_t id, std::uint32_t seq, const Bytes &p);
	void sanitize(Bytes &b, const Framed &m);

	Fuzzer &f_;
	Rng gen_; /* what is sent */
	Rng evr_; /* how events are answered: depends on their timing */
	Policy policy_;
	std::optional<Introspection> *vmm_ = nullptr;
	FileDesc fd_;

	/* The framing the VMM applies to the bytes sent. */
	Bytes partial_; /* of the message being framed */
	bool framing_closed_ = false;
	u64 commands_ = 0; /* framed messages other than event replies */
	u64 confirmed_ = 0; /* commands_ up to the last reply received */
	bool replies_ = true;
	std::set<int> batch_{0}; /* the possible first error of a batch */
	std::deque<Expect> expects_;
	std::map<std::uint32_t, PendingEvent> events_;
	std::uint32_t seq_ = 1000;

	/* Received. */
	Bytes rx_;
	bool eof_ = false;
	std::chrono::steady_clock::time_point end_;
};

/* ---------------- generation ---------------- */

u64 interesting_u64(Rng &r)
{
	switch (r.below(6)) {
	case 0: return 0;
	case 1: return r.below(16);
	case 2: return ~u64(0) - r.below(4);
	case 3: return u64(1) << r.below(64);
	default: return r.next();
	}
}

Bytes Session::payload_for(const kp::MessageInfo &m)
{
	using K = kp::PayloadSize::Kind;
	Bytes p;
	if (m.vcpu)
		p = bytes_of(vcpu_hdr(static_cast<std::uint16_t>(gen_.below(nvcpus))));
	const std::size_t h = p.size();
	const auto &ps = m.payload;
	std::size_t n = 0;
	switch (ps.kind) {
	case K::fixed: n = ps.size; break;
	case K::counted: n = ps.size; break;
	case K::at_least: n = ps.size + ps.entry * gen_.below(64); break;
	default: n = gen_.chance(80) ? 0 : gen_.below(64); break;
	}
	p.resize(h + n);
	auto gpa_in_data = [&] { return data_gpa + gen_.below(data_size); };
	auto some_gpa = [&]() -> u64 {
		switch (gen_.below(5)) {
		case 0: return hole_gpa + gen_.below(1 << 20);
		case 1: return gen_.below(f_.max_end);
		case 2: return interesting_u64(gen_);
		default: return gpa_in_data();
		}
	};
	switch (m.id) {
	case KVMI_CHECK_COMMAND:
		store<std::uint16_t>(p, h, gen_.chance(80) ? gen_.pick(f_.ids) : gen_.below(0x10000));
		break;
	case KVMI_CHECK_EVENT:
	case KVMI_CONTROL_VM_EVENTS:
	case KVMI_CONTROL_EVENTS:
		store<std::uint16_t>(p, h, gen_.below(gen_.chance(90) ? KVMI_NUM_EVENTS : 0x10000));
		if (m.id != KVMI_CHECK_EVENT)
			store<std::uint8_t>(p, h + 2, gen_.below(2));
		break;
	case KVMI_PAUSE_VCPU:
		store<std::uint8_t>(p, h, gen_.below(2));
		break;
	case KVMI_CONTROL_MSR:
		store<std::uint8_t>(p, h, gen_.below(2));
		store<std::uint32_t>(p, h + offsetof(kvmi_control_msr, msr),
				     gen_.chance(60) ? guest_msr
				     : gen_.chance(50) ? 0xc0000080u
						       : static_cast<std::uint32_t>(gen_.next()));
		break;
	case KVMI_GET_REGISTERS: {
		std::uint16_t k = gen_.below(5);
		store<std::uint16_t>(p, h + offsetof(kvmi_get_registers, nmsrs), k);
		for (unsigned i = 0; i < k; i++) {
			std::uint32_t msr = gen_.chance(70) ? gen_.pick(std::vector<std::uint32_t>{
								      0x174, 0x175, 0xc0000080, 0x277})
							    : static_cast<std::uint32_t>(gen_.next());
			auto b = bytes_of(msr);
			p.insert(p.end(), b.begin(), b.end());
		}
		break;
	}
	case KVMI_SET_REGISTERS:
	case KVMI_VCPU_SET_XSAVE:
		break; /* zeros (and SET_REGISTERS never reaches a vCPU: sanitize) */
	case KVMI_GET_CPUID:
		store<std::uint32_t>(p, h, gen_.pick(std::vector<std::uint32_t>{0, 1, 7, 0xd, 0x80000000, 0x80000001, 0x4fffffff}));
		store<std::uint32_t>(p, h + 4, gen_.below(3));
		break;
	case KVMI_READ_PHYSICAL:
		store<u64>(p, h, gen_.chance(70) ? gpa_in_data() & ~u64(4095) : some_gpa());
		store<u64>(p, h + 8, gen_.chance(80) ? 1 + gen_.below(4096) : interesting_u64(gen_));
		break;
	case KVMI_WRITE_PHYSICAL: {
		u64 size = 1 + gen_.below(gen_.chance(80) ? 256 : 4096);
		u64 gpa = scratch_gpa + gen_.below(scratch_pages) * 4096 + gen_.below(4096 - size + 1);
		store<u64>(p, h, gen_.chance(85) ? gpa : some_gpa());
		store<u64>(p, h + 8, size);
		for (u64 i = 0; i < size; i++)
			p.push_back(std::byte(gen_.next()));
		break;
	}
	case KVMI_INJECT_EXCEPTION:
		store<std::uint8_t>(p, h, gen_.below(32));
		break;
	case KVMI_SET_PAGE_ACCESS:
	case KVMI_SET_PAGE_WRITE_BITMAP: {
		const bool access = m.id == KVMI_SET_PAGE_ACCESS;
		std::uint16_t k = 1 + gen_.below(4);
		store<std::uint16_t>(p, h + ps.count_offset, k);
		for (unsigned i = 0; i < k; i++) {
			Bytes e(ps.entry);
			u64 gpa = gen_.chance(60) ? write_gpa + 4096 * gen_.below(nvcpus) : some_gpa();
			store<u64>(e, 0, gpa);
			if (access)
				store<std::uint8_t>(e, 8, gen_.pick(std::vector<std::uint8_t>{7, 5, 5, 4, 1, 3, 6}));
			else
				store<std::uint32_t>(e, 8, static_cast<std::uint32_t>(gen_.next()));
			p.insert(p.end(), e.begin(), e.end());
		}
		break;
	}
	case KVMI_GET_MTRR_TYPE:
		store<u64>(p, h, some_gpa());
		break;
	case KVMI_CONTROL_SPP:
		store<std::uint8_t>(p, h, gen_.below(2));
		break;
	case KVMI_CONTROL_CMD_RESPONSE:
		store<std::uint8_t>(p, h, gen_.below(2));
		store<std::uint8_t>(p, h + 1, gen_.below(2));
		break;
	case KVMI_VCPU_TRANSLATE_GVA:
		store<u64>(p, h, gen_.chance(60) ? gpa_in_data() : interesting_u64(gen_));
		break;
	case KVMI_VCPU_GET_XCR:
		store<std::uint8_t>(p, h, gen_.chance(90) ? 0 : gen_.below(256));
		break;
	case KVMI_QUERY_PHYSICAL:
		store<u64>(p, h, gen_.chance(70) ? gen_.below(f_.max_end / 4096 + 4) : interesting_u64(gen_));
		break;
	case KVMI_VCPU_CONTROL_SINGLESTEP:
		/* Rarely on: every instruction is then an event. */
		store<std::uint8_t>(p, h, gen_.chance(20));
		break;
	default:
		break;
	}
	return p;
}

Bytes Session::message(std::uint16_t id, const Bytes &payload, std::optional<std::uint16_t> size)
{
	kvmi_msg_hdr hdr{id, size ? *size : static_cast<std::uint16_t>(payload.size()), seq_++};
	auto m = bytes_of(hdr);
	m.insert(m.end(), payload.begin(), payload.end());
	return m;
}

/* One message from the table, maybe broken. */
Bytes Session::mutated()
{
	const kp::MessageInfo *m = nullptr;
	while (!m || !m->command)
		m = kp::find_message(gen_.pick(f_.ids));
	Bytes p = payload_for(*m);
	std::uint16_t id = m->id;
	std::optional<std::uint16_t> size;
	switch (gen_.below(20)) {
	case 0: case 1: case 2: /* flipped bytes */
		for (unsigned i = 0, n = 1 + gen_.below(4); i < n && !p.empty(); i++)
			p[gen_.below(p.size())] ^= std::byte(1u << gen_.below(8));
		break;
	case 3: /* a byte set at random */
		if (!p.empty())
			p[gen_.below(p.size())] = std::byte(gen_.next());
		break;
	case 4: /* too short */
		p.resize(gen_.below(p.size() + 1));
		break;
	case 5: /* too long */
		p.resize(p.size() + 1 + gen_.below(gen_.chance(90) ? 16 : 4000), std::byte(gen_.next()));
		break;
	case 6: /* a wrong vCPU */
		if (m->vcpu)
			store<std::uint16_t>(p, 0, gen_.chance(50) ? nvcpus + gen_.below(4)
								   : gen_.below(0x10000));
		break;
	case 7: /* vcpu_hdr padding */
		if (m->vcpu)
			p[2 + gen_.below(6)] = std::byte(1 + gen_.below(255));
		break;
	case 8: /* an id the protocol does not define, or KVMI_EVENT */
		id = static_cast<std::uint16_t>(gen_.chance(20)	  ? u64(KVMI_EVENT)
						: gen_.chance(50) ? KVMI_NUM_MESSAGES + gen_.below(64)
								  : gen_.below(0x10000));
		if (id == KVMI_EVENT_REPLY)
			id = 0xffff;
		break;
	case 9: /* the header's size says less or more than what follows */
		size = static_cast<std::uint16_t>(gen_.chance(50) ? gen_.below(p.size() + 1)
								  : p.size() + 1 + gen_.below(64));
		break;
	case 10: /* oversized */
		if (gen_.chance(30)) {
			size = static_cast<std::uint16_t>(KVMI_MSG_SIZE + 1 +
							  gen_.below(0x10000 - KVMI_MSG_SIZE - 1));
			break;
		}
		p.resize(KVMI_MSG_SIZE, std::byte(gen_.next()));
		break;
	default:
		break;
	}
	return message(id, p, size);
}

/*
 * Answers to the events received and not answered yet; some wrong (the
 * VMM closes), some to events never sent or answered already.
 */
Bytes Session::event_replies()
{
	Bytes out;
	for (auto &[seq, e] : events_) {
		if (e.answered)
			continue;
		kvmi_event_reply er{static_cast<std::uint8_t>(evr_.chance(15) ? 1 : 0), 0, 0, 0};
		er.event = static_cast<std::uint8_t>(e.event);
		Bytes p = bytes_of(vcpu_hdr(e.vcpu), er);
		std::size_t specific = 0;
		for (auto &info : kp::events())
			if (info.id == e.event)
				specific = info.reply_size;
		Bytes sp(specific);
		if (e.event == KVMI_EVENT_MSR) {
			/* The value the guest writes: as asked, or another harmless one. */
			store<u64>(sp, 0, evr_.below(0x10000));
		} else if (e.event == KVMI_EVENT_PF && evr_.chance(30)) {
			store<std::uint32_t>(sp, offsetof(kvmi_event_pf_reply, ctx_size), evr_.below(300));
			store<std::uint8_t>(sp, offsetof(kvmi_event_pf_reply, singlestep), evr_.below(3));
		}
		/* Shorter is zero-filled, as the kernel does. */
		sp.resize(evr_.chance(80) ? specific : evr_.below(specific + 1));
		p.insert(p.end(), sp.begin(), sp.end());
		std::uint32_t s = seq;
		switch (evr_.below(40)) {
		case 0: s = seq + 0x80000000u; break;	      /* an event never sent */
		case 1: p.resize(p.size() + 1 + evr_.below(8)); break; /* too long */
		case 2: p.resize(evr_.below(16)); break;	      /* too short */
		case 3: store<std::uint16_t>(p, 0, e.vcpu ^ 1); break; /* another vCPU */
		case 4: p[8 + 1 + evr_.below(7)] ^= std::byte(0x40); break; /* action, padding */
		default: break;
		}
		kvmi_msg_hdr hdr{KVMI_EVENT_REPLY, static_cast<std::uint16_t>(p.size()), s};
		auto b = bytes_of(hdr);
		out.insert(out.end(), b.begin(), b.end());
		out.insert(out.end(), p.begin(), p.end());
		/* And, rarely, the same answer twice. */
		if (evr_.chance(3)) {
			out.insert(out.end(), b.begin(), b.end());
			out.insert(out.end(), p.begin(), p.end());
		}
	}
	return out;
}

/* Valid commands that make the guest's loop raise PF and MSR events. */
Bytes Session::events_on()
{
	Bytes b;
	auto add = [&](std::uint16_t id, const Bytes &p) {
		auto m = message(id, p);
		b.insert(b.end(), m.begin(), m.end());
	};
	for (std::uint16_t v = 0; v < nvcpus; v++) {
		for (std::uint16_t ev : {KVMI_EVENT_PF, KVMI_EVENT_MSR})
			if (gen_.chance(70))
				add(KVMI_CONTROL_EVENTS,
				    bytes_of(vcpu_hdr(v), kvmi_control_events{ev, 1, 0, 0}));
		if (gen_.chance(70))
			add(KVMI_CONTROL_MSR, bytes_of(vcpu_hdr(v), kvmi_control_msr{1, 0, 0, guest_msr}));
	}
	if (gen_.chance(70)) {
		kvmi_set_page_access spa{0, nvcpus, 0};
		Bytes p = bytes_of(spa);
		for (unsigned v = 0; v < nvcpus; v++) {
			kvmi_page_access_entry e{write_gpa + 4096 * v,
						 KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X, 0, 0, 0};
			auto eb = bytes_of(e);
			p.insert(p.end(), eb.begin(), eb.end());
		}
		add(KVMI_SET_PAGE_ACCESS, p);
	}
	if (gen_.chance(20))
		add(KVMI_PAUSE_VCPU, bytes_of(vcpu_hdr(gen_.below(nvcpus)), kvmi_pause_vcpu{0, 0, 0, 0}));
	return b;
}

/* The bytes of one step: a message, a batch, garbage or event replies. */
Bytes Session::step_bytes()
{
	Bytes b;
	auto add = [&](const Bytes &m) { b.insert(b.end(), m.begin(), m.end()); };
	unsigned kind = gen_.below(100);
	if (kind < 45) {
		add(mutated());
	} else if (kind < 60) {
		/* Valid commands back to back, without waiting. */
		for (unsigned i = 0, n = 2 + gen_.below(8); i < n; i++) {
			const kp::MessageInfo *m = nullptr;
			while (!m || !m->command || !m->served)
				m = kp::find_message(gen_.pick(f_.ids));
			add(message(m->id, payload_for(*m)));
		}
	} else if (kind < 75) {
		/* A libkvmi batch: replies off, commands good and bad, replies on. */
		kvmi_control_cmd_response off{0, static_cast<std::uint8_t>(gen_.below(2)), 0, 0};
		add(message(KVMI_CONTROL_CMD_RESPONSE, bytes_of(off)));
		for (unsigned i = 0, n = 1 + gen_.below(8); i < n; i++)
			add(gen_.chance(60) ? message(KVMI_GET_VERSION, {}) : mutated());
		kvmi_control_cmd_response on{1, 0, 0, 0};
		if (gen_.chance(90))
			add(message(KVMI_CONTROL_CMD_RESPONSE, bytes_of(on)));
	} else if (kind < 80) {
		/* Garbage, often behind a header that looks right. */
		Bytes g(1 + gen_.below(gen_.chance(80) ? 64 : 9000));
		for (auto &x : g)
			x = std::byte(gen_.next());
		if (gen_.chance(50) && g.size() >= 8) {
			kvmi_msg_hdr h{gen_.pick(f_.ids), static_cast<std::uint16_t>(gen_.below(64)),
				       seq_++};
			std::memcpy(g.data(), &h, sizeof(h));
		}
		add(g);
	} else {
		add(event_replies());
		if (b.empty())
			add(message(KVMI_GET_GUEST_INFO, {}));
	}
	return b;
}

/* ---------------- the model ---------------- */

/*
 * Frame the bytes as the VMM will, sanitize and predict each message;
 * complete a message left open with zero bytes (so that every step ends
 * on a message boundary).
 */
void Session::frame(Bytes &b)
{
	std::size_t start = 0;
	for (;;) {
		std::size_t pos = start;
		while (pos < b.size() && !framing_closed_) {
			std::size_t hdr_end = pos + sizeof(kvmi_msg_hdr);
			if (hdr_end > b.size())
				break;
			auto h = load<kvmi_msg_hdr>(b, pos);
			if (h.size > KVMI_MSG_SIZE) {
				framing_closed_ = true; /* framing error: the VMM closes */
				break;
			}
			if (hdr_end + h.size > b.size())
				break;
			predict(b, {pos, h});
			pos = hdr_end + h.size;
		}
		if (framing_closed_ || pos == b.size())
			return;
		/* Open: as many zeros as the header (then the payload) needs. */
		std::size_t need = sizeof(kvmi_msg_hdr);
		if (b.size() - pos >= sizeof(kvmi_msg_hdr))
			need += load<kvmi_msg_hdr>(b, pos).size;
		b.resize(pos + need);
		start = pos;
	}
}

/* Make a message harmless to the guest without changing its framing. */
void Session::sanitize(Bytes &b, const Framed &m)
{
	const std::size_t po = m.offset + sizeof(kvmi_msg_hdr);
	Bytes p(b.begin() + po, b.begin() + po + m.hdr.size);
	auto put = [&](std::size_t off, const auto &v) { store(b, po + off, v); };
	const std::size_t vh = sizeof(kvmi_vcpu_hdr);
	switch (m.hdr.id) {
	case KVMI_EVENT_REPLY: {
		auto it = events_.find(m.hdr.seq);
		if (it == events_.end() && m.hdr.seq < 0x80000000u)
			/* Maybe an event not received yet: one never sent instead. */
			store<std::uint32_t>(b, m.offset + offsetof(kvmi_msg_hdr, seq),
					     m.hdr.seq | 0x80000000u);
		/* CRASH would end the guest's loop: CONTINUE. */
		if (p.size() >= vh + 1 && load<std::uint8_t>(p, vh) == KVMI_EVENT_ACTION_CRASH)
			put(vh, std::uint8_t(KVMI_EVENT_ACTION_CONTINUE));
		break;
	}
	case KVMI_SET_REGISTERS:
	case KVMI_INJECT_EXCEPTION:
		/* Never into a running guest: a vCPU that does not exist. */
		if (p.size() >= vh)
			put(0, std::uint16_t(nvcpus + load<std::uint16_t>(p, 0) % 8));
		break;
	case KVMI_WRITE_PHYSICAL: {
		/* Only the scratch pages, the same offset in the page. */
		u64 gpa = load<u64>(p, 0);
		if (gpa >= scratch_gpa && gpa < scratch_gpa + scratch_pages * 4096)
			break;
		put(0, scratch_gpa + (gpa / 4096 % scratch_pages) * 4096 + gpa % 4096);
		break;
	}
	case KVMI_SET_PAGE_ACCESS:
	case KVMI_SET_PAGE_WRITE_BITMAP: {
		/* Restrictions only in the data region (not code, stack, page tables). */
		const std::size_t head = m.hdr.id == KVMI_SET_PAGE_ACCESS
						 ? sizeof(kvmi_set_page_access)
						 : sizeof(kvmi_set_page_write_bitmap);
		const std::size_t entry = m.hdr.id == KVMI_SET_PAGE_ACCESS
						  ? sizeof(kvmi_page_access_entry)
						  : sizeof(kvmi_page_write_bitmap_entry);
		for (std::size_t off = head; off + 8 <= p.size(); off += entry) {
			u64 gpa = load<u64>(p, off);
			if (f_.in_memory(gpa & ~u64(4095), 4096) &&
			    !(gpa >= data_gpa && gpa < data_gpa + data_size))
				put(off, data_gpa + gpa % data_size);
		}
		break;
	}
	default:
		break;
	}
}

bool Session::event_reply_ok(const Bytes &p, std::uint32_t seq)
{
	auto it = events_.find(seq);
	if (it == events_.end() || it->second.answered)
		return false;
	auto &e = it->second;
	const std::size_t head = sizeof(kvmi_vcpu_hdr) + sizeof(kvmi_event_reply);
	std::size_t specific = 0;
	for (auto &info : kp::events())
		if (info.id == e.event)
			specific = info.reply_size;
	if (p.size() < head || p.size() > head + specific)
		return false;
	auto v = load<kvmi_vcpu_hdr>(p, 0);
	auto er = load<kvmi_event_reply>(p, sizeof(v));
	if (v.vcpu != e.vcpu || v.padding1 || v.padding2)
		return false;
	if (er.action > KVMI_EVENT_ACTION_CRASH || er.padding1 || er.padding2)
		return false;
	if (e.event == KVMI_EVENT_PF) {
		Bytes sp(p.begin() + head, p.end());
		sp.resize(sizeof(kvmi_event_pf_reply));
		auto pf = load<kvmi_event_pf_reply>(sp, 0);
		if (pf.ctx_size > sizeof(pf.ctx_data) || pf.singlestep > 1 || pf.rep_complete > 1 ||
		    pf.padding)
			return false;
	}
	e.answered = true;
	return true;
}

void Session::predict(Bytes &b, const Framed &m0)
{
	sanitize(b, m0);
	Framed m{m0.offset, load<kvmi_msg_hdr>(b, m0.offset)};
	Bytes p(b.begin() + m.offset + sizeof(kvmi_msg_hdr),
		b.begin() + m.offset + sizeof(kvmi_msg_hdr) + m.hdr.size);
	f_.totals.messages++;
	if (verbose)
		diag("> %s (id %u) seq %u size %u", command_info(m.hdr.id) ? command_info(m.hdr.id)->name : m.hdr.id ? "?" : "KVMI_EVENT_REPLY",
		     m.hdr.id, m.hdr.seq, m.hdr.size);
	if (m.hdr.id == KVMI_EVENT_REPLY) {
		f_.totals.event_replies++;
		if (!event_reply_ok(p, m.hdr.seq))
			framing_closed_ = true;
		return;
	}
	commands_++;
	Expect e;
	bool reply;
	if (m.hdr.id == KVMI_CONTROL_CMD_RESPONSE &&
	    size_ok(command_info(m.hdr.id)->payload, p, 0)) {
		auto c = load<kvmi_control_cmd_response>(p, 0);
		e = {m.hdr.id, m.hdr.seq, {}, 0, 0, {}};
		if (c.enable > 1 || c.now > 1 || c.padding1 || c.padding2) {
			e.errs = {-KVMI_EINVAL};
			reply = replies_;
		} else {
			if (c.now)
				replies_ = c.enable;
			reply = replies_;
			e.errs = c.enable ? batch_ : std::set<int>{0};
			batch_ = {0};
			replies_ = c.enable;
		}
	} else {
		e = command_expect(m.hdr.id, m.hdr.seq, p);
		reply = replies_;
		if (!reply && batch_.count(0)) {
			batch_.erase(0);
			batch_.insert(e.errs.begin(), e.errs.end());
		}
	}
	e.commands = commands_;
	if (reply)
		expects_.push_back(std::move(e));
}

/* What the VMM may answer to a command whose framing is right. */
Expect Session::command_expect(std::uint16_t id, std::uint32_t seq, const Bytes &p)
{
	Expect e{id, seq, {}, 0, 0, {}};
	auto only = [&](int err) {
		e.errs = {err};
		return e;
	};
	auto ok = [&](std::size_t data) {
		e.errs.insert(0);
		e.min_data = e.max_data = data;
	};
	/* virtkit's own command; this VMM did not opt in (kvmi_memory_map tests the rest). */
	if (id == VIRTKIT_KVMI_SHARE_MEMORY)
		return only(-KVMI_EPERM);
	const kp::MessageInfo *m = command_info(id);
	if (!m)
		return only(-KVMI_ENOSYS);
	if (!policy_.command(id))
		return only(-KVMI_EPERM);
	if (!m->served)
		return only(-KVMI_EOPNOTSUPP);
	std::size_t h = 0;
	if (m->vcpu) {
		if (p.size() < sizeof(kvmi_vcpu_hdr))
			return only(-KVMI_EINVAL);
		auto v = load<kvmi_vcpu_hdr>(p, 0);
		if (v.padding1 || v.padding2 || !size_ok(m->payload, p, sizeof(v)) ||
		    v.vcpu >= nvcpus)
			return only(-KVMI_EINVAL);
		h = sizeof(v);
	} else if (!size_ok(m->payload, p, 0)) {
		return only(-KVMI_EINVAL);
	}
	auto served_event = [](std::uint16_t ev) -> const kp::EventInfo * {
		for (auto &info : kp::events())
			if (info.id == ev)
				return &info;
		return nullptr;
	};
	switch (id) {
	case KVMI_GET_VERSION:
		ok(sizeof(kvmi_get_version_reply));
		e.check = [](const Bytes &d) {
			TEST_ASSERT_EQ(load<kvmi_get_version_reply>(d, 0).version, (unsigned)KVMI_VERSION);
		};
		break;
	case KVMI_CHECK_COMMAND: {
		auto c = load<kvmi_check_command>(p, 0);
		if (c.padding1 || c.padding2)
			return only(-KVMI_EINVAL);
		if (c.id == VIRTKIT_KVMI_SHARE_MEMORY)
			return only(-KVMI_EPERM); /* not opted in: refused, as the command itself */
		auto *cm = command_info(c.id);
		if (!cm || !cm->served)
			return only(-KVMI_EOPNOTSUPP);
		return only(policy_.command(c.id) ? 0 : -KVMI_EPERM);
	}
	case KVMI_CHECK_EVENT: {
		auto c = load<kvmi_check_event>(p, 0);
		if (c.padding1 || c.padding2)
			return only(-KVMI_EINVAL);
		auto *ev = served_event(c.id);
		if (!ev || ev->served == kp::EventInfo::Served::no)
			return only(-KVMI_EOPNOTSUPP);
		e.errs = {policy_.event(c.id) ? 0 : -KVMI_EPERM};
		if (ev->served == kp::EventInfo::Served::if_int3_exits)
			e.errs.insert(-KVMI_EOPNOTSUPP);
		break;
	}
	case KVMI_GET_GUEST_INFO:
		ok(sizeof(kvmi_get_guest_info_reply));
		e.check = [](const Bytes &d) {
			TEST_ASSERT_EQ(load<kvmi_get_guest_info_reply>(d, 0).vcpu_count, nvcpus);
		};
		break;
	case KVMI_GET_VCPU_INFO:
		ok(sizeof(kvmi_get_vcpu_info_reply));
		break;
	case KVMI_PAUSE_VCPU: {
		auto c = load<kvmi_pause_vcpu>(p, h);
		if (c.wait > 1 || c.padding1 || c.padding2 || c.padding3)
			return only(-KVMI_EINVAL);
		if (!policy_.event(KVMI_EVENT_PAUSE_VCPU))
			return only(-KVMI_EPERM);
		e.errs = {0, -KVMI_EBUSY};
		break;
	}
	case KVMI_CONTROL_VM_EVENTS: {
		auto c = load<kvmi_control_vm_events>(p, 0);
		auto *ev = served_event(c.event_id);
		if (c.enable > 1 || c.padding1 || c.padding2 || !ev || !ev->per_vm)
			return only(-KVMI_EINVAL);
		return only(policy_.event(c.event_id) ? 0 : -KVMI_EPERM);
	}
	case KVMI_CONTROL_EVENTS: {
		auto c = load<kvmi_control_events>(p, h);
		auto *ev = served_event(c.event_id);
		if (c.enable > 1 || c.padding1 || c.padding2 || !ev || ev->per_vm)
			return only(-KVMI_EINVAL);
		if (!policy_.event(c.event_id))
			return only(-KVMI_EPERM);
		if (ev->served == kp::EventInfo::Served::no)
			return only(-KVMI_EOPNOTSUPP);
		e.errs = {0};
		if (ev->served == kp::EventInfo::Served::if_int3_exits)
			e.errs.insert({-KVMI_EOPNOTSUPP, -KVMI_EFAULT, -KVMI_EINVAL});
		break;
	}
	case KVMI_CONTROL_MSR: {
		auto c = load<kvmi_control_msr>(p, h);
		if (c.enable > 1 || c.padding1 || c.padding2)
			return only(-KVMI_EINVAL);
		e.errs = {0, -KVMI_EINVAL, -KVMI_EPERM, -KVMI_EOPNOTSUPP};
		break;
	}
	case KVMI_GET_REGISTERS: {
		auto c = load<kvmi_get_registers>(p, h);
		if (c.padding1 || c.padding2)
			return only(-KVMI_EINVAL);
		if (c.nmsrs > kp::max_get_registers_msrs)
			return only(-KVMI_E2BIG);
		ok(sizeof(kvmi_get_registers_reply) + c.nmsrs * sizeof(kvm_msr_entry));
		e.errs.insert({-KVMI_EINVAL, -KVMI_EFAULT, -KVMI_EPERM, -KVMI_ENOENT});
		break;
	}
	case KVMI_GET_CPUID:
		ok(sizeof(kvmi_get_cpuid_reply));
		e.errs.insert(-KVMI_ENOENT);
		break;
	case KVMI_GET_XSAVE:
		ok(512);
		e.max_data = kp::max_reply_data;
		e.errs.insert(-KVMI_E2BIG);
		break;
	case KVMI_READ_PHYSICAL:
	case KVMI_WRITE_PHYSICAL: {
		u64 gpa = load<u64>(p, 0), size = load<u64>(p, 8);
		if (size == 0 || size > 4096 || gpa % 4096 + size > 4096)
			return only(-KVMI_EINVAL);
		if (!f_.in_memory(gpa, size))
			return only(-KVMI_ENOENT);
		ok(id == KVMI_READ_PHYSICAL ? size : 0);
		break;
	}
	case KVMI_SET_PAGE_ACCESS:
	case KVMI_SET_PAGE_WRITE_BITMAP: {
		std::uint16_t view = load<std::uint16_t>(p, 0);
		std::uint16_t padding = id == KVMI_SET_PAGE_ACCESS
						? load<std::uint32_t>(p, offsetof(kvmi_set_page_access, padding))
						: load<std::uint32_t>(p, offsetof(kvmi_set_page_write_bitmap, padding));
		if (padding)
			return only(-KVMI_EINVAL);
		if (view)
			e.errs = {-KVMI_EOPNOTSUPP, -KVMI_EINVAL};
		else
			e.errs = {0, -KVMI_EINVAL, -KVMI_EOPNOTSUPP, -KVMI_ENOMEM, -KVMI_EFAULT};
		break;
	}
	case KVMI_GET_MTRR_TYPE:
		ok(sizeof(kvmi_get_mtrr_type_reply));
		break;
	case KVMI_CONTROL_SPP: {
		auto c = load<kvmi_control_spp>(p, 0);
		if (c.enable > 1 || c.padding1 || c.padding2 || c.padding3)
			return only(-KVMI_EINVAL);
		e.errs = {0, -KVMI_EOPNOTSUPP, -KVMI_ENOMEM, -KVMI_EFAULT};
		break;
	}
	case KVMI_GET_MAX_GFN:
		ok(sizeof(kvmi_get_max_gfn_reply));
		e.check = [end = f_.max_end](const Bytes &d) {
			TEST_ASSERT_EQ(load<kvmi_get_max_gfn_reply>(d, 0).gfn, (end - 1) / 4096);
		};
		break;
	case KVMI_VCPU_TRANSLATE_GVA: {
		u64 gva = load<u64>(p, h);
		ok(sizeof(kvmi_vcpu_translate_gva_reply));
		if (gva >= data_gpa && gva < data_gpa + data_size)
			e.check = [gva](const Bytes &d) {
				TEST_ASSERT_EQ(load<kvmi_vcpu_translate_gva_reply>(d, 0).gpa, gva);
			};
		break;
	}
	case KVMI_VCPU_GET_XCR: {
		auto c = load<kvmi_vcpu_get_xcr>(p, h);
		bool pad = false;
		for (auto x : c.padding)
			pad |= x != 0;
		if (c.xcr != 0 || pad)
			return only(-KVMI_EINVAL);
		ok(sizeof(kvmi_vcpu_get_xcr_reply));
		e.errs.insert(-KVMI_EINVAL);
		break;
	}
	case KVMI_VCPU_SET_XSAVE:
		e.errs = {0, -KVMI_EINVAL};
		break;
	case KVMI_QUERY_PHYSICAL: {
		u64 gfn = load<u64>(p, 0);
		if (gfn > ~u64(0) / 4096)
			return only(-KVMI_EINVAL);
		auto r = f_.region_at(gfn * 4096);
		if (!r)
			return only(-KVMI_ENOENT);
		ok(sizeof(kvmi_query_physical_reply));
		e.check = [r](const Bytes &d) {
			auto q = load<kvmi_query_physical_reply>(d, 0);
			TEST_ASSERT_EQ(q.gfn, r->first / 4096);
			TEST_ASSERT_EQ(q.size, r->second);
		};
		break;
	}
	case KVMI_VCPU_CONTROL_SINGLESTEP: {
		auto c = load<kvmi_vcpu_control_singlestep>(p, h);
		bool pad = false;
		for (auto x : c.padding)
			pad |= x != 0;
		if (c.enable > 1 || pad)
			return only(-KVMI_EINVAL);
		if (!policy_.event(KVMI_EVENT_SINGLESTEP))
			return only(-KVMI_EPERM);
		e.errs = {0, -KVMI_EOPNOTSUPP, -KVMI_EFAULT, -KVMI_EINVAL};
		break;
	}
	default:
		/* SET_REGISTERS, INJECT_EXCEPTION: sanitize made the vCPU invalid. */
		fail(__FILE__, __LINE__, format("no model of served command %u", id));
	}
	return e;
}

/* ---------------- the connection ---------------- */

void Session::connect()
{
	auto o = f_.t.default_options();
	o.handshake_timeout = 10000ms;
	if (gen_.chance(15)) {
		std::vector<std::uint16_t> c;
		for (auto id : f_.ids)
			if (command_info(id) && gen_.chance(50))
				c.push_back(id);
		o.allowed_commands = c;
		policy_.commands = std::set<std::uint16_t>(c.begin(), c.end());
	}
	if (gen_.chance(15)) {
		std::vector<std::uint16_t> ev;
		for (auto &info : kp::events())
			if (gen_.chance(50))
				ev.push_back(info.id);
		o.allowed_events = ev;
		policy_.events = std::set<std::uint16_t>(ev.begin(), ev.end());
	}
	auto fut = std::async(std::launch::async,
			      [&] { return Introspection::connect(f_.t.g.vm(), o); });
	try {
		fd_ = f_.t.listener.accept(10000ms);
	} catch (...) {
		if (fut.wait_for(15s) == std::future_status::ready)
			fut.get(); /* the VMM's error */
		throw;
	}
	kvmi_qemu2introspector hello{};
	std::size_t got = 0;
	while (got < sizeof(hello)) {
		pollfd pfd{fd_.get(), POLLIN, 0};
		TEST_ASSERT(::poll(&pfd, 1, 10000) == 1, "no hello from the VMM");
		ssize_t r = ::recv(fd_.get(), reinterpret_cast<char *>(&hello) + got,
				   sizeof(hello) - got, 0);
		TEST_ASSERT(r > 0 || (r < 0 && errno == EAGAIN), "hello: %zd", r);
		if (r > 0)
			got += r;
	}
	kvmi_introspector2qemu a{};
	a.struct_size = sizeof(a);
	auto hash = kp::cookie_hash(secret);
	std::memcpy(a.cookie_hash, hash.data(), sizeof(a.cookie_hash));
	TEST_ASSERT(::send(fd_.get(), &a, sizeof(a), MSG_NOSIGNAL) == (ssize_t)sizeof(a));
	TEST_ASSERT(fut.wait_for(15s) == std::future_status::ready, "connect() hangs");
	f_.t.vmm.emplace(fut.get());
}

/* Read what is there (waiting at most timeout_ms for something). */
void Session::pump(int timeout_ms)
{
	if (eof_)
		return;
	pollfd pfd{fd_.get(), POLLIN, 0};
	if (::poll(&pfd, 1, timeout_ms) <= 0)
		return;
	std::byte buf[16384];
	for (;;) {
		ssize_t r = ::recv(fd_.get(), buf, sizeof(buf), 0);
		if (r > 0) {
			rx_.insert(rx_.end(), buf, buf + r);
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r == 0 || errno != EAGAIN)
			eof_ = true;
		break;
	}
	std::size_t pos = 0;
	while (rx_.size() - pos >= sizeof(kvmi_msg_hdr)) {
		auto h = load<kvmi_msg_hdr>(rx_, pos);
		if (rx_.size() - pos - sizeof(h) < h.size)
			break;
		Bytes d(rx_.begin() + pos + sizeof(h), rx_.begin() + pos + sizeof(h) + h.size);
		pos += sizeof(h) + h.size;
		receive(h, d);
	}
	rx_.erase(rx_.begin(), rx_.begin() + pos);
}

void Session::receive(const kvmi_msg_hdr &h, const Bytes &d)
{
	const bool reply_to_id1 = h.id == KVMI_EVENT && h.size == sizeof(kvmi_error_code) &&
				  !expects_.empty() && expects_.front().id == KVMI_EVENT &&
				  expects_.front().seq == h.seq;
	if (h.id == KVMI_EVENT && !reply_to_id1) {
		/* An event: well-formed, served, one at a time per vCPU. */
		f_.totals.events++;
		TEST_ASSERT(d.size() >= sizeof(kvmi_event), "event of %zu bytes", d.size());
		auto ev = load<kvmi_event>(d, 0);
		TEST_ASSERT_EQ(ev.size, sizeof(kvmi_event));
		TEST_ASSERT(ev.vcpu < nvcpus, "event on vcpu %u", ev.vcpu);
		const kp::EventInfo *info = nullptr;
		for (auto &i : kp::events())
			if (i.id == ev.event)
				info = &i;
		TEST_ASSERT(info && info->served != kp::EventInfo::Served::no, "event %u", ev.event);
		TEST_ASSERT_EQ(d.size(), sizeof(kvmi_event) + info->data_size);
		/* Unique; not in order (two vCPUs send concurrently). */
		TEST_ASSERT(!events_.count(h.seq) && h.seq < 0x80000000u, "event seq %u again",
			    h.seq);
		for (auto &[s, e] : events_)
			TEST_ASSERT(e.answered || e.vcpu != ev.vcpu,
				    "vcpu %u: event %u (seq %u) while event %u (seq %u) waits", ev.vcpu,
				    ev.event, h.seq, e.event, s);
		events_[h.seq] = {ev.vcpu, ev.event, false};
		if (verbose)
			diag("< event %u vcpu %u seq %u", ev.event, ev.vcpu, h.seq);
		return;
	}
	f_.totals.replies++;
	TEST_ASSERT(!expects_.empty(), "reply id %u seq %u to nothing", h.id, h.seq);
	Expect e = std::move(expects_.front());
	expects_.pop_front();
	confirmed_ = e.commands;
	TEST_ASSERT(h.id == e.id && h.seq == e.seq, "reply id %u seq %u, expected id %u seq %u",
		    h.id, h.seq, e.id, e.seq);
	TEST_ASSERT(d.size() >= sizeof(kvmi_error_code), "reply of %zu bytes", d.size());
	auto ec = load<kvmi_error_code>(d, 0);
	if (verbose)
		diag("< reply id %u seq %u err %d", h.id, h.seq, ec.err);
	Bytes data(d.begin() + sizeof(ec), d.end());
	TEST_ASSERT(e.errs.count(ec.err), "%s (id %u) seq %u: err %d, expected %s",
		    command_info(h.id) ? command_info(h.id)->name : "unknown", h.id, h.seq, ec.err,
		    err_list(e.errs).c_str());
	TEST_ASSERT_EQ(ec.padding, 0u);
	if (ec.err) {
		f_.totals.error_replies++;
		TEST_ASSERT(data.empty(), "error reply with %zu bytes of data", data.size());
		return;
	}
	TEST_ASSERT(data.size() >= e.min_data && data.size() <= e.max_data,
		    "id %u: %zu bytes of reply data, expected %zu..%zu", h.id, data.size(),
		    e.min_data, e.max_data);
	if (e.check)
		e.check(data);
}

/* Send b: in one piece, or in many small writes with (a few) pauses. */
void Session::send(const Bytes &b, bool split)
{
	std::size_t pos = 0;
	unsigned pauses = split ? gen_.below(16) : 0;
	while (pos < b.size()) {
		std::size_t n = b.size() - pos;
		if (split)
			n = std::min<std::size_t>(n, 1 + gen_.below(gen_.chance(70) ? 8 : 200));
		ssize_t r = ::send(fd_.get(), b.data() + pos, n, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (r > 0) {
			pos += r;
			f_.totals.bytes += r;
			if (split) {
				f_.totals.partial_writes++;
				if (pauses && gen_.chance(10)) {
					pauses--;
					::usleep(gen_.below(300));
				}
				pump(0);
			}
			continue;
		}
		if (r < 0 && (errno == EPIPE || errno == ECONNRESET)) {
			TEST_ASSERT(framing_closed_, "the VMM closed the connection: %s",
				    strerror(errno));
			return;
		}
		TEST_ASSERT(r < 0 && (errno == EAGAIN || errno == EINTR), "send: %s", strerror(errno));
		TEST_ASSERT(std::chrono::steady_clock::now() < end_, "the VMM reads nothing");
		/* The VMM may be blocked sending to us: read. */
		pollfd pfd{fd_.get(), POLLIN | POLLOUT, 0};
		::poll(&pfd, 1, 10);
		pump(0);
		if (eof_) {
			TEST_ASSERT(framing_closed_, "the VMM closed the connection");
			return;
		}
	}
}

/* Every reply expected, and the close if the framing broke. */
void Session::wait_replies()
{
	while (!expects_.empty() || (framing_closed_ && !eof_)) {
		TEST_ASSERT(std::chrono::steady_clock::now() < end_,
			    "no reply to id %u seq %u (%zu replies missing)%s",
			    expects_.empty() ? 0 : expects_.front().id,
			    expects_.empty() ? 0 : expects_.front().seq, expects_.size(),
			    framing_closed_ ? ", the VMM should close" : "");
		pump(50);
		if (eof_ && !expects_.empty())
			fail(__FILE__, __LINE__,
			     format("the VMM closed the connection; %zu replies missing, the first "
				    "to id %u seq %u",
				    expects_.size(), expects_.front().id, expects_.front().seq));
	}
}

void Session::finish(const char *how)
{
	f_.totals.endings[how]++;
	if (verbose)
		diag("session ends: %s", how);
	auto &vmm = f_.t.vmm;
	TEST_ASSERT(vmm->wait_disconnected(std::chrono::duration_cast<std::chrono::milliseconds>(deadline)),
		    "the VMM did not disconnect (%s)", how);
	TEST_ASSERT(!vmm->connected());
	/*
	 * All the commands framed, when the VMM closed the connection; after
	 * a close by the tool or a disconnect, those without replies may be
	 * left unread.
	 */
	const u64 n = vmm->stats().commands;
	if (framing_closed_)
		TEST_ASSERT_EQ(n, commands_);
	else
		TEST_ASSERT(n >= confirmed_ && n <= commands_,
			    "the VMM counts %llu commands, %llu..%llu were sent",
			    (unsigned long long)n, (unsigned long long)confirmed_,
			    (unsigned long long)commands_);
	vmm.reset();
	fd_ = FileDesc();
}

void Session::run()
{
	end_ = std::chrono::steady_clock::now() + deadline;
	connect();
	const unsigned steps = 1 + gen_.below(gen_.chance(20) ? 200 : 30);
	for (unsigned s = 0; s < steps && !framing_closed_; s++) {
		Bytes b = s == 0 && gen_.chance(50) ? events_on() : step_bytes();
		frame(b);
		send(b, gen_.chance(15));
		wait_replies();
	}
	if (framing_closed_) {
		f_.totals.closes_by_vmm++;
		finish("closed by the VMM");
		return;
	}
	switch (gen_.below(4)) {
	case 0: {
		/* Part of a message, then a close or a reset. */
		Bytes m = mutated();
		std::size_t keep = 1 + gen_.below(std::min<std::size_t>(m.size(), 8) +
						  (m.size() > 8 ? gen_.below(m.size() - 8) : 0));
		keep = std::min(keep, m.size() - 1);
		/* (the bytes before are whole messages: frame only them) */
		Bytes part(m.begin(), m.begin() + keep);
		if (part.size() >= sizeof(kvmi_msg_hdr) &&
		    load<kvmi_msg_hdr>(part, 0).size + sizeof(kvmi_msg_hdr) <= part.size())
			part.resize(sizeof(kvmi_msg_hdr) - 1);
		if (part.size() >= sizeof(kvmi_msg_hdr) &&
		    load<kvmi_msg_hdr>(part, 0).size > KVMI_MSG_SIZE)
			part.resize(sizeof(kvmi_msg_hdr) - 1);
		send(part, gen_.chance(50));
		if (gen_.chance(50)) {
			linger l{1, 0}; /* a reset */
			::setsockopt(fd_.get(), SOL_SOCKET, SO_LINGER, &l, sizeof(l));
			fd_ = FileDesc();
			finish("reset mid-message");
		} else {
			fd_ = FileDesc();
			finish("closed mid-message");
		}
		break;
	}
	case 1:
		f_.t.vmm->disconnect();
		pump(0);
		finish("disconnected by the VMM");
		break;
	default:
		fd_ = FileDesc();
		finish("closed by the tool");
		break;
	}
}

} // namespace

VK_TEST(fuzz_sessions)
{
	const u64 seed = env_u64("VIRTKIT_FUZZ_SEED", static_cast<u64>(time(nullptr)) ^
							      (static_cast<u64>(getpid()) << 32));
	const u64 iters = env_u64("VIRTKIT_FUZZ_ITERS", 400);
	const u64 first = env_u64("VIRTKIT_FUZZ_FIRST", 0);
	diag("seed %llu, sessions %llu..%llu (VIRTKIT_FUZZ_SEED=%llu repeats this run)",
	     (unsigned long long)seed, (unsigned long long)first,
	     (unsigned long long)(first + iters - 1), (unsigned long long)seed);
	Fuzzer f(seed);
	/*
	 * The first page restriction enables the VM's sub-page protection,
	 * which keeps a descriptor for the VM's life with the kmod backend
	 * (virtkit.ko's per-VM file): enable it first, so that the count
	 * below sees only what sessions leave behind.
	 */
	virtkit::SubpageProtection::enable(f.t.g.vm());
	const int fds0 = open_fd_count();
	for (u64 i = first; i < first + iters; i++) {
		/* KvmiTest's alarm, per session. */
		::alarm(std::chrono::duration_cast<std::chrono::seconds>(deadline).count() * 3);
		try {
			Session s(f, i);
			s.run();
			for (unsigned v = 0; v < nvcpus; v++)
				f.expect_progress(v);
			TEST_ASSERT_EQ(open_fd_count(), fds0);
		} catch (const Failure &e) {
			diag("failed in session %llu: VIRTKIT_FUZZ_SEED=%llu VIRTKIT_FUZZ_FIRST=%llu "
			     "VIRTKIT_FUZZ_ITERS=1 repeats it",
			     (unsigned long long)i, (unsigned long long)seed, (unsigned long long)i);
			throw Failure{format("seed %llu session %llu: ", (unsigned long long)seed,
					     (unsigned long long)i) + e.message};
		}
		f.totals.sessions++;
	}
	f.stop();
	auto &t = f.totals;
	diag("%llu sessions, %llu messages (%llu bytes, %llu partial writes), %llu replies "
	     "(%llu errors), %llu events, %llu event replies",
	     (unsigned long long)t.sessions, (unsigned long long)t.messages,
	     (unsigned long long)t.bytes, (unsigned long long)t.partial_writes,
	     (unsigned long long)t.replies, (unsigned long long)t.error_replies,
	     (unsigned long long)t.events, (unsigned long long)t.event_replies);
	for (auto &[how, n] : t.endings)
		diag("%6llu sessions %s", (unsigned long long)n, how.c_str());
}
