// SPDX-License-Identifier: MIT
/*
 * The KVMI server's pure parts (libvirtkit/src/kvmi/vmm/wire.hpp) and the
 * protocol module they use (kvmi/protocol/): the kvmi-v7 wire layouts,
 * which ids are known and served, request size checks, event reply sizes,
 * address syntax, CPU mode, the constant-time cookie comparison against
 * SHA-1 of the secret. The message table itself against the ABI header:
 * kvmi_messages_test.cpp.
 */
#include <catch2/catch.hpp>

#include <cstring>
#include <string>
#include <vector>

#include "kvmi/protocol/handshake.hpp"
#include "kvmi/protocol/messages.hpp"
#include "kvmi/vmm/wire.hpp"

using namespace virtkit::detail::kvmi;

/* The kvmi-v7 layouts (libkvmi master, x86_64): sizes and the offsets tools read. */
static_assert(offsetof(kvmi_qemu2introspector, uuid) == 4);
static_assert(offsetof(kvmi_qemu2introspector, start_time) == 24);
static_assert(offsetof(kvmi_qemu2introspector, max_gpa) == 96);
static_assert(offsetof(kvmi_introspector2qemu, cookie_hash) == 4);
static_assert(offsetof(kvmi_get_version_reply, features) == 8);
static_assert(offsetof(kvmi_get_registers_reply, regs) == 8);
static_assert(offsetof(kvmi_get_registers_reply, sregs) == 152);
static_assert(offsetof(kvmi_get_registers_reply, msrs) == 464);
static_assert(offsetof(kvmi_event, vcpu) == 2 && offsetof(kvmi_event, event) == 4);
static_assert(offsetof(kvmi_event_arch, sregs) == 152);
static_assert(offsetof(kvmi_event_msr, old_value) == 8 && offsetof(kvmi_event_msr, new_value) == 16);
static_assert(offsetof(kvmi_event_pf, access) == 16 && offsetof(kvmi_event_pf, view) == 18);
static_assert(offsetof(kvmi_event_pf_reply, ctx_data) == 16);
static_assert(offsetof(kvmi_event_trap, error_code) == 4 && offsetof(kvmi_event_trap, cr2) == 8);
static_assert(offsetof(kvmi_inject_exception, error_code) == 4);
static_assert(offsetof(kvmi_inject_exception, address) == 8);
static_assert(offsetof(kvmi_set_page_access, entries) == 8);
static_assert(offsetof(kvmi_page_access_entry, access) == 8);
static_assert(offsetof(kvmi_page_write_bitmap_entry, bitmap) == 8);
static_assert(sizeof(kvmi_get_cpuid) == 8 && sizeof(kvmi_get_cpuid_reply) == 16);
static_assert(sizeof(kvmi_vcpu_get_xcr) == 8 && sizeof(kvmi_vcpu_get_xcr_reply) == 8);
static_assert(sizeof(kvmi_get_mtrr_type) == 8 && sizeof(kvmi_get_mtrr_type_reply) == 8);
static_assert(sizeof(kvmi_control_spp) == 8 && sizeof(kvmi_control_msr) == 8);
static_assert(sizeof(kvmi_control_events) == 8 && sizeof(kvmi_control_vm_events) == 8);
static_assert(sizeof(kvmi_vcpu_control_singlestep) == 8);
static_assert(sizeof(kvmi_get_vcpu_info_reply) == 8 && sizeof(kvmi_get_max_gfn_reply) == 8);
static_assert(KVMI_EVENT_REPLY == 0 && KVMI_EVENT == 1 && KVMI_VCPU_CONTROL_SINGLESTEP == 63);
static_assert(KVMI_EVENT_PAUSE_VCPU == 10 && KVMI_EVENT_CPUID == 13);
static_assert(KVMI_ENOSYS == 1000 && KVMI_EOPNOTSUPP == 95);

namespace {

std::vector<std::byte> bytes(std::size_t n) { return std::vector<std::byte>(n); }

template <class T> void put(std::vector<std::byte> &b, std::size_t off, T v)
{
	std::memcpy(b.data() + off, &v, sizeof(v));
}

} // namespace

TEST_CASE("every kvmi-v7 message id is known, events and replies are not commands", "[kvmi]")
{
	CHECK_FALSE(known_command(KVMI_EVENT_REPLY));
	CHECK_FALSE(known_command(KVMI_EVENT));
	CHECK(known_command(KVMI_GET_VERSION));
	CHECK(known_command(KVMI_VCPU_CHANGE_GFN));
	CHECK_FALSE(known_command(30));
	CHECK_FALSE(known_command(40));
	CHECK_FALSE(known_command(64));
	CHECK_FALSE(known_command(0xffff));
	REQUIRE(find_message(KVMI_GET_REGISTERS));
	CHECK(std::string(find_message(KVMI_GET_REGISTERS)->name) == "KVMI_GET_REGISTERS");
	CHECK(find_message(KVMI_EVENT)); /* a message, not a command */
	CHECK_FALSE(find_message(30));
	CHECK_FALSE(find_message(777));
}

TEST_CASE("the user backend serves the issue's commands and no EPT/VE/CR ones", "[kvmi]")
{
	for (int id : {KVMI_GET_VERSION, KVMI_CHECK_COMMAND, KVMI_CHECK_EVENT, KVMI_GET_GUEST_INFO,
		       KVMI_GET_VCPU_INFO, KVMI_PAUSE_VCPU, KVMI_CONTROL_VM_EVENTS,
		       KVMI_CONTROL_EVENTS, KVMI_CONTROL_MSR, KVMI_GET_REGISTERS,
		       KVMI_SET_REGISTERS, KVMI_GET_CPUID, KVMI_GET_XSAVE, KVMI_VCPU_SET_XSAVE,
		       KVMI_VCPU_GET_XCR, KVMI_READ_PHYSICAL, KVMI_WRITE_PHYSICAL,
		       KVMI_INJECT_EXCEPTION, KVMI_SET_PAGE_ACCESS, KVMI_CONTROL_SPP,
		       KVMI_SET_PAGE_WRITE_BITMAP, KVMI_GET_MTRR_TYPE, KVMI_GET_MAX_GFN,
		       KVMI_VCPU_TRANSLATE_GVA, KVMI_QUERY_PHYSICAL, KVMI_VCPU_CONTROL_SINGLESTEP,
		       KVMI_CONTROL_CMD_RESPONSE})
		CHECK(supported_command(static_cast<std::uint16_t>(id)));
	for (int id : {KVMI_CONTROL_CR, KVMI_CONTROL_VE, KVMI_GET_PAGE_ACCESS, KVMI_GET_MAP_TOKEN,
		       KVMI_GET_PAGE_WRITE_BITMAP, KVMI_SET_VE_INFO_PAGE,
		       KVMI_GET_NEXT_AVAILABLE_GFN, KVMI_SWITCH_EPT_VIEW, KVMI_DISABLE_VE,
		       KVMI_GET_EPT_VIEW, KVMI_CONTROL_EPT_VIEW, KVMI_VCPU_ALLOC_GFN,
		       KVMI_VCPU_FREE_GFN, KVMI_CREATE_EPT_VIEW, KVMI_DESTROY_EPT_VIEW,
		       KVMI_VCPU_CHANGE_GFN}) {
		CHECK(known_command(static_cast<std::uint16_t>(id)));
		CHECK_FALSE(supported_command(static_cast<std::uint16_t>(id)));
	}
	CHECK(vcpu_command(KVMI_GET_REGISTERS));
	CHECK(vcpu_command(KVMI_PAUSE_VCPU));
	CHECK_FALSE(vcpu_command(KVMI_READ_PHYSICAL));
	CHECK_FALSE(vcpu_command(KVMI_SET_PAGE_ACCESS));
	CHECK(always_allowed_command(KVMI_GET_VERSION));
	CHECK_FALSE(always_allowed_command(KVMI_READ_PHYSICAL));
}

TEST_CASE("events: supported set, VM events, reply and data sizes", "[kvmi]")
{
	CHECK(supported_event(KVMI_EVENT_MSR, false));
	CHECK(supported_event(KVMI_EVENT_PF, false));
	CHECK(supported_event(KVMI_EVENT_UNHOOK, false));
	CHECK_FALSE(supported_event(KVMI_EVENT_BREAKPOINT, false));
	CHECK(supported_event(KVMI_EVENT_BREAKPOINT, true));
	for (int id : {KVMI_EVENT_CR, KVMI_EVENT_XSETBV, KVMI_EVENT_HYPERCALL,
		       KVMI_EVENT_DESCRIPTOR, KVMI_EVENT_CPUID})
		CHECK_FALSE(supported_event(static_cast<std::uint16_t>(id), true));
	CHECK_FALSE(known_event(12));
	CHECK_FALSE(known_event(14));
	CHECK(vm_event(KVMI_EVENT_UNHOOK));
	CHECK(vm_event(KVMI_EVENT_CREATE_VCPU));
	CHECK_FALSE(vm_event(KVMI_EVENT_PAUSE_VCPU));
	CHECK(event_reply_size(KVMI_EVENT_MSR) == 8);
	CHECK(event_reply_size(KVMI_EVENT_PF) == 272);
	CHECK(event_reply_size(KVMI_EVENT_PAUSE_VCPU) == 0);
	CHECK(event_reply_size(KVMI_EVENT_BREAKPOINT) == 0);
	CHECK(find_event(KVMI_EVENT_TRAP)->data_size == 16);
	CHECK(find_event(KVMI_EVENT_CREATE_VCPU)->data_size == 0);
	CHECK(std::string(find_event(KVMI_EVENT_PF)->name) == "KVMI_EVENT_PF");
	CHECK_FALSE(find_event(12));
}

TEST_CASE("fixed-size requests must match their struct exactly", "[kvmi]")
{
	CHECK(payload_size_ok(KVMI_GET_VERSION, bytes(0)));
	CHECK_FALSE(payload_size_ok(KVMI_GET_VERSION, bytes(1)));
	CHECK(payload_size_ok(KVMI_CHECK_COMMAND, bytes(8)));
	CHECK_FALSE(payload_size_ok(KVMI_CHECK_COMMAND, bytes(7)));
	CHECK_FALSE(payload_size_ok(KVMI_CHECK_COMMAND, bytes(16)));
	CHECK(payload_size_ok(KVMI_SET_REGISTERS, bytes(sizeof(kvm_regs))));
	CHECK_FALSE(payload_size_ok(KVMI_SET_REGISTERS, bytes(sizeof(kvm_regs) - 8)));
	CHECK(payload_size_ok(KVMI_READ_PHYSICAL, bytes(16)));
	CHECK(payload_size_ok(KVMI_GET_XSAVE, bytes(0)));
	CHECK_FALSE(payload_size_ok(KVMI_GET_MAP_TOKEN, bytes(0)));
	/* The event messages are no requests. */
	CHECK_FALSE(payload_size_ok(KVMI_EVENT_REPLY, bytes(16)));
	CHECK_FALSE(payload_size_ok(777, bytes(0)));
}

TEST_CASE("variable-size requests are checked against their count, without overflow", "[kvmi]")
{
	auto regs = bytes(8 + 3 * 4);
	put<std::uint16_t>(regs, 0, 3);
	CHECK(payload_size_ok(KVMI_GET_REGISTERS, regs));
	put<std::uint16_t>(regs, 0, 4);
	CHECK_FALSE(payload_size_ok(KVMI_GET_REGISTERS, regs));
	CHECK_FALSE(payload_size_ok(KVMI_GET_REGISTERS, bytes(4)));

	auto pa = bytes(8 + 2 * 16);
	put<std::uint16_t>(pa, 2, 2);
	CHECK(payload_size_ok(KVMI_SET_PAGE_ACCESS, pa));
	put<std::uint16_t>(pa, 2, 0xffff);
	CHECK_FALSE(payload_size_ok(KVMI_SET_PAGE_ACCESS, pa));
	auto wb = bytes(8 + 16);
	put<std::uint16_t>(wb, 2, 1);
	CHECK(payload_size_ok(KVMI_SET_PAGE_WRITE_BITMAP, wb));

	auto wp = bytes(16 + 100);
	put<std::uint64_t>(wp, 8, 100);
	CHECK(payload_size_ok(KVMI_WRITE_PHYSICAL, wp));
	put<std::uint64_t>(wp, 8, 99);
	CHECK_FALSE(payload_size_ok(KVMI_WRITE_PHYSICAL, wp));
	put<std::uint64_t>(wp, 8, ~0ull - 15); /* 16 + size wraps to 0 */
	CHECK_FALSE(payload_size_ok(KVMI_WRITE_PHYSICAL, wp));
	CHECK_FALSE(payload_size_ok(KVMI_WRITE_PHYSICAL, bytes(8)));

	CHECK(payload_size_ok(KVMI_VCPU_SET_XSAVE, bytes(4096)));
	CHECK(payload_size_ok(KVMI_VCPU_SET_XSAVE, bytes(576)));
	CHECK_FALSE(payload_size_ok(KVMI_VCPU_SET_XSAVE, bytes(512)));
	CHECK_FALSE(payload_size_ok(KVMI_VCPU_SET_XSAVE, bytes(4097)));
	CHECK(max_get_registers_msrs == (8184 - 8 - 472) / 16);
}

TEST_CASE("padding checks see every byte", "[kvmi]")
{
	kvmi_vcpu_hdr h{};
	CHECK(VK_KVMI_ZERO(h.padding1));
	h.padding2 = 0x100;
	CHECK_FALSE(VK_KVMI_ZERO(h.padding2));
	kvmi_get_mtrr_type_reply r{};
	r.padding[6] = 1;
	CHECK_FALSE(VK_KVMI_ZERO(r.padding));
}

TEST_CASE("introspection addresses", "[kvmi]")
{
	std::string why;
	auto u = parse_address("unix:/run/tool.sock", &why);
	REQUIRE(u);
	CHECK(u->kind == Address::Kind::unix_path);
	CHECK(u->path == "/run/tool.sock");
	auto a = parse_address("unix:@abstract", &why);
	REQUIRE(a);
	CHECK(a->path == "@abstract");
	auto v = parse_address("vsock:2:1234", &why);
	REQUIRE(v);
	CHECK(v->kind == Address::Kind::vsock);
	CHECK(v->cid == 2);
	CHECK(v->port == 1234);
	CHECK(parse_address("vsock:4294967295:1", &why));

	CHECK_FALSE(parse_address("", &why));
	CHECK_FALSE(parse_address("/run/tool.sock", &why));
	CHECK(why.find("unix:") != std::string::npos);
	CHECK_FALSE(parse_address("unix:", &why));
	CHECK_FALSE(parse_address("unix:" + std::string(108, 'x'), &why));
	CHECK(parse_address("unix:" + std::string(107, 'x'), &why));
	CHECK_FALSE(parse_address(std::string("unix:/a\0b", 9), &why));
	CHECK_FALSE(parse_address("vsock:2", &why));
	CHECK_FALSE(parse_address("vsock:2:", &why));
	CHECK_FALSE(parse_address("vsock:x:1", &why));
	CHECK_FALSE(parse_address("vsock:-1:1", &why));
	CHECK_FALSE(parse_address("vsock:4294967296:1", &why));
	CHECK_FALSE(parse_address("vsock:2:3:4", &why));
}

TEST_CASE("event CPU mode from CR0.PE, EFER.LMA, CS.L and CS.D", "[kvmi]")
{
	kvm_sregs s{};
	CHECK(cpu_mode(s) == 2); /* real mode */
	s.cr0 = 1;
	CHECK(cpu_mode(s) == 2); /* 16-bit protected */
	s.cs.db = 1;
	CHECK(cpu_mode(s) == 4);
	s.efer = 1u << 10;
	CHECK(cpu_mode(s) == 4); /* compatibility mode */
	s.cs.l = 1;
	s.cs.db = 0;
	CHECK(cpu_mode(s) == 8);
	s.efer = 0; /* L without LMA means nothing */
	CHECK(cpu_mode(s) == 2);
}

TEST_CASE("exception vectors INJECT_EXCEPTION accepts", "[kvmi]")
{
	for (int nr : {0, 1, 3, 6, 8, 13, 14, 17, 18, 19, 20, 21, 28, 29, 30})
		CHECK(injectable_vector(static_cast<std::uint8_t>(nr)));
	for (int nr : {2, 9, 15, 22, 27, 31, 32, 255})
		CHECK_FALSE(injectable_vector(static_cast<std::uint8_t>(nr)));
	CHECK(vector_has_error_code(14));
	CHECK(vector_has_error_code(13));
	CHECK_FALSE(vector_has_error_code(3));
	CHECK_FALSE(vector_has_error_code(6));
}

TEST_CASE("the cookie hash is SHA-1 of the secret, compared in constant time", "[kvmi]")
{
	const std::string secret = "abc";
	auto h = cookie_hash(secret);
	const std::uint8_t want[20] = {0xa9, 0x99, 0x3e, 0x36, 0x47, 0x06, 0x81, 0x6a, 0xba, 0x3e,
				       0x25, 0x71, 0x78, 0x50, 0xc2, 0x6c, 0x9c, 0xd0, 0xd8, 0x9d};
	CHECK(equal_ct(h, want));
	auto bad = h;
	bad[19] ^= 1;
	CHECK_FALSE(equal_ct(bad, want));
	bad = h;
	bad[0] ^= 0x80;
	CHECK_FALSE(equal_ct(bad, want));
	CHECK_FALSE(equal_ct(std::span(h).first(19), want));
	CHECK(equal_ct({}, {}));
}
