// SPDX-License-Identifier: MIT
#include "kvmi/vmm/wire.hpp"

#include <charconv>

namespace virtkit::detail::kvmi {

bool known_command(std::uint16_t id)
{
	const MessageInfo *m = find_message(id);
	return m && m->command;
}

bool supported_command(std::uint16_t id)
{
	const MessageInfo *m = find_message(id);
	return m && m->command && m->served;
}

bool vcpu_command(std::uint16_t id)
{
	const MessageInfo *m = find_message(id);
	return m && m->command && m->vcpu;
}

bool always_allowed_command(std::uint16_t id)
{
	return id == KVMI_GET_VERSION || id == KVMI_CHECK_COMMAND || id == KVMI_CHECK_EVENT ||
	       id == KVMI_CONTROL_CMD_RESPONSE;
}

bool known_event(std::uint16_t id) { return find_event(id) != nullptr; }

bool supported_event(std::uint16_t id, bool int3_exits)
{
	const EventInfo *e = find_event(id);
	if (!e)
		return false;
	switch (e->served) {
	case EventInfo::Served::yes:
		return true;
	case EventInfo::Served::if_int3_exits:
		return int3_exits;
	case EventInfo::Served::no:
		break;
	}
	return false;
}

bool vm_event(std::uint16_t id)
{
	const EventInfo *e = find_event(id);
	return e && e->per_vm;
}

std::size_t event_reply_size(std::uint16_t event)
{
	const EventInfo *e = find_event(event);
	return e ? e->reply_size : 0;
}

namespace {

bool parse_u32(std::string_view s, std::uint32_t &out)
{
	if (s.empty())
		return false;
	auto r = std::from_chars(s.data(), s.data() + s.size(), out, 10);
	return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

} // namespace

std::optional<Address> parse_address(std::string_view s, std::string *why)
{
	auto fail = [&](const char *w) -> std::optional<Address> {
		if (why)
			*why = w;
		return std::nullopt;
	};
	Address a{};
	if (s.starts_with("unix:")) {
		a.kind = Address::Kind::unix_path;
		a.path = std::string(s.substr(5));
		if (a.path.empty() || a.path == "@")
			return fail("empty unix socket path");
		if (a.path.find('\0') != std::string::npos)
			return fail("NUL byte in the unix socket path");
		/* sockaddr_un.sun_path: 108 bytes with the terminating NUL. */
		if (a.path.size() > 107)
			return fail("unix socket path longer than 107 bytes");
		return a;
	}
	if (s.starts_with("vsock:")) {
		a.kind = Address::Kind::vsock;
		auto rest = s.substr(6);
		auto colon = rest.find(':');
		if (colon == std::string_view::npos)
			return fail("vsock address is not vsock:CID:PORT");
		if (!parse_u32(rest.substr(0, colon), a.cid) ||
		    !parse_u32(rest.substr(colon + 1), a.port))
			return fail("vsock CID and PORT must be decimal 32-bit numbers");
		return a;
	}
	return fail("address must start with unix: or vsock:");
}

std::uint8_t cpu_mode(const kvm_sregs &sregs)
{
	constexpr std::uint64_t cr0_pe = 1, efer_lma = 1u << 10;
	if (!(sregs.cr0 & cr0_pe))
		return 2;
	if ((sregs.efer & efer_lma) && sregs.cs.l)
		return 8;
	return sregs.cs.db ? 4 : 2;
}

bool injectable_vector(std::uint8_t nr)
{
	/*
	 * Architectural exceptions only: not NMI (2, an interrupt), not the
	 * reserved 9 (coprocessor overrun), 15 and 22..27, 31.
	 */
	if (nr >= 32)
		return false;
	switch (nr) {
	case 2: case 9: case 15: case 22: case 23: case 24: case 25: case 26: case 27: case 31:
		return false;
	default:
		return true;
	}
}

bool vector_has_error_code(std::uint8_t nr)
{
	switch (nr) {
	case 8: case 10: case 11: case 12: case 13: case 14: case 17: case 21: case 29: case 30:
		return true;
	default:
		return false;
	}
}

} // namespace virtkit::detail::kvmi
