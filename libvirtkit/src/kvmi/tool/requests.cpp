// SPDX-License-Identifier: MIT
#include "kvmi/tool/requests.hpp"

#include <cerrno>
#include <cstring>
#include <string>

#include "kvmi/tool/names.hpp"

namespace virtkit::introspect::detail {

Request Request::of_bytes(std::uint16_t id, std::vector<std::byte> head) noexcept
{
	Request r(id);
	r.heap_ = std::move(head);
	return r;
}

void Request::put(std::span<const std::byte> b) noexcept
{
	std::memcpy(inline_.data() + inline_size_, b.data(), b.size());
	inline_size_ += b.size();
}

namespace {

void check_size(std::uint16_t id, std::size_t n, std::size_t max, const char *what)
{
	if (n > max)
		throw Error(command_cstr(id), E2BIG,
			    std::to_string(n) + " " + what + ", at most " + std::to_string(max) +
				    " fit one message");
}

/* A page list: header h, then one Entry per item, filled by fill. */
template <class Entry, class Header, class Item, class Fill>
Request page_list(std::uint16_t id, Header h, std::span<const Item> items, Fill fill)
{
	check_size(id, items.size(), Session::max_page_entries, "pages");
	h.count = std::uint16_t(items.size());
	std::vector<std::byte> out = pack(h);
	out.reserve(sizeof(h) + items.size() * sizeof(Entry));
	for (auto &item : items) {
		Entry e{};
		fill(e, item);
		append(out, bytes_of(e));
	}
	return Request::of_bytes(id, std::move(out));
}

} // namespace

static_assert(sizeof(kvmi_set_page_access) + Session::max_page_entries *
							sizeof(kvmi_page_access_entry) <=
	      KVMI_MSG_SIZE);
static_assert(sizeof(kvmi_set_page_write_bitmap) + Session::max_page_entries *
							      sizeof(kvmi_page_write_bitmap_entry) <=
	      KVMI_MSG_SIZE);

namespace request {

/* --- VM commands --- */

Request get_version()
{
	return Request::of(KVMI_GET_VERSION);
}

Request check_command(std::uint16_t id)
{
	kvmi_check_command c{};
	c.id = id;
	return Request::of(KVMI_CHECK_COMMAND, c);
}

Request check_event(EventId id)
{
	kvmi_check_event c{};
	c.id = std::uint16_t(id);
	return Request::of(KVMI_CHECK_EVENT, c);
}

Request get_guest_info()
{
	return Request::of(KVMI_GET_GUEST_INFO);
}

Request control_vm_events(EventId id, bool enable)
{
	kvmi_control_vm_events c{};
	c.event_id = std::uint16_t(id);
	c.enable = enable;
	return Request::of(KVMI_CONTROL_VM_EVENTS, c);
}

Request read_physical(std::uint64_t gpa, std::size_t size)
{
	kvmi_read_physical c{};
	c.gpa = gpa;
	c.size = size;
	return Request::of(KVMI_READ_PHYSICAL, c);
}

Request write_physical(std::uint64_t gpa, std::span<const std::byte> data)
{
	kvmi_write_physical c{};
	c.gpa = gpa;
	c.size = data.size();
	return Request::of(KVMI_WRITE_PHYSICAL, c).with_tail(data);
}

Request set_page_access(std::span<const PageAccess> pages, std::uint16_t view)
{
	kvmi_set_page_access h{};
	h.view = view;
	return page_list<kvmi_page_access_entry>(KVMI_SET_PAGE_ACCESS, h, pages,
						 [](kvmi_page_access_entry &e, const PageAccess &p) {
							 e.gpa = p.gpa;
							 e.access = p.access;
						 });
}

Request control_spp(bool enable)
{
	kvmi_control_spp c{};
	c.enable = enable;
	return Request::of(KVMI_CONTROL_SPP, c);
}

Request set_page_write_bitmap(std::span<const PageWriteBitmap> pages, std::uint16_t view)
{
	kvmi_set_page_write_bitmap h{};
	h.view = view;
	return page_list<kvmi_page_write_bitmap_entry>(
		KVMI_SET_PAGE_WRITE_BITMAP, h, pages,
		[](kvmi_page_write_bitmap_entry &e, const PageWriteBitmap &p) {
			e.gpa = p.gpa;
			e.bitmap = p.bitmap;
		});
}

Request get_max_gfn()
{
	return Request::of(KVMI_GET_MAX_GFN);
}

Request query_physical(std::uint64_t gfn)
{
	kvmi_query_physical c{};
	c.gfn = gfn;
	return Request::of(KVMI_QUERY_PHYSICAL, c);
}

/* --- vCPU commands --- */

Request get_vcpu_info(std::uint16_t vcpu)
{
	return Request::of(KVMI_GET_VCPU_INFO, vcpu_hdr(vcpu));
}

Request pause_vcpu(std::uint16_t vcpu, bool wait)
{
	kvmi_pause_vcpu c{};
	c.wait = wait;
	return Request::of(KVMI_PAUSE_VCPU, vcpu_hdr(vcpu), c);
}

Request control_events(std::uint16_t vcpu, EventId id, bool enable)
{
	kvmi_control_events c{};
	c.event_id = std::uint16_t(id);
	c.enable = enable;
	return Request::of(KVMI_CONTROL_EVENTS, vcpu_hdr(vcpu), c);
}

Request control_cr(std::uint16_t vcpu, std::uint32_t cr, bool enable)
{
	kvmi_control_cr c{};
	c.enable = enable;
	c.cr = cr;
	return Request::of(KVMI_CONTROL_CR, vcpu_hdr(vcpu), c);
}

Request control_msr(std::uint16_t vcpu, std::uint32_t msr, bool enable)
{
	kvmi_control_msr c{};
	c.enable = enable;
	c.msr = msr;
	return Request::of(KVMI_CONTROL_MSR, vcpu_hdr(vcpu), c);
}

Request get_registers(std::uint16_t vcpu, std::span<const std::uint32_t> msrs)
{
	/* The reply must fit one message too. */
	check_size(KVMI_GET_REGISTERS, msrs.size(), kvmi::max_get_registers_msrs, "MSRs");
	kvmi_get_registers c{};
	c.nmsrs = std::uint16_t(msrs.size());
	return Request::of(KVMI_GET_REGISTERS, vcpu_hdr(vcpu), c).with_tail(std::as_bytes(msrs));
}

Request set_registers(std::uint16_t vcpu, const kvm_regs &regs)
{
	return Request::of(KVMI_SET_REGISTERS, vcpu_hdr(vcpu), regs);
}

Request get_cpuid(std::uint16_t vcpu, std::uint32_t function, std::uint32_t index)
{
	kvmi_get_cpuid c{};
	c.function = function;
	c.index = index;
	return Request::of(KVMI_GET_CPUID, vcpu_hdr(vcpu), c);
}

Request get_xsave(std::uint16_t vcpu)
{
	return Request::of(KVMI_GET_XSAVE, vcpu_hdr(vcpu));
}

Request set_xsave(std::uint16_t vcpu, std::span<const std::byte> xsave)
{
	check_size(KVMI_VCPU_SET_XSAVE, xsave.size(), max_payload - sizeof(kvmi_vcpu_hdr), "bytes");
	return Request::of(KVMI_VCPU_SET_XSAVE, vcpu_hdr(vcpu)).with_tail(xsave);
}

Request get_xcr(std::uint16_t vcpu, std::uint8_t xcr)
{
	kvmi_vcpu_get_xcr c{};
	c.xcr = xcr;
	return Request::of(KVMI_VCPU_GET_XCR, vcpu_hdr(vcpu), c);
}

Request inject_exception(std::uint16_t vcpu, std::uint8_t vector, std::uint32_t error_code,
			 std::uint64_t address)
{
	kvmi_inject_exception c{};
	c.nr = vector;
	c.error_code = error_code;
	c.address = address;
	return Request::of(KVMI_INJECT_EXCEPTION, vcpu_hdr(vcpu), c);
}

Request get_mtrr_type(std::uint16_t vcpu, std::uint64_t gpa)
{
	kvmi_get_mtrr_type c{};
	c.gpa = gpa;
	return Request::of(KVMI_GET_MTRR_TYPE, vcpu_hdr(vcpu), c);
}

Request translate_gva(std::uint16_t vcpu, std::uint64_t gva)
{
	kvmi_vcpu_translate_gva c{};
	c.gva = gva;
	return Request::of(KVMI_VCPU_TRANSLATE_GVA, vcpu_hdr(vcpu), c);
}

Request control_singlestep(std::uint16_t vcpu, bool enable)
{
	kvmi_vcpu_control_singlestep c{};
	c.enable = enable;
	return Request::of(KVMI_VCPU_CONTROL_SINGLESTEP, vcpu_hdr(vcpu), c);
}

} // namespace request

} // namespace virtkit::introspect::detail
