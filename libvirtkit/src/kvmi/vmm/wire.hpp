// SPDX-License-Identifier: MIT
/*
 * Internal: the pure parts of the KVMI server - which ids this backend
 * knows and serves (from the protocol's message table), padding checks, the
 * introspection address syntax, the CPU mode of an event, injectable
 * vectors. No KVM, no sockets: everything here is unit-tested
 * (selftests/unit/kvmi_*).
 */
#pragma once

#include <virtkit/kvm.h>

#include <linux/virtkit_kvmi.h>

#include "kvmi/protocol/handshake.hpp"
#include "kvmi/protocol/layout.hpp"
#include "kvmi/protocol/messages.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace virtkit::detail::kvmi {

/*
 * The VMM's view of the message table (kvmi/protocol/messages.hpp): the
 * payload sizes are payload_size_ok() there.
 */

/* Every command the protocol defines (not KVMI_EVENT, KVMI_EVENT_REPLY). */
bool known_command(std::uint16_t id);
/* Commands this (user) backend serves. */
bool supported_command(std::uint16_t id);
/* Commands addressed to one vCPU (their payload starts with kvmi_vcpu_hdr). */
bool vcpu_command(std::uint16_t id);
/* Commands the VMM's policy cannot forbid (the tool needs them to start). */
bool always_allowed_command(std::uint16_t id);

bool known_event(std::uint16_t id);
/* Events this backend can raise; BREAKPOINT only where INT3 exits (a probe). */
bool supported_event(std::uint16_t id, bool int3_exits);
/* UNHOOK and CREATE_VCPU: enabled with CONTROL_VM_EVENTS, not per vCPU. */
bool vm_event(std::uint16_t id);
/*
 * Bytes of the event-specific reply after kvmi_vcpu_hdr and kvmi_event_reply
 * (libkvmi sends exactly vcpu_hdr + event_reply + this).
 */
std::size_t event_reply_size(std::uint16_t event);

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

/* Valid exception vectors for INJECT_EXCEPTION, and which push an error code. */
bool injectable_vector(std::uint8_t nr);
bool vector_has_error_code(std::uint8_t nr);

} // namespace virtkit::detail::kvmi
