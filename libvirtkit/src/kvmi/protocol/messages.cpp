// SPDX-License-Identifier: MIT
#include "kvmi/protocol/messages.hpp"

#include <array>

#include "kvmi/protocol/layout.hpp"

namespace virtkit::detail::kvmi {

namespace {

using Kind = PayloadSize::Kind;
using Served = EventInfo::Served;

constexpr PayloadSize unknown{};

constexpr PayloadSize fixed(std::size_t size)
{
	return {Kind::fixed, std::uint16_t(size)};
}

template <class T> constexpr PayloadSize fixed()
{
	return fixed(sizeof(T));
}

/* Head T whose count field (of type C, at offset) counts entries of entry bytes. */
template <class T, class C>
constexpr PayloadSize counted(std::size_t count_offset, std::size_t entry)
{
	return {Kind::counted, std::uint16_t(sizeof(T)), std::uint16_t(entry),
		std::uint8_t(count_offset), std::uint8_t(sizeof(C))};
}

/*
 * The commands virtkit's VMM does not serve need what stock KVM does not
 * give a VMM: CR interception (CONTROL_CR), EPT views, #VE and EPT-level
 * page tricks (ALLOC/FREE/CHANGE_GFN, GET_NEXT_AVAILABLE_GFN), remote
 * mapping tokens (GET_MAP_TOKEN). GET_PAGE_ACCESS, GET_PAGE_WRITE_BITMAP
 * and those without a struct here have no layout in kvmi-v7's headers.
 *
 * The event messages (with the head before the event's own part), VM and
 * vCPU commands (served or not, and the payload after kvmi_vcpu_hdr):
 */
#define EVENT_MESSAGE(id, vcpu, head)                                                              \
	MessageInfo{id, #id, false, vcpu, true, {Kind::per_event, sizeof(head)}}
#define VM(id, served, payload) MessageInfo{id, #id, true, false, served, payload}
#define VCPU(id, served, payload) MessageInfo{id, #id, true, true, served, payload}

constexpr MessageInfo message_table[] = {
	EVENT_MESSAGE(KVMI_EVENT_REPLY, true, kvmi_event_reply),
	EVENT_MESSAGE(KVMI_EVENT, false, kvmi_event),
	VM(KVMI_GET_VERSION, true, fixed(0)),
	VM(KVMI_CHECK_COMMAND, true, fixed<kvmi_check_command>()),
	VM(KVMI_CHECK_EVENT, true, fixed<kvmi_check_event>()),
	VM(KVMI_GET_GUEST_INFO, true, fixed(0)),
	VCPU(KVMI_GET_VCPU_INFO, true, fixed(0)),
	VCPU(KVMI_PAUSE_VCPU, true, fixed<kvmi_pause_vcpu>()),
	VM(KVMI_CONTROL_VM_EVENTS, true, fixed<kvmi_control_vm_events>()),
	VCPU(KVMI_CONTROL_EVENTS, true, fixed<kvmi_control_events>()),
	VCPU(KVMI_CONTROL_CR, false, fixed<kvmi_control_cr>()),
	VCPU(KVMI_CONTROL_MSR, true, fixed<kvmi_control_msr>()),
	VM(KVMI_CONTROL_VE, false, unknown),
	VCPU(KVMI_GET_REGISTERS, true,
	     (counted<kvmi_get_registers, decltype(kvmi_get_registers::nmsrs)>(
		     offsetof(kvmi_get_registers, nmsrs), sizeof(std::uint32_t)))),
	VCPU(KVMI_SET_REGISTERS, true, fixed<kvm_regs>()),
	VCPU(KVMI_GET_CPUID, true, fixed<kvmi_get_cpuid>()),
	VCPU(KVMI_GET_XSAVE, true, fixed(0)),
	VM(KVMI_READ_PHYSICAL, true, fixed<kvmi_read_physical>()),
	/* The size field counts the data bytes that follow. */
	VM(KVMI_WRITE_PHYSICAL, true,
	   (counted<kvmi_write_physical, decltype(kvmi_write_physical::size)>(
		   offsetof(kvmi_write_physical, size), 1))),
	VCPU(KVMI_INJECT_EXCEPTION, true, fixed<kvmi_inject_exception>()),
	VM(KVMI_GET_PAGE_ACCESS, false, unknown),
	VM(KVMI_SET_PAGE_ACCESS, true,
	   (counted<kvmi_set_page_access, decltype(kvmi_set_page_access::count)>(
		   offsetof(kvmi_set_page_access, count), sizeof(kvmi_page_access_entry)))),
	VM(KVMI_GET_MAP_TOKEN, false, unknown),
	VCPU(KVMI_GET_MTRR_TYPE, true, fixed<kvmi_get_mtrr_type>()),
	VM(KVMI_CONTROL_SPP, true, fixed<kvmi_control_spp>()),
	VM(KVMI_GET_PAGE_WRITE_BITMAP, false, unknown),
	VM(KVMI_SET_PAGE_WRITE_BITMAP, true,
	   (counted<kvmi_set_page_write_bitmap, decltype(kvmi_set_page_write_bitmap::count)>(
		   offsetof(kvmi_set_page_write_bitmap, count),
		   sizeof(kvmi_page_write_bitmap_entry)))),
	VM(KVMI_CONTROL_CMD_RESPONSE, true, fixed<kvmi_control_cmd_response>()),
	VCPU(KVMI_SET_VE_INFO_PAGE, false, unknown),
	VM(KVMI_GET_MAX_GFN, true, fixed(0)),
	VM(KVMI_GET_NEXT_AVAILABLE_GFN, false, unknown),
	VCPU(KVMI_SWITCH_EPT_VIEW, false, unknown),
	VCPU(KVMI_DISABLE_VE, false, unknown),
	VCPU(KVMI_GET_EPT_VIEW, false, unknown),
	VCPU(KVMI_VCPU_TRANSLATE_GVA, true, fixed<kvmi_vcpu_translate_gva>()),
	VCPU(KVMI_CONTROL_EPT_VIEW, false, unknown),
	VCPU(KVMI_VCPU_GET_XCR, true, fixed<kvmi_vcpu_get_xcr>()),
	/* The legacy area and the XSAVE header at least, whole u32s. */
	VCPU(KVMI_VCPU_SET_XSAVE, true, (PayloadSize{Kind::at_least, 576, 4})),
	VM(KVMI_QUERY_PHYSICAL, true, fixed<kvmi_query_physical>()),
	VM(KVMI_VCPU_ALLOC_GFN, false, unknown),
	VM(KVMI_VCPU_FREE_GFN, false, unknown),
	VM(KVMI_CREATE_EPT_VIEW, false, unknown),
	VM(KVMI_DESTROY_EPT_VIEW, false, unknown),
	VCPU(KVMI_VCPU_CHANGE_GFN, false, unknown),
	VCPU(KVMI_VCPU_CONTROL_SINGLESTEP, true, fixed<kvmi_vcpu_control_singlestep>()),
};

#undef EVENT_MESSAGE
#undef VM
#undef VCPU

/*
 * Events no exit reaches a VMM with stock KVM: CR, XSETBV, HYPERCALL,
 * DESCRIPTOR, CPUID. Data and reply sizes are those of the structs the
 * header has (none: 0).
 */
#define EVENT(id, per_vm, served, data, reply) EventInfo{id, #id, per_vm, served, data, reply}

constexpr EventInfo event_table[] = {
	EVENT(KVMI_EVENT_UNHOOK, true, Served::yes, 0, 0),
	EVENT(KVMI_EVENT_CR, false, Served::no, 0, 0),
	EVENT(KVMI_EVENT_MSR, false, Served::yes, sizeof(kvmi_event_msr),
	      sizeof(kvmi_event_msr_reply)),
	EVENT(KVMI_EVENT_XSETBV, false, Served::no, 0, 0),
	EVENT(KVMI_EVENT_BREAKPOINT, false, Served::if_int3_exits, sizeof(kvmi_event_breakpoint), 0),
	EVENT(KVMI_EVENT_HYPERCALL, false, Served::no, 0, 0),
	EVENT(KVMI_EVENT_PF, false, Served::yes, sizeof(kvmi_event_pf), sizeof(kvmi_event_pf_reply)),
	EVENT(KVMI_EVENT_TRAP, false, Served::yes, sizeof(kvmi_event_trap), 0),
	EVENT(KVMI_EVENT_DESCRIPTOR, false, Served::no, 0, 0),
	EVENT(KVMI_EVENT_CREATE_VCPU, true, Served::yes, 0, 0),
	EVENT(KVMI_EVENT_PAUSE_VCPU, false, Served::yes, 0, 0),
	EVENT(KVMI_EVENT_SINGLESTEP, false, Served::yes, sizeof(kvmi_event_singlestep), 0),
	EVENT(KVMI_EVENT_CPUID, false, Served::no, 0, 0),
};

#undef EVENT

/* Ids in increasing order (so each has one entry) and below KVMI_NUM_*. */
template <class T, std::size_t N> constexpr bool ordered(const T (&table)[N], unsigned limit)
{
	for (std::size_t i = 0; i < N; i++)
		if (table[i].id >= limit || (i && table[i].id <= table[i - 1].id))
			return false;
	return true;
}
static_assert(ordered(message_table, KVMI_NUM_MESSAGES));
static_assert(ordered(event_table, KVMI_NUM_EVENTS));

/* Counted payloads: a u16 count, or WRITE_PHYSICAL's u64 byte count (entry
 * 1), within the head; so count * entry cannot overflow. */
constexpr bool counts_ok()
{
	for (auto &m : message_table) {
		const auto &p = m.payload;
		if (p.kind != Kind::counted)
			continue;
		if (p.count_offset + p.count_bytes > p.size)
			return false;
		if (!(p.count_bytes == 2 && p.entry <= 16) && !(p.count_bytes == 8 && p.entry == 1))
			return false;
	}
	return true;
}
static_assert(counts_ok());

/* id -> index in the table + 1 (0: no entry), built at compile time. */
template <class T, std::size_t N, std::size_t Limit>
constexpr std::array<std::uint8_t, Limit> index_of(const T (&table)[N])
{
	static_assert(N < 255);
	std::array<std::uint8_t, Limit> index{};
	for (std::size_t i = 0; i < N; i++)
		index[table[i].id] = std::uint8_t(i + 1);
	return index;
}

constexpr auto message_index = index_of<MessageInfo, std::size(message_table), KVMI_NUM_MESSAGES>(
	message_table);
constexpr auto event_index =
	index_of<EventInfo, std::size(event_table), KVMI_NUM_EVENTS>(event_table);

} // namespace

bool PayloadSize::fits(std::span<const std::byte> p) const noexcept
{
	switch (kind) {
	case Kind::unknown:
		return false;
	case Kind::fixed:
		return p.size() == size;
	case Kind::counted: {
		if (p.size() < size)
			return false;
		std::uint64_t count = 0;
		if (count_bytes == 2)
			count = load<std::uint16_t>(p, count_offset);
		else
			count = load<std::uint64_t>(p, count_offset);
		/* A u16 count times at most 16, or a byte count: no overflow. */
		return p.size() - size == count * entry;
	}
	case Kind::at_least:
		return p.size() >= size && p.size() % entry == 0;
	case Kind::per_event:
		return p.size() >= size;
	}
	return false;
}

std::span<const MessageInfo> messages() noexcept
{
	return message_table;
}

std::span<const EventInfo> events() noexcept
{
	return event_table;
}

const MessageInfo *find_message(std::uint16_t id) noexcept
{
	if (id >= message_index.size() || !message_index[id])
		return nullptr;
	return &message_table[message_index[id] - 1];
}

const EventInfo *find_event(std::uint16_t id) noexcept
{
	if (id >= event_index.size() || !event_index[id])
		return nullptr;
	return &event_table[event_index[id] - 1];
}

bool payload_size_ok(std::uint16_t id, std::span<const std::byte> payload) noexcept
{
	const MessageInfo *m = find_message(id);
	return m && m->command && m->payload.fits(payload);
}

} // namespace virtkit::detail::kvmi
