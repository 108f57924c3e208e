// SPDX-License-Identifier: MIT
/*
 * Internal: every KVMI message id and event id of <linux/virtkit_kvmi.h>,
 * once, with what both ends need to know about it - its name, whether it
 * is a command, whether it addresses a vCPU, how big its payload is,
 * whether virtkit's VMM serves it; for events, their data and reply sizes.
 *
 * The VMM side (kvmi/vmm/wire.*) derives which commands it knows, serves
 * and dispatches per vCPU, and checks request sizes, from this table; the
 * tool side (kvmi/tool/names.*) takes its names from it.
 * selftests/unit/kvmi_messages_test.cpp checks the table against the ABI
 * header: one entry per id, the names of the header, its struct sizes.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace virtkit::detail::kvmi {

/*
 * How big a message's payload is: what follows kvmi_vcpu_hdr for a vCPU
 * command, the whole payload otherwise.
 */
struct PayloadSize {
	enum class Kind : std::uint8_t {
		/* No layout in kvmi-v7's headers: no payload is right. */
		unknown,
		/* Exactly `size` bytes. */
		fixed,
		/* A `size`-byte head holding a count (`count_bytes` wide, at
		 * `count_offset`), then count entries of `entry` bytes. */
		counted,
		/* `size` bytes or more, whole `entry`-byte units. */
		at_least,
		/* A `size`-byte head, then the event's own data or reply
		 * (EventInfo): KVMI_EVENT and KVMI_EVENT_REPLY. */
		per_event,
	};

	Kind kind = Kind::unknown;
	std::uint16_t size = 0;
	std::uint16_t entry = 0;
	std::uint8_t count_offset = 0;
	std::uint8_t count_bytes = 0;

	/* Whether payload has this size (counted: no overflow; per_event:
	 * the head only, the caller knows the event). */
	bool fits(std::span<const std::byte> payload) const noexcept;
};

struct MessageInfo {
	std::uint16_t id;
	const char *name;	/* "KVMI_READ_PHYSICAL", the header's enumerator */
	/* A request the VMM replies to; not KVMI_EVENT, KVMI_EVENT_REPLY. */
	bool command;
	/* The payload starts with kvmi_vcpu_hdr (KVMI_EVENT_REPLY too). */
	bool vcpu;
	/* virtkit's VMM implements it: serves the command, sends the events,
	 * takes their replies. */
	bool served;
	PayloadSize payload;
};

struct EventInfo {
	/* Where BREAKPOINT is served only when INT3 exits reach the VMM. */
	enum class Served : std::uint8_t { no, yes, if_int3_exits };

	std::uint16_t id;
	const char *name;	/* "KVMI_EVENT_PF" */
	/* Enabled with CONTROL_VM_EVENTS (UNHOOK, CREATE_VCPU), not per vCPU. */
	bool per_vm;
	Served served;
	/* Bytes of the event-specific data after kvmi_event. */
	std::uint16_t data_size;
	/* Bytes of the event-specific reply after kvmi_vcpu_hdr and
	 * kvmi_event_reply (libkvmi sends exactly this many). */
	std::uint16_t reply_size;
};

/* The tables, in id order. */
std::span<const MessageInfo> messages() noexcept;
std::span<const EventInfo> events() noexcept;

/* The entry of an id; nullptr for an id the protocol does not define. */
const MessageInfo *find_message(std::uint16_t id) noexcept;
const EventInfo *find_event(std::uint16_t id) noexcept;

/* Whether a request's payload (after kvmi_vcpu_hdr for vCPU commands) has
 * the size its command's layout asks; false for ids without a layout. */
bool payload_size_ok(std::uint16_t id, std::span<const std::byte> payload) noexcept;

} // namespace virtkit::detail::kvmi
