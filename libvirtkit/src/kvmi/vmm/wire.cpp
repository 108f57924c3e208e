// SPDX-License-Identifier: MIT
#include "kvmi/vmm/wire.hpp"

#include <charconv>

namespace virtkit::detail::kvmi {

namespace {

struct CommandInfo {
	const char *name;
	bool supported;	/* by this backend */
	bool vcpu;	/* payload starts with kvmi_vcpu_hdr */
};

/*
 * The unsupported commands need what stock KVM does not give a VMM: CR
 * interception (CONTROL_CR), EPT views, #VE and EPT-level page tricks
 * (ALLOC/FREE/CHANGE_GFN, GET_NEXT_AVAILABLE_GFN), remote mapping tokens
 * (GET_MAP_TOKEN); GET_PAGE_ACCESS and GET_PAGE_WRITE_BITMAP have no layout
 * in kvmi-v7's headers.
 */
constexpr CommandInfo unknown_command{nullptr, false, false};

CommandInfo command_info(std::uint16_t id)
{
	switch (id) {
	case KVMI_GET_VERSION: return {"KVMI_GET_VERSION", true, false};
	case KVMI_CHECK_COMMAND: return {"KVMI_CHECK_COMMAND", true, false};
	case KVMI_CHECK_EVENT: return {"KVMI_CHECK_EVENT", true, false};
	case KVMI_GET_GUEST_INFO: return {"KVMI_GET_GUEST_INFO", true, false};
	case KVMI_GET_VCPU_INFO: return {"KVMI_GET_VCPU_INFO", true, true};
	case KVMI_PAUSE_VCPU: return {"KVMI_PAUSE_VCPU", true, true};
	case KVMI_CONTROL_VM_EVENTS: return {"KVMI_CONTROL_VM_EVENTS", true, false};
	case KVMI_CONTROL_EVENTS: return {"KVMI_CONTROL_EVENTS", true, true};
	case KVMI_CONTROL_CR: return {"KVMI_CONTROL_CR", false, true};
	case KVMI_CONTROL_MSR: return {"KVMI_CONTROL_MSR", true, true};
	case KVMI_CONTROL_VE: return {"KVMI_CONTROL_VE", false, false};
	case KVMI_GET_REGISTERS: return {"KVMI_GET_REGISTERS", true, true};
	case KVMI_SET_REGISTERS: return {"KVMI_SET_REGISTERS", true, true};
	case KVMI_GET_CPUID: return {"KVMI_GET_CPUID", true, true};
	case KVMI_GET_XSAVE: return {"KVMI_GET_XSAVE", true, true};
	case KVMI_READ_PHYSICAL: return {"KVMI_READ_PHYSICAL", true, false};
	case KVMI_WRITE_PHYSICAL: return {"KVMI_WRITE_PHYSICAL", true, false};
	case KVMI_INJECT_EXCEPTION: return {"KVMI_INJECT_EXCEPTION", true, true};
	case KVMI_GET_PAGE_ACCESS: return {"KVMI_GET_PAGE_ACCESS", false, false};
	case KVMI_SET_PAGE_ACCESS: return {"KVMI_SET_PAGE_ACCESS", true, false};
	case KVMI_GET_MAP_TOKEN: return {"KVMI_GET_MAP_TOKEN", false, false};
	case KVMI_GET_MTRR_TYPE: return {"KVMI_GET_MTRR_TYPE", true, true};
	case KVMI_CONTROL_SPP: return {"KVMI_CONTROL_SPP", true, false};
	case KVMI_GET_PAGE_WRITE_BITMAP: return {"KVMI_GET_PAGE_WRITE_BITMAP", false, false};
	case KVMI_SET_PAGE_WRITE_BITMAP: return {"KVMI_SET_PAGE_WRITE_BITMAP", true, false};
	case KVMI_CONTROL_CMD_RESPONSE: return {"KVMI_CONTROL_CMD_RESPONSE", true, false};
	case KVMI_SET_VE_INFO_PAGE: return {"KVMI_SET_VE_INFO_PAGE", false, true};
	case KVMI_GET_MAX_GFN: return {"KVMI_GET_MAX_GFN", true, false};
	case KVMI_GET_NEXT_AVAILABLE_GFN: return {"KVMI_GET_NEXT_AVAILABLE_GFN", false, false};
	case KVMI_SWITCH_EPT_VIEW: return {"KVMI_SWITCH_EPT_VIEW", false, true};
	case KVMI_DISABLE_VE: return {"KVMI_DISABLE_VE", false, true};
	case KVMI_GET_EPT_VIEW: return {"KVMI_GET_EPT_VIEW", false, true};
	case KVMI_VCPU_TRANSLATE_GVA: return {"KVMI_VCPU_TRANSLATE_GVA", true, true};
	case KVMI_CONTROL_EPT_VIEW: return {"KVMI_CONTROL_EPT_VIEW", false, true};
	case KVMI_VCPU_GET_XCR: return {"KVMI_VCPU_GET_XCR", true, true};
	case KVMI_VCPU_SET_XSAVE: return {"KVMI_VCPU_SET_XSAVE", true, true};
	case KVMI_QUERY_PHYSICAL: return {"KVMI_QUERY_PHYSICAL", true, false};
	case KVMI_VCPU_ALLOC_GFN: return {"KVMI_VCPU_ALLOC_GFN", false, false};
	case KVMI_VCPU_FREE_GFN: return {"KVMI_VCPU_FREE_GFN", false, false};
	case KVMI_CREATE_EPT_VIEW: return {"KVMI_CREATE_EPT_VIEW", false, false};
	case KVMI_DESTROY_EPT_VIEW: return {"KVMI_DESTROY_EPT_VIEW", false, false};
	case KVMI_VCPU_CHANGE_GFN: return {"KVMI_VCPU_CHANGE_GFN", false, true};
	case KVMI_VCPU_CONTROL_SINGLESTEP: return {"KVMI_VCPU_CONTROL_SINGLESTEP", true, true};
	default: return unknown_command;
	}
}

const char *event_name_of(std::uint16_t id)
{
	switch (id) {
	case KVMI_EVENT_UNHOOK: return "KVMI_EVENT_UNHOOK";
	case KVMI_EVENT_CR: return "KVMI_EVENT_CR";
	case KVMI_EVENT_MSR: return "KVMI_EVENT_MSR";
	case KVMI_EVENT_XSETBV: return "KVMI_EVENT_XSETBV";
	case KVMI_EVENT_BREAKPOINT: return "KVMI_EVENT_BREAKPOINT";
	case KVMI_EVENT_HYPERCALL: return "KVMI_EVENT_HYPERCALL";
	case KVMI_EVENT_PF: return "KVMI_EVENT_PF";
	case KVMI_EVENT_TRAP: return "KVMI_EVENT_TRAP";
	case KVMI_EVENT_DESCRIPTOR: return "KVMI_EVENT_DESCRIPTOR";
	case KVMI_EVENT_CREATE_VCPU: return "KVMI_EVENT_CREATE_VCPU";
	case KVMI_EVENT_PAUSE_VCPU: return "KVMI_EVENT_PAUSE_VCPU";
	case KVMI_EVENT_SINGLESTEP: return "KVMI_EVENT_SINGLESTEP";
	case KVMI_EVENT_CPUID: return "KVMI_EVENT_CPUID";
	default: return nullptr;
	}
}

} // namespace

bool known_command(std::uint16_t id) { return command_info(id).name != nullptr; }

bool supported_command(std::uint16_t id)
{
	return command_info(id).supported;
}

bool vcpu_command(std::uint16_t id)
{
	return command_info(id).vcpu;
}

bool always_allowed_command(std::uint16_t id)
{
	return id == KVMI_GET_VERSION || id == KVMI_CHECK_COMMAND || id == KVMI_CHECK_EVENT ||
	       id == KVMI_CONTROL_CMD_RESPONSE;
}

std::string command_name(std::uint16_t id)
{
	if (const char *n = command_info(id).name)
		return n;
	return "KVMI_" + std::to_string(id);
}

bool known_event(std::uint16_t id) { return event_name_of(id) != nullptr; }

bool supported_event(std::uint16_t id, bool int3_exits)
{
	switch (id) {
	case KVMI_EVENT_UNHOOK:
	case KVMI_EVENT_MSR:
	case KVMI_EVENT_PF:
	case KVMI_EVENT_TRAP:
	case KVMI_EVENT_CREATE_VCPU:
	case KVMI_EVENT_PAUSE_VCPU:
	case KVMI_EVENT_SINGLESTEP:
		return true;
	case KVMI_EVENT_BREAKPOINT:
		return int3_exits;
	default:
		/* CR, XSETBV, HYPERCALL, DESCRIPTOR, CPUID: no exit reaches a VMM. */
		return false;
	}
}

bool vm_event(std::uint16_t id) { return id == KVMI_EVENT_UNHOOK || id == KVMI_EVENT_CREATE_VCPU; }

std::string event_name(std::uint16_t id)
{
	if (known_event(id))
		return event_name_of(id);
	return "KVMI_EVENT_" + std::to_string(id);
}

std::size_t event_reply_size(std::uint16_t event)
{
	switch (event) {
	case KVMI_EVENT_MSR:
		return sizeof(kvmi_event_msr_reply);
	case KVMI_EVENT_PF:
		return sizeof(kvmi_event_pf_reply);
	default:
		return 0;
	}
}

std::size_t event_data_size(std::uint16_t event)
{
	switch (event) {
	case KVMI_EVENT_MSR:
		return sizeof(kvmi_event_msr);
	case KVMI_EVENT_PF:
		return sizeof(kvmi_event_pf);
	case KVMI_EVENT_BREAKPOINT:
		return sizeof(kvmi_event_breakpoint);
	case KVMI_EVENT_TRAP:
		return sizeof(kvmi_event_trap);
	case KVMI_EVENT_SINGLESTEP:
		return sizeof(kvmi_event_singlestep);
	default:
		return 0;
	}
}

namespace {

/* header + count * entry == size, count read at count_offset (u16), no overflow. */
bool counted_ok(std::span<const std::byte> p, std::size_t header, std::size_t count_offset,
		std::size_t entry)
{
	if (p.size() < header)
		return false;
	std::size_t count = load<std::uint16_t>(p, count_offset);
	/* count <= 65535 and entry <= 16: the product cannot overflow. */
	return p.size() - header == count * entry;
}

} // namespace

bool payload_size_ok(std::uint16_t id, std::span<const std::byte> p)
{
	const std::size_t n = p.size();
	switch (id) {
	case KVMI_GET_VERSION:
	case KVMI_GET_GUEST_INFO:
	case KVMI_GET_MAX_GFN:
	case KVMI_GET_VCPU_INFO:
	case KVMI_GET_XSAVE:
		return n == 0;
	case KVMI_CHECK_COMMAND:
		return n == sizeof(kvmi_check_command);
	case KVMI_CHECK_EVENT:
		return n == sizeof(kvmi_check_event);
	case KVMI_CONTROL_VM_EVENTS:
		return n == sizeof(kvmi_control_vm_events);
	case KVMI_PAUSE_VCPU:
		return n == sizeof(kvmi_pause_vcpu);
	case KVMI_CONTROL_EVENTS:
		return n == sizeof(kvmi_control_events);
	case KVMI_CONTROL_MSR:
		return n == sizeof(kvmi_control_msr);
	case KVMI_GET_REGISTERS:
		return counted_ok(p, sizeof(kvmi_get_registers), offsetof(kvmi_get_registers, nmsrs),
				  sizeof(std::uint32_t));
	case KVMI_SET_REGISTERS:
		return n == sizeof(kvm_regs);
	case KVMI_GET_CPUID:
		return n == sizeof(kvmi_get_cpuid);
	case KVMI_READ_PHYSICAL:
		return n == sizeof(kvmi_read_physical);
	case KVMI_WRITE_PHYSICAL: {
		if (n < sizeof(kvmi_write_physical))
			return false;
		auto size = load<std::uint64_t>(p, offsetof(kvmi_write_physical, size));
		return size == n - sizeof(kvmi_write_physical);
	}
	case KVMI_INJECT_EXCEPTION:
		return n == sizeof(kvmi_inject_exception);
	case KVMI_SET_PAGE_ACCESS:
		return counted_ok(p, sizeof(kvmi_set_page_access),
				  offsetof(kvmi_set_page_access, count), sizeof(kvmi_page_access_entry));
	case KVMI_GET_MTRR_TYPE:
		return n == sizeof(kvmi_get_mtrr_type);
	case KVMI_CONTROL_SPP:
		return n == sizeof(kvmi_control_spp);
	case KVMI_SET_PAGE_WRITE_BITMAP:
		return counted_ok(p, sizeof(kvmi_set_page_write_bitmap),
				  offsetof(kvmi_set_page_write_bitmap, count),
				  sizeof(kvmi_page_write_bitmap_entry));
	case KVMI_CONTROL_CMD_RESPONSE:
		return n == sizeof(kvmi_control_cmd_response);
	case KVMI_VCPU_TRANSLATE_GVA:
		return n == sizeof(kvmi_vcpu_translate_gva);
	case KVMI_VCPU_GET_XCR:
		return n == sizeof(kvmi_vcpu_get_xcr);
	case KVMI_VCPU_SET_XSAVE:
		/* The legacy area and the XSAVE header at least, whole u32s. */
		return n >= 576 && n % 4 == 0;
	case KVMI_QUERY_PHYSICAL:
		return n == sizeof(kvmi_query_physical);
	case KVMI_VCPU_CONTROL_SINGLESTEP:
		return n == sizeof(kvmi_vcpu_control_singlestep);
	default:
		return false;
	}
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

bool equal_ct(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b)
{
	if (a.size() != b.size())
		return false;
	volatile std::uint8_t diff = 0;
	for (std::size_t i = 0; i < a.size(); i++)
		diff = diff | (a[i] ^ b[i]);
	return diff == 0;
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
