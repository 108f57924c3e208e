// SPDX-License-Identifier: MIT
/*
 * Session's typed commands: the request layouts of <linux/virtkit_kvmi.h>,
 * and the checks on each reply (size, padding) before its data is used.
 * A reply that does not match its command's layout means the peer does not
 * speak the protocol: the session ends.
 */
#include <virtkit/introspect.hpp>

#include <cerrno>
#include <cstring>

#include "kvmi/tool/names.hpp"
#include "kvmi/tool/session_state.hpp"

namespace virtkit::introspect {

using namespace detail;

namespace {

std::string vcpu_text(std::uint16_t vcpu)
{
	return "vcpu=" + std::to_string(vcpu);
}

/* Send command id and wait for its reply; a refusal throws CommandError
 * with the detail detail() describes (built only then). */
template <class F>
std::span<const std::byte> command(SessionState &s, std::uint16_t id,
				   std::initializer_list<std::span<const std::byte>> parts, F &&detail)
{
	auto r = s.transact(id, parts, command_cstr(id));
	if (r.err)
		throw CommandError(id, r.err, detail());
	return r.data;
}

std::string no_detail() { return {}; }

/* The fixed-size reply struct T; a longer reply (a newer VMM) is fine. */
template <class T> T fixed_reply(SessionState &s, std::uint16_t id, std::span<const std::byte> data)
{
	if (data.size() < sizeof(T))
		s.fail(Error(command_cstr(id), EPROTO,
			     "reply data of " + std::to_string(data.size()) + " bytes, expected " +
				     std::to_string(sizeof(T))));
	return load<T>(data);
}

void check_padding(SessionState &s, std::uint16_t id, bool zeroed)
{
	if (!zeroed)
		s.fail(Error(command_cstr(id), EPROTO, "non-zero padding in the reply"));
}

void check_size(std::uint16_t id, std::size_t n, std::size_t max, const char *what)
{
	if (n > max)
		throw Error(command_cstr(id), E2BIG,
			    std::to_string(n) + " " + what + ", at most " + std::to_string(max) +
				    " fit one message");
}

template <class Entry, class Header, class Item, class Fill>
std::vector<std::byte> entries_payload(Header h, std::span<const Item> items, Fill fill)
{
	std::vector<std::byte> out = pack(h);
	out.reserve(sizeof(h) + items.size() * sizeof(Entry));
	for (auto &item : items) {
		Entry e{};
		fill(e, item);
		append(out, bytes_of(e));
	}
	return out;
}

} // namespace

/* --- encodings shared with Batch --- */

namespace detail {

std::vector<std::byte> page_access_payload(std::span<const PageAccess> pages, std::uint16_t view)
{
	check_size(KVMI_SET_PAGE_ACCESS, pages.size(), Session::max_page_entries, "pages");
	kvmi_set_page_access h{};
	h.view = view;
	h.count = std::uint16_t(pages.size());
	return entries_payload<kvmi_page_access_entry>(
		h, pages, [](kvmi_page_access_entry &e, const PageAccess &p) {
			e.gpa = p.gpa;
			e.access = p.access;
		});
}

std::vector<std::byte> write_bitmap_payload(std::span<const PageWriteBitmap> pages,
					    std::uint16_t view)
{
	check_size(KVMI_SET_PAGE_WRITE_BITMAP, pages.size(), Session::max_page_entries, "pages");
	kvmi_set_page_write_bitmap h{};
	h.view = view;
	h.count = std::uint16_t(pages.size());
	return entries_payload<kvmi_page_write_bitmap_entry>(
		h, pages, [](kvmi_page_write_bitmap_entry &e, const PageWriteBitmap &p) {
			e.gpa = p.gpa;
			e.bitmap = p.bitmap;
		});
}

} // namespace detail

static_assert(sizeof(kvmi_set_page_access) + Session::max_page_entries *
							sizeof(kvmi_page_access_entry) <=
	      KVMI_MSG_SIZE);
/* A page of data and its header fit one message, either way. */
static_assert(4096 + sizeof(kvmi_write_physical) <= KVMI_MSG_SIZE &&
	      4096 + sizeof(kvmi_error_code) <= KVMI_MSG_SIZE);

/* --- VM commands --- */

Version Session::get_version()
{
	auto &s = state();
	auto data = command(s, KVMI_GET_VERSION, {}, no_detail);
	auto r = fixed_reply<kvmi_get_version_reply>(s, KVMI_GET_VERSION, data);
	check_padding(s, KVMI_GET_VERSION, zero(r.padding) && zero(r.features.padding));
	return Version{r.version, r.features.spp != 0, r.features.vmfunc != 0,
		       r.features.eptp != 0, r.features.ve != 0};
}

int Session::check_command(std::uint16_t id)
{
	kvmi_check_command c{};
	c.id = id;
	auto r = state().transact(KVMI_CHECK_COMMAND, {bytes_of(c)}, "KVMI_CHECK_COMMAND");
	return r.err ? kvmi_errno(-r.err) : 0;
}

int Session::check_event(EventId id)
{
	kvmi_check_event c{};
	c.id = std::uint16_t(id);
	auto r = state().transact(KVMI_CHECK_EVENT, {bytes_of(c)}, "KVMI_CHECK_EVENT");
	return r.err ? kvmi_errno(-r.err) : 0;
}

std::uint32_t Session::get_guest_info()
{
	auto &s = state();
	auto data = command(s, KVMI_GET_GUEST_INFO, {}, no_detail);
	auto r = fixed_reply<kvmi_get_guest_info_reply>(s, KVMI_GET_GUEST_INFO, data);
	check_padding(s, KVMI_GET_GUEST_INFO, zero(r.padding));
	return r.vcpu_count;
}

void Session::control_vm_events(EventId id, bool enable)
{
	kvmi_control_vm_events c{};
	c.event_id = std::uint16_t(id);
	c.enable = enable;
	command(state(), KVMI_CONTROL_VM_EVENTS, {bytes_of(c)}, [&] {
		return "event=" + event_name(id) + " enable=" + std::to_string(enable);
	});
}

/* Bytes from gpa to the end of its page. */
static std::size_t page_left(std::uint64_t gpa)
{
	return 4096 - (gpa & 4095);
}

void Session::read_physical(std::uint64_t gpa, std::span<std::byte> out)
{
	auto &s = state();
	for (std::size_t done = 0; done < out.size();) {
		/* The VMM serves one page per request (the protocol's rule). */
		std::size_t n = std::min(out.size() - done, page_left(gpa + done));
		kvmi_read_physical c{};
		c.gpa = gpa + done;
		c.size = n;
		auto data = command(s, KVMI_READ_PHYSICAL, {bytes_of(c)}, [&] {
			return "gpa=" + hex(c.gpa) + " size=" + std::to_string(n);
		});
		if (data.size() != n)
			s.fail(Error("KVMI_READ_PHYSICAL", EPROTO,
				     std::to_string(data.size()) + " bytes for a read of " +
					     std::to_string(n)));
		std::memcpy(out.data() + done, data.data(), n);
		done += n;
	}
}

std::vector<std::byte> Session::read_physical(std::uint64_t gpa, std::size_t size)
{
	std::vector<std::byte> out(size);
	read_physical(gpa, std::span<std::byte>(out));
	return out;
}

void Session::write_physical(std::uint64_t gpa, std::span<const std::byte> data)
{
	auto &s = state();
	for (std::size_t done = 0; done < data.size();) {
		std::size_t n = std::min(data.size() - done, page_left(gpa + done));
		kvmi_write_physical c{};
		c.gpa = gpa + done;
		c.size = n;
		command(s, KVMI_WRITE_PHYSICAL, {bytes_of(c), data.subspan(done, n)}, [&] {
			return "gpa=" + hex(c.gpa) + " size=" + std::to_string(n);
		});
		done += n;
	}
}

void Session::set_page_access(std::span<const PageAccess> pages, std::uint16_t view)
{
	auto payload = page_access_payload(pages, view);
	command(state(), KVMI_SET_PAGE_ACCESS, {payload}, [&] {
		std::string d = std::to_string(pages.size()) + " pages";
		if (!pages.empty())
			d += ", first gpa=" + hex(pages[0].gpa) +
			     " access=" + std::to_string(pages[0].access);
		return d;
	});
}

void Session::control_spp(bool enable)
{
	kvmi_control_spp c{};
	c.enable = enable;
	command(state(), KVMI_CONTROL_SPP, {bytes_of(c)},
		[&] { return "enable=" + std::to_string(enable); });
}

void Session::set_page_write_bitmap(std::span<const PageWriteBitmap> pages, std::uint16_t view)
{
	auto payload = write_bitmap_payload(pages, view);
	command(state(), KVMI_SET_PAGE_WRITE_BITMAP, {payload}, [&] {
		std::string d = std::to_string(pages.size()) + " pages";
		if (!pages.empty())
			d += ", first gpa=" + hex(pages[0].gpa) + " bitmap=" + hex(pages[0].bitmap);
		return d;
	});
}

std::uint64_t Session::get_max_gfn()
{
	auto &s = state();
	auto data = command(s, KVMI_GET_MAX_GFN, {}, no_detail);
	return fixed_reply<kvmi_get_max_gfn_reply>(s, KVMI_GET_MAX_GFN, data).gfn;
}

PhysicalRange Session::query_physical(std::uint64_t gfn)
{
	auto &s = state();
	kvmi_query_physical c{};
	c.gfn = gfn;
	auto data = command(s, KVMI_QUERY_PHYSICAL, {bytes_of(c)}, [&] { return "gfn=" + hex(gfn); });
	auto r = fixed_reply<kvmi_query_physical_reply>(s, KVMI_QUERY_PHYSICAL, data);
	return PhysicalRange{r.gfn, r.size};
}

/* --- vCPU commands --- */

std::uint64_t Session::get_tsc_speed(std::uint16_t vcpu)
{
	auto &s = state();
	auto h = vcpu_hdr(vcpu);
	auto data = command(s, KVMI_GET_VCPU_INFO, {bytes_of(h)}, [&] { return vcpu_text(vcpu); });
	return fixed_reply<kvmi_get_vcpu_info_reply>(s, KVMI_GET_VCPU_INFO, data).tsc_speed;
}

void Session::pause_vcpu(std::uint16_t vcpu, bool wait)
{
	auto h = vcpu_hdr(vcpu);
	kvmi_pause_vcpu c{};
	c.wait = wait;
	command(state(), KVMI_PAUSE_VCPU, {bytes_of(h), bytes_of(c)},
		[&] { return vcpu_text(vcpu) + " wait=" + std::to_string(wait); });
}

void Session::pause_all_vcpus(std::uint32_t count)
{
	if (count > 0x10000)
		throw Error("KVMI_PAUSE_VCPU", EINVAL,
			    std::to_string(count) + " vCPUs; vCPU ids have 16 bits");
	Batch batch(*this);
	for (std::uint32_t v = 0; v < count; v++)
		batch.pause_vcpu(std::uint16_t(v), true);
	batch.commit(true);
}

void Session::control_events(std::uint16_t vcpu, EventId id, bool enable)
{
	auto h = vcpu_hdr(vcpu);
	kvmi_control_events c{};
	c.event_id = std::uint16_t(id);
	c.enable = enable;
	command(state(), KVMI_CONTROL_EVENTS, {bytes_of(h), bytes_of(c)}, [&] {
		return vcpu_text(vcpu) + " event=" + event_name(id) +
		       " enable=" + std::to_string(enable);
	});
}

void Session::control_cr(std::uint16_t vcpu, std::uint32_t cr, bool enable)
{
	auto h = vcpu_hdr(vcpu);
	kvmi_control_cr c{};
	c.enable = enable;
	c.cr = cr;
	command(state(), KVMI_CONTROL_CR, {bytes_of(h), bytes_of(c)}, [&] {
		return vcpu_text(vcpu) + " cr=" + std::to_string(cr) +
		       " enable=" + std::to_string(enable);
	});
}

void Session::control_msr(std::uint16_t vcpu, std::uint32_t msr, bool enable)
{
	auto h = vcpu_hdr(vcpu);
	kvmi_control_msr c{};
	c.enable = enable;
	c.msr = msr;
	command(state(), KVMI_CONTROL_MSR, {bytes_of(h), bytes_of(c)}, [&] {
		return vcpu_text(vcpu) + " msr=" + hex(msr) + " enable=" + std::to_string(enable);
	});
}

Registers Session::get_registers(std::uint16_t vcpu, std::span<const std::uint32_t> msrs)
{
	/* The reply must fit one message too. */
	constexpr std::size_t max_msrs =
		(max_payload - sizeof(kvmi_error_code) - sizeof(kvmi_get_registers_reply)) /
		sizeof(kvm_msr_entry);
	check_size(KVMI_GET_REGISTERS, msrs.size(), max_msrs, "MSRs");
	auto &s = state();
	auto h = vcpu_hdr(vcpu);
	kvmi_get_registers c{};
	c.nmsrs = std::uint16_t(msrs.size());
	auto data = command(s, KVMI_GET_REGISTERS, {bytes_of(h), bytes_of(c), std::as_bytes(msrs)},
			    [&] {
				    return vcpu_text(vcpu) + " nmsrs=" + std::to_string(msrs.size());
			    });
	std::size_t expected = sizeof(kvmi_get_registers_reply) + msrs.size() * sizeof(kvm_msr_entry);
	if (data.size() != expected)
		s.fail(Error("KVMI_GET_REGISTERS", EPROTO,
			     "reply data of " + std::to_string(data.size()) + " bytes, expected " +
				     std::to_string(expected)));
	auto r = load<kvmi_get_registers_reply>(data);
	if (r.msrs.nmsrs != msrs.size())
		s.fail(Error("KVMI_GET_REGISTERS", EPROTO,
			     "reply with " + std::to_string(r.msrs.nmsrs) + " MSRs, asked for " +
				     std::to_string(msrs.size())));
	check_padding(s, KVMI_GET_REGISTERS, zero(r.padding) && zero(r.msrs.pad));

	Registers regs;
	regs.mode = r.mode;
	regs.regs = r.regs;
	regs.sregs = r.sregs;
	regs.msrs.reserve(msrs.size());
	for (std::size_t i = 0; i < msrs.size(); i++) {
		auto e = load<kvm_msr_entry>(data, sizeof(r) + i * sizeof(kvm_msr_entry));
		regs.msrs.push_back(MsrValue{e.index, e.data});
	}
	return regs;
}

void Session::set_registers(std::uint16_t vcpu, const kvm_regs &regs)
{
	auto h = vcpu_hdr(vcpu);
	command(state(), KVMI_SET_REGISTERS, {bytes_of(h), bytes_of(regs)},
		[&] { return vcpu_text(vcpu); });
}

Cpuid Session::get_cpuid(std::uint16_t vcpu, std::uint32_t function, std::uint32_t index)
{
	auto &s = state();
	auto h = vcpu_hdr(vcpu);
	kvmi_get_cpuid c{};
	c.function = function;
	c.index = index;
	auto data = command(s, KVMI_GET_CPUID, {bytes_of(h), bytes_of(c)}, [&] {
		return vcpu_text(vcpu) + " function=" + hex(function) + " index=" + hex(index);
	});
	auto r = fixed_reply<kvmi_get_cpuid_reply>(s, KVMI_GET_CPUID, data);
	return Cpuid{r.eax, r.ebx, r.ecx, r.edx};
}

std::vector<std::byte> Session::get_xsave(std::uint16_t vcpu)
{
	auto h = vcpu_hdr(vcpu);
	auto data = command(state(), KVMI_GET_XSAVE, {bytes_of(h)}, [&] { return vcpu_text(vcpu); });
	return {data.begin(), data.end()};
}

void Session::set_xsave(std::uint16_t vcpu, std::span<const std::byte> xsave)
{
	check_size(KVMI_VCPU_SET_XSAVE, xsave.size(), max_payload - sizeof(kvmi_vcpu_hdr), "bytes");
	auto h = vcpu_hdr(vcpu);
	command(state(), KVMI_VCPU_SET_XSAVE, {bytes_of(h), xsave}, [&] {
		return vcpu_text(vcpu) + " size=" + std::to_string(xsave.size());
	});
}

std::uint64_t Session::get_xcr(std::uint16_t vcpu, std::uint8_t xcr)
{
	auto &s = state();
	auto h = vcpu_hdr(vcpu);
	kvmi_vcpu_get_xcr c{};
	c.xcr = xcr;
	auto data = command(s, KVMI_VCPU_GET_XCR, {bytes_of(h), bytes_of(c)},
			    [&] { return vcpu_text(vcpu) + " xcr=" + std::to_string(xcr); });
	return fixed_reply<kvmi_vcpu_get_xcr_reply>(s, KVMI_VCPU_GET_XCR, data).value;
}

void Session::inject_exception(std::uint16_t vcpu, std::uint8_t vector, std::uint32_t error_code,
			       std::uint64_t address)
{
	auto h = vcpu_hdr(vcpu);
	kvmi_inject_exception c{};
	c.nr = vector;
	c.error_code = error_code;
	c.address = address;
	command(state(), KVMI_INJECT_EXCEPTION, {bytes_of(h), bytes_of(c)}, [&] {
		return vcpu_text(vcpu) + " vector=" + std::to_string(vector) +
		       " error_code=" + hex(error_code) + " address=" + hex(address);
	});
}

std::uint8_t Session::get_mtrr_type(std::uint16_t vcpu, std::uint64_t gpa)
{
	auto &s = state();
	auto h = vcpu_hdr(vcpu);
	kvmi_get_mtrr_type c{};
	c.gpa = gpa;
	auto data = command(s, KVMI_GET_MTRR_TYPE, {bytes_of(h), bytes_of(c)},
			    [&] { return vcpu_text(vcpu) + " gpa=" + hex(gpa); });
	auto r = fixed_reply<kvmi_get_mtrr_type_reply>(s, KVMI_GET_MTRR_TYPE, data);
	check_padding(s, KVMI_GET_MTRR_TYPE, zero(r.padding));
	return r.type;
}

std::uint64_t Session::translate_gva(std::uint16_t vcpu, std::uint64_t gva)
{
	auto &s = state();
	auto h = vcpu_hdr(vcpu);
	kvmi_vcpu_translate_gva c{};
	c.gva = gva;
	auto data = command(s, KVMI_VCPU_TRANSLATE_GVA, {bytes_of(h), bytes_of(c)},
			    [&] { return vcpu_text(vcpu) + " gva=" + hex(gva); });
	return fixed_reply<kvmi_vcpu_translate_gva_reply>(s, KVMI_VCPU_TRANSLATE_GVA, data).gpa;
}

void Session::control_singlestep(std::uint16_t vcpu, bool enable)
{
	auto h = vcpu_hdr(vcpu);
	kvmi_vcpu_control_singlestep c{};
	c.enable = enable;
	command(state(), KVMI_VCPU_CONTROL_SINGLESTEP, {bytes_of(h), bytes_of(c)},
		[&] { return vcpu_text(vcpu) + " enable=" + std::to_string(enable); });
}

} // namespace virtkit::introspect
