// SPDX-License-Identifier: MIT
/*
 * The KVMI message table (libvirtkit/src/kvmi/protocol/messages.hpp)
 * against the ABI header uapi/linux/virtkit_kvmi.h: every message and
 * event id the header's enums define has exactly one entry, named like the
 * enumerator, and no entry has an id the header lacks; every payload size
 * the table gives is sizeof the header's struct for it.
 *
 * The ids and names come from the header's text (read at run time: an id
 * added there and forgotten in the table fails here); the sizes from the
 * structs, compiled in below. Which structs belong to which id follows the
 * header's naming (KVMI_READ_PHYSICAL: struct kvmi_read_physical,
 * KVMI_EVENT_PF: struct kvmi_event_pf and kvmi_event_pf_reply), and a
 * struct named for an id that is missing from the list below fails too.
 */
#include <catch2/catch.hpp>

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "kvmi/protocol/messages.hpp"

using namespace virtkit::detail::kvmi;
using Kind = PayloadSize::Kind;

namespace {

/* --- what the header says --- */

struct Header {
	std::map<std::string, int> messages; /* enumerator -> value, KVMI_NUM_* left out */
	std::map<std::string, int> events;
	std::set<std::string> structs;	/* "kvmi_read_physical" */
};

std::string read_header_text()
{
	namespace fs = std::filesystem;
	const fs::path rel = "uapi/linux/virtkit_kvmi.h";
	std::vector<fs::path> candidates;
	/* The source tree: this file is selftests/unit/ in it (the path the
	 * compiler had, relative to the top where make runs, or absolute). */
	candidates.push_back(fs::path(__FILE__).parent_path() / "../.." / rel);
	/* The directories above the test binary (BUILD/selftests/unit/). */
	std::error_code ec;
	auto exe = fs::read_symlink("/proc/self/exe", ec);
	if (!ec)
		for (auto d = exe.parent_path(); !d.empty(); d = d.parent_path()) {
			candidates.push_back(d / rel);
			if (d == d.root_path())
				break;
		}
	for (const auto &c : candidates) {
		std::ifstream in(c);
		if (in)
			return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
	}
	FAIL("cannot find " << rel << " (run from the source tree or its build directory)");
	return {};
}

/* The enumerators of the header's enum blocks, in order: messages, events. */
Header parse_header(const std::string &text)
{
	Header h;
	static const std::regex block(R"(enum\s*\{([^}]*)\})");
	static const std::regex item(R"((KVMI_[A-Z0-9_]+)\s*=\s*(\d+))");
	static const std::regex strct(R"(struct\s+(kvmi_[a-z0-9_]+)\s*\{)");
	int n = 0;
	for (std::sregex_iterator b(text.begin(), text.end(), block), end; b != end; ++b, ++n) {
		auto &into = n == 0 ? h.messages : h.events;
		const std::string body = (*b)[1];
		for (std::sregex_iterator i(body.begin(), body.end(), item); i != end; ++i)
			into[(*i)[1]] = std::stoi((*i)[2]);
	}
	for (std::sregex_iterator s(text.begin(), text.end(), strct), end; s != end; ++s)
		h.structs.insert((*s)[1]);
	return h;
}

const Header &header()
{
	static const Header h = parse_header(read_header_text());
	return h;
}

/* "KVMI_EVENT_PF" -> "kvmi_event_pf" */
std::string struct_name(const char *name)
{
	std::string s = name;
	std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
	return s;
}

/* --- the sizes, from the header's structs --- */

/* The payload size (after kvmi_vcpu_hdr) of a request: sizeof what it is
 * made of (the head, for counted and per-event payloads; the least, for
 * at-least ones). */
struct RequestLayout {
	int id;
	std::size_t size;
	const char *what; /* the struct's name, or what the payload is */
};

#define STRUCT(id, s) RequestLayout{id, sizeof(s), #s}

constexpr RequestLayout request_layouts[] = {
	STRUCT(KVMI_EVENT_REPLY, kvmi_event_reply),
	STRUCT(KVMI_EVENT, kvmi_event),
	{KVMI_GET_VERSION, 0, "nothing"},
	STRUCT(KVMI_CHECK_COMMAND, kvmi_check_command),
	STRUCT(KVMI_CHECK_EVENT, kvmi_check_event),
	{KVMI_GET_GUEST_INFO, 0, "nothing"},
	{KVMI_GET_VCPU_INFO, 0, "nothing"},
	STRUCT(KVMI_PAUSE_VCPU, kvmi_pause_vcpu),
	STRUCT(KVMI_CONTROL_VM_EVENTS, kvmi_control_vm_events),
	STRUCT(KVMI_CONTROL_EVENTS, kvmi_control_events),
	STRUCT(KVMI_CONTROL_CR, kvmi_control_cr),
	STRUCT(KVMI_CONTROL_MSR, kvmi_control_msr),
	STRUCT(KVMI_GET_REGISTERS, kvmi_get_registers),
	STRUCT(KVMI_SET_REGISTERS, kvm_regs),
	STRUCT(KVMI_GET_CPUID, kvmi_get_cpuid),
	{KVMI_GET_XSAVE, 0, "nothing"},
	STRUCT(KVMI_READ_PHYSICAL, kvmi_read_physical),
	STRUCT(KVMI_WRITE_PHYSICAL, kvmi_write_physical),
	STRUCT(KVMI_INJECT_EXCEPTION, kvmi_inject_exception),
	STRUCT(KVMI_SET_PAGE_ACCESS, kvmi_set_page_access),
	STRUCT(KVMI_GET_MTRR_TYPE, kvmi_get_mtrr_type),
	STRUCT(KVMI_CONTROL_SPP, kvmi_control_spp),
	STRUCT(KVMI_SET_PAGE_WRITE_BITMAP, kvmi_set_page_write_bitmap),
	STRUCT(KVMI_CONTROL_CMD_RESPONSE, kvmi_control_cmd_response),
	{KVMI_GET_MAX_GFN, 0, "nothing"},
	STRUCT(KVMI_VCPU_TRANSLATE_GVA, kvmi_vcpu_translate_gva),
	STRUCT(KVMI_VCPU_GET_XCR, kvmi_vcpu_get_xcr),
	/* The legacy area (512) and the XSAVE header (64). */
	{KVMI_VCPU_SET_XSAVE, 512 + 64, "the XSAVE legacy area and header"},
	STRUCT(KVMI_QUERY_PHYSICAL, kvmi_query_physical),
	STRUCT(KVMI_VCPU_CONTROL_SINGLESTEP, kvmi_vcpu_control_singlestep),
};

#undef STRUCT

/* The event-specific data after kvmi_event, its reply after kvmi_event_reply. */
struct EventLayout {
	int id;
	std::size_t data, reply;
	const char *data_struct, *reply_struct;
};

#define EVENT(id, d, r) EventLayout{id, sizeof(d), sizeof(r), #d, #r}
#define EVENT_DATA(id, d) EventLayout{id, sizeof(d), 0, #d, nullptr}

constexpr EventLayout event_layouts[] = {
	EVENT(KVMI_EVENT_MSR, kvmi_event_msr, kvmi_event_msr_reply),
	EVENT_DATA(KVMI_EVENT_BREAKPOINT, kvmi_event_breakpoint),
	EVENT(KVMI_EVENT_PF, kvmi_event_pf, kvmi_event_pf_reply),
	EVENT_DATA(KVMI_EVENT_TRAP, kvmi_event_trap),
	EVENT_DATA(KVMI_EVENT_SINGLESTEP, kvmi_event_singlestep),
};

#undef EVENT
#undef EVENT_DATA

/* --- the check --- */

template <class T> std::string id_text(const T &entry)
{
	return std::string(entry.name ? entry.name : "(null)") + " (" + std::to_string(entry.id) + ")";
}

/* One entry per id of ids, with its name; no entry for another id. */
template <class T>
void check_ids(std::span<const T> table, const std::map<std::string, int> &ids, const char *what,
	       std::vector<std::string> &out)
{
	for (const auto &[name, value] : ids) {
		auto n = std::count_if(table.begin(), table.end(),
				       [&](const T &e) { return e.id == value; });
		if (n != 1) {
			out.push_back(std::string(what) + " " + name + " (" + std::to_string(value) +
				      ") has " + std::to_string(n) + " entries");
			continue;
		}
		auto &e = *std::find_if(table.begin(), table.end(),
					[&](const T &x) { return x.id == value; });
		if (!e.name || name != e.name)
			out.push_back(std::string(what) + " " + std::to_string(value) + " is " + name +
				      " in the header, " + id_text(e) + " in the table");
	}
	for (const auto &e : table) {
		bool defined = std::any_of(ids.begin(), ids.end(),
					   [&](const auto &kv) { return kv.second == e.id; });
		if (!defined)
			out.push_back(std::string(what) + " " + id_text(e) +
				      ": no such id in the header");
	}
}

template <class T, class Table> const T *entry(const Table &table, int id)
{
	auto it = std::find_if(std::begin(table), std::end(table),
			       [&](const T &e) { return e.id == id; });
	return it == std::end(table) ? nullptr : &*it;
}

/* What is wrong with the tables, as text; empty: nothing. */
std::vector<std::string> problems(std::span<const MessageInfo> messages,
				  std::span<const EventInfo> events, const Header &h)
{
	std::vector<std::string> out;
	check_ids(messages, h.messages, "message", out);
	check_ids(events, h.events, "event", out);

	/* Every size the table gives is one this test knows, and right. */
	for (const auto &m : messages) {
		auto *l = entry<RequestLayout>(request_layouts, m.id);
		if (m.payload.kind == Kind::unknown) {
			if (l)
				out.push_back(id_text(m) + ": no payload layout in the table, the header has " +
					      l->what);
			continue;
		}
		if (!l) {
			out.push_back(id_text(m) + ": a payload size of " +
				      std::to_string(m.payload.size) + " this test does not know");
			continue;
		}
		if (m.payload.size != l->size)
			out.push_back(id_text(m) + ": payload size " + std::to_string(m.payload.size) +
				      ", sizeof(" + l->what + ") is " + std::to_string(l->size));
		bool events_kind = m.payload.kind == Kind::per_event;
		if (events_kind != (m.id == KVMI_EVENT || m.id == KVMI_EVENT_REPLY))
			out.push_back(id_text(m) + ": per-event payloads are KVMI_EVENT's and "
						   "KVMI_EVENT_REPLY's only");
		if (m.command == events_kind)
			out.push_back(id_text(m) + ": the event messages are not commands, others are");
	}
	for (const auto &l : request_layouts)
		if (!entry<MessageInfo>(messages, l.id))
			out.push_back("id " + std::to_string(l.id) + " (" + l.what + ") has no entry");
	/* A struct named for a message: the test lists it. */
	for (const auto &m : messages) {
		if (!m.name || !h.structs.count(struct_name(m.name)))
			continue;
		auto *l = entry<RequestLayout>(request_layouts, m.id);
		if (!l || struct_name(m.name) != l->what)
			out.push_back(id_text(m) + ": struct " + struct_name(m.name) +
				      " in the header, not in this test");
	}

	for (const auto &e : events) {
		auto *l = entry<EventLayout>(event_layouts, e.id);
		std::size_t data = l ? l->data : 0, reply = l ? l->reply : 0;
		if (e.data_size != data)
			out.push_back(id_text(e) + ": data size " + std::to_string(e.data_size) +
				      ", expected " + std::to_string(data));
		if (e.reply_size != reply)
			out.push_back(id_text(e) + ": reply size " + std::to_string(e.reply_size) +
				      ", expected " + std::to_string(reply));
		if (!e.name)
			continue;
		const std::string s = struct_name(e.name);
		if (h.structs.count(s) && (!l || s != l->data_struct))
			out.push_back(id_text(e) + ": struct " + s + " in the header, not in this test");
		if (h.structs.count(s + "_reply") && (!l || !l->reply_struct || s + "_reply" != l->reply_struct))
			out.push_back(id_text(e) + ": struct " + s +
				      "_reply in the header, not in this test");
	}
	return out;
}

std::string joined(const std::vector<std::string> &v)
{
	std::string s;
	for (auto &x : v)
		s += x + "\n";
	return s;
}

bool mentions(const std::vector<std::string> &v, const std::string &what)
{
	return std::any_of(v.begin(), v.end(),
			   [&](const std::string &s) { return s.find(what) != std::string::npos; });
}

} // namespace

TEST_CASE("the header's ids as this test reads them", "[kvmi][messages]")
{
	const auto &h = header();
	CHECK(h.messages.size() == 45);
	CHECK(h.events.size() == 13);
	CHECK(h.messages.at("KVMI_EVENT_REPLY") == KVMI_EVENT_REPLY);
	CHECK(h.messages.at("KVMI_VCPU_CONTROL_SINGLESTEP") == KVMI_VCPU_CONTROL_SINGLESTEP);
	CHECK(h.events.at("KVMI_EVENT_CPUID") == KVMI_EVENT_CPUID);
	CHECK_FALSE(h.messages.count("KVMI_NUM_MESSAGES"));
	CHECK(h.structs.count("kvmi_read_physical"));
	CHECK(h.structs.count("kvmi_event_pf_reply"));
}

TEST_CASE("the message table has one entry per id of the ABI header, its sizes are the header's",
	  "[kvmi][messages]")
{
	auto p = problems(messages(), events(), header());
	INFO(joined(p));
	CHECK(p.empty());
	CHECK(messages().size() == header().messages.size());
	CHECK(events().size() == header().events.size());
	for (const auto &m : messages())
		REQUIRE(find_message(m.id) == &m);
	for (const auto &e : events())
		REQUIRE(find_event(e.id) == &e);
}

TEST_CASE("the table check fails for a wrong table", "[kvmi][messages]")
{
	std::vector<MessageInfo> m(messages().begin(), messages().end());
	std::vector<EventInfo> e(events().begin(), events().end());
	REQUIRE(problems(m, e, header()).empty());
	auto message = [&](int id) -> MessageInfo & {
		return *std::find_if(m.begin(), m.end(), [&](auto &x) { return x.id == id; });
	};
	auto event = [&](int id) -> EventInfo & {
		return *std::find_if(e.begin(), e.end(), [&](auto &x) { return x.id == id; });
	};

	SECTION("a size that is not sizeof the struct")
	{
		message(KVMI_READ_PHYSICAL).payload.size += 8;
		CHECK(mentions(problems(m, e, header()), "KVMI_READ_PHYSICAL (17): payload size 24"));
	}
	SECTION("a counted head of the wrong size")
	{
		message(KVMI_SET_PAGE_ACCESS).payload.size = 16;
		CHECK(mentions(problems(m, e, header()), "KVMI_SET_PAGE_ACCESS"));
	}
	SECTION("no layout for a command the header has a struct for")
	{
		message(KVMI_CONTROL_CR).payload = {};
		CHECK(mentions(problems(m, e, header()), "KVMI_CONTROL_CR"));
	}
	SECTION("a size for a command without a layout")
	{
		message(KVMI_GET_MAP_TOKEN).payload = {Kind::fixed, 8};
		CHECK(mentions(problems(m, e, header()), "KVMI_GET_MAP_TOKEN"));
	}
	SECTION("a name that is not the header's")
	{
		message(KVMI_GET_CPUID).name = "KVMI_GET_CPU_ID";
		CHECK(mentions(problems(m, e, header()), "KVMI_GET_CPUID in the header"));
	}
	SECTION("a missing id")
	{
		m.erase(std::find_if(m.begin(), m.end(), [](auto &x) { return x.id == KVMI_GET_XSAVE; }));
		CHECK(mentions(problems(m, e, header()), "KVMI_GET_XSAVE (16) has 0 entries"));
	}
	SECTION("an id twice")
	{
		m.push_back(message(KVMI_PAUSE_VCPU));
		CHECK(mentions(problems(m, e, header()), "KVMI_PAUSE_VCPU (7) has 2 entries"));
	}
	SECTION("an id the header does not define")
	{
		m.push_back(MessageInfo{30, "KVMI_30", true, false, false, {}});
		CHECK(mentions(problems(m, e, header()), "KVMI_30 (30): no such id"));
	}
	SECTION("an event data size")
	{
		event(KVMI_EVENT_TRAP).data_size = 8;
		CHECK(mentions(problems(m, e, header()), "KVMI_EVENT_TRAP (7): data size 8"));
	}
	SECTION("an event reply size")
	{
		event(KVMI_EVENT_PF).reply_size = 0;
		CHECK(mentions(problems(m, e, header()), "KVMI_EVENT_PF (6): reply size 0"));
	}
	SECTION("a missing event")
	{
		e.erase(std::find_if(e.begin(), e.end(),
				     [](auto &x) { return x.id == KVMI_EVENT_SINGLESTEP; }));
		CHECK(mentions(problems(m, e, header()), "KVMI_EVENT_SINGLESTEP (11) has 0 entries"));
	}
}
