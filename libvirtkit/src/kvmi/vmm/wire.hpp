// SPDX-License-Identifier: MIT
/*
 * Internal: the pure parts of the KVMI server - which ids this backend knows and serves, how
 * big each request must be, padding checks, the event reply sizes, the
 * introspection address syntax and the CPU mode of an event. No KVM, no
 * sockets: everything here is unit-tested (selftests/unit/kvmi_*).
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include "kvmi/protocol/layout.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace virtkit::detail::kvmi {

/* Largest reply data (after kvmi_error_code) one message can carry. */
inline constexpr std::size_t max_reply_data = KVMI_MSG_SIZE - sizeof(kvmi_error_code);
/* The handshake answer may be bigger than we know (newer tools): up to this. */
inline constexpr std::uint32_t max_handshake_size = 64 * 1024;
/* GET_REGISTERS: the most MSRs whose reply fits one message. */
inline constexpr std::size_t max_get_registers_msrs =
	(max_reply_data - sizeof(kvmi_get_registers_reply)) / sizeof(kvm_msr_entry);
/* The largest read/write of READ_PHYSICAL / WRITE_PHYSICAL (one page). */
inline constexpr std::uint64_t page_size = 4096;

/* Every message id the protocol defines (known to this server). */
bool known_command(std::uint16_t id);
/* Commands this (user) backend serves. */
bool supported_command(std::uint16_t id);
/* Commands addressed to one vCPU (their payload starts with kvmi_vcpu_hdr). */
bool vcpu_command(std::uint16_t id);
/* Commands the VMM's policy cannot forbid (the tool needs them to start). */
bool always_allowed_command(std::uint16_t id);
/* "KVMI_GET_REGISTERS" for 13, "KVMI_<n>" for others. */
std::string command_name(std::uint16_t id);

bool known_event(std::uint16_t id);
/* Events this backend can raise; BREAKPOINT only where INT3 exits (a probe). */
bool supported_event(std::uint16_t id, bool int3_exits);
/* UNHOOK and CREATE_VCPU: enabled with CONTROL_VM_EVENTS, not per vCPU. */
bool vm_event(std::uint16_t id);
std::string event_name(std::uint16_t id);

/*
 * Bytes of the event-specific reply after kvmi_vcpu_hdr and kvmi_event_reply
 * (libkvmi sends exactly vcpu_hdr + event_reply + this).
 */
std::size_t event_reply_size(std::uint16_t event);
/* Bytes of the event-specific data after kvmi_event. */
std::size_t event_data_size(std::uint16_t event);

/*
 * Size check of a request's payload (after kvmi_vcpu_hdr for vCPU commands).
 * Fixed-size commands must match exactly; variable ones (GET_REGISTERS,
 * WRITE_PHYSICAL, SET_PAGE_ACCESS, SET_PAGE_WRITE_BITMAP, VCPU_SET_XSAVE)
 * are checked against their own count field without overflow.
 */
bool payload_size_ok(std::uint16_t id, std::span<const std::byte> payload);

#define VK_KVMI_ZERO(field) (::virtkit::detail::kvmi::zero(field))

/* A parsed IntrospectionOptions::address. */
struct Address {
	enum class Kind { unix_path, vsock } kind;
	std::string path;	/* unix: the path; a leading '@' is the abstract namespace */
	std::uint32_t cid = 0, port = 0;
};
/* "unix:/path", "unix:@abstract" or "vsock:CID:PORT"; nullopt + why otherwise. */
std::optional<Address> parse_address(std::string_view s, std::string *why);

/* The event's CPU mode: 2, 4 or 8 (bytes of a native address). */
std::uint8_t cpu_mode(const kvm_sregs &sregs);

/* Constant-time comparison of two equally long byte strings. */
bool equal_ct(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b);

/* Valid exception vectors for INJECT_EXCEPTION, and which push an error code. */
bool injectable_vector(std::uint8_t nr);
bool vector_has_error_code(std::uint8_t nr);

} // namespace virtkit::detail::kvmi
