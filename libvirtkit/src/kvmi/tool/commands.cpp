// SPDX-License-Identifier: MIT
/*
 * Session's typed commands: each sends its request (requests.cpp, shared
 * with Batch), and checks the reply (size, padding) before its data is used.
 * A reply that does not match its command's layout means the peer does not
 * speak the protocol: the session ends.
 */
#include <virtkit/introspect.hpp>

#include <array>
#include <cerrno>
#include <cstring>
#include <new>
#include <stdexcept>

#include "kvmi/tool/names.hpp"
#include "kvmi/tool/requests.hpp"
#include "kvmi/tool/session_state.hpp"

namespace virtkit::introspect {

using namespace detail;

namespace {

std::string vcpu_text(std::uint16_t vcpu)
{
	return "vcpu=" + std::to_string(vcpu);
}

/* Send the request and wait for its reply; a refusal throws CommandError
 * with the detail detail() describes (built only then). */
template <class F>
std::span<const std::byte> command(SessionState &s, const Request &req, F &&detail)
{
	auto r = s.transact(req, command_cstr(req.id()));
	if (r.err)
		throw CommandError(req.id(), r.err, detail());
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

} // namespace

/* --- VM commands --- */

Version Session::get_version()
{
	auto &s = state();
	auto data = command(s, request::get_version(), no_detail);
	auto r = fixed_reply<kvmi_get_version_reply>(s, KVMI_GET_VERSION, data);
	check_padding(s, KVMI_GET_VERSION, zero(r.padding) && zero(r.features.padding));
	return Version{r.version, r.features.spp != 0, r.features.vmfunc != 0,
		       r.features.eptp != 0, r.features.ve != 0};
}

int Session::check_command(std::uint16_t id)
{
	auto r = state().transact(request::check_command(id), "KVMI_CHECK_COMMAND");
	return r.err ? kvmi_errno(-r.err) : 0;
}

int Session::check_event(EventId id)
{
	auto r = state().transact(request::check_event(id), "KVMI_CHECK_EVENT");
	return r.err ? kvmi_errno(-r.err) : 0;
}

std::uint32_t Session::get_guest_info()
{
	auto &s = state();
	auto data = command(s, request::get_guest_info(), no_detail);
	auto r = fixed_reply<kvmi_get_guest_info_reply>(s, KVMI_GET_GUEST_INFO, data);
	check_padding(s, KVMI_GET_GUEST_INFO, zero(r.padding));
	return r.vcpu_count;
}

void Session::control_vm_events(EventId id, bool enable)
{
	command(state(), request::control_vm_events(id, enable), [&] {
		return "event=" + event_name(id) + " enable=" + std::to_string(enable);
	});
}

/*
 * One command per page, as the protocol asks, but pipelined: a window of
 * requests goes out in one write, and the next window goes out before the
 * replies of the current one are read (the VMM answers VM commands in
 * order, a window's replies together in one write), so the VMM works on
 * one window while this side copies the other. Every reply of every window
 * sent is read before a refusal is thrown, so the stream stays in step.
 */
void Session::read_physical(std::uint64_t gpa, std::span<std::byte> out)
{
	constexpr std::size_t window = 16; /* 64 KiB of replies per write */
	auto &s = state();
	const char *op = command_cstr(KVMI_READ_PHYSICAL);
	struct Piece {
		std::uint64_t at;
		std::size_t done, n;
		std::uint32_t seq;
	};
	std::vector<Piece> pieces;
	pieces.reserve(out.size() / kvmi::page_size + 2);
	for_each_page(gpa, out.size(), [&](std::uint64_t at, std::size_t done, std::size_t n) {
		pieces.push_back({at, done, n, 0});
	});
	constexpr std::size_t request_size = msg_hdr_size + sizeof(kvmi_read_physical);
	std::array<std::byte, window * request_size> wire;
	std::size_t sent = 0;
	auto send_window = [&] {
		const std::size_t end = std::min(pieces.size(), sent + window);
		std::byte *w = wire.data();
		for (; sent < end; sent++) {
			kvmi_msg_hdr h{};
			h.id = KVMI_READ_PHYSICAL;
			h.size = sizeof(kvmi_read_physical);
			h.seq = pieces[sent].seq = s.next_seq();
			kvmi_read_physical c{};
			c.gpa = pieces[sent].at;
			c.size = pieces[sent].n;
			std::memcpy(w, &h, sizeof(h));
			std::memcpy(w + sizeof(h), &c, sizeof(c));
			w += request_size;
		}
		const iovec iov{wire.data(), std::size_t(w - wire.data())};
		s.send_raw_bytes(std::span(&iov, 1), op);
	};
	std::optional<CommandError> refused;
	for (std::size_t i = 0; i < pieces.size(); i++) {
		/* The first window, then the next one ahead of each window's replies. */
		if (i == 0)
			send_window();
		if (i % window == 0 && sent < pieces.size())
			send_window();
		const Piece &p = pieces[i];
		auto r = s.wait_reply(KVMI_READ_PHYSICAL, p.seq, op);
		if (r.err) {
			if (!refused)
				refused.emplace(KVMI_READ_PHYSICAL, r.err,
						"gpa=" + hex(p.at) + " size=" + std::to_string(p.n));
			continue;
		}
		if (r.data.size() != p.n)
			s.fail(Error(op, EPROTO,
				     std::to_string(r.data.size()) + " bytes for a read of " +
					     std::to_string(p.n)));
		std::memcpy(out.data() + p.done, r.data.data(), p.n);
	}
	if (refused)
		throw *refused;
}

std::vector<std::byte> Session::read_physical(std::uint64_t gpa, std::size_t size)
{
	/*
	 * A size no buffer can hold is reported like every other failure, as
	 * an Error naming the operation, not as std::bad_alloc; nothing has
	 * been sent, so the session stays usable.
	 */
	std::vector<std::byte> out;
	try {
		out.resize(size);
	} catch (const std::bad_alloc &) {
		throw Error("KVMI_READ_PHYSICAL", ENOMEM,
			    "gpa=" + hex(gpa) + " size=" + std::to_string(size) +
				    ": no buffer that large");
	} catch (const std::length_error &) {
		throw Error("KVMI_READ_PHYSICAL", ENOMEM,
			    "gpa=" + hex(gpa) + " size=" + std::to_string(size) +
				    ": no buffer that large");
	}
	read_physical(gpa, std::span<std::byte>(out));
	return out;
}

void Session::write_physical(std::uint64_t gpa, std::span<const std::byte> data)
{
	auto &s = state();
	for_each_page(gpa, data.size(), [&](std::uint64_t at, std::size_t done, std::size_t n) {
		command(s, request::write_physical(at, data.subspan(done, n)), [&] {
			return "gpa=" + hex(at) + " size=" + std::to_string(n);
		});
	});
}

void Session::set_page_access(std::span<const PageAccess> pages, std::uint16_t view)
{
	auto req = request::set_page_access(pages, view);
	command(state(), req, [&] {
		std::string d = std::to_string(pages.size()) + " pages";
		if (!pages.empty())
			d += ", first gpa=" + hex(pages[0].gpa) +
			     " access=" + std::to_string(pages[0].access);
		return d;
	});
}

void Session::control_spp(bool enable)
{
	command(state(), request::control_spp(enable),
		[&] { return "enable=" + std::to_string(enable); });
}

void Session::set_page_write_bitmap(std::span<const PageWriteBitmap> pages, std::uint16_t view)
{
	auto req = request::set_page_write_bitmap(pages, view);
	command(state(), req, [&] {
		std::string d = std::to_string(pages.size()) + " pages";
		if (!pages.empty())
			d += ", first gpa=" + hex(pages[0].gpa) + " bitmap=" + hex(pages[0].bitmap);
		return d;
	});
}

std::uint64_t Session::get_max_gfn()
{
	auto &s = state();
	auto data = command(s, request::get_max_gfn(), no_detail);
	return fixed_reply<kvmi_get_max_gfn_reply>(s, KVMI_GET_MAX_GFN, data).gfn;
}

PhysicalRange Session::query_physical(std::uint64_t gfn)
{
	auto &s = state();
	auto data = command(s, request::query_physical(gfn), [&] { return "gfn=" + hex(gfn); });
	auto r = fixed_reply<kvmi_query_physical_reply>(s, KVMI_QUERY_PHYSICAL, data);
	return PhysicalRange{r.gfn, r.size};
}

/* --- vCPU commands --- */

std::uint64_t Session::get_tsc_speed(std::uint16_t vcpu)
{
	auto &s = state();
	auto data = command(s, request::get_vcpu_info(vcpu), [&] { return vcpu_text(vcpu); });
	return fixed_reply<kvmi_get_vcpu_info_reply>(s, KVMI_GET_VCPU_INFO, data).tsc_speed;
}

void Session::pause_vcpu(std::uint16_t vcpu, bool wait)
{
	command(state(), request::pause_vcpu(vcpu, wait),
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
	command(state(), request::control_events(vcpu, id, enable), [&] {
		return vcpu_text(vcpu) + " event=" + event_name(id) +
		       " enable=" + std::to_string(enable);
	});
}

void Session::control_cr(std::uint16_t vcpu, std::uint32_t cr, bool enable)
{
	command(state(), request::control_cr(vcpu, cr, enable), [&] {
		return vcpu_text(vcpu) + " cr=" + std::to_string(cr) +
		       " enable=" + std::to_string(enable);
	});
}

void Session::control_msr(std::uint16_t vcpu, std::uint32_t msr, bool enable)
{
	command(state(), request::control_msr(vcpu, msr, enable), [&] {
		return vcpu_text(vcpu) + " msr=" + hex(msr) + " enable=" + std::to_string(enable);
	});
}

Registers Session::get_registers(std::uint16_t vcpu, std::span<const std::uint32_t> msrs)
{
	auto req = request::get_registers(vcpu, msrs);
	auto &s = state();
	auto data = command(s, req, [&] {
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
	command(state(), request::set_registers(vcpu, regs), [&] { return vcpu_text(vcpu); });
}

Cpuid Session::get_cpuid(std::uint16_t vcpu, std::uint32_t function, std::uint32_t index)
{
	auto &s = state();
	auto data = command(s, request::get_cpuid(vcpu, function, index), [&] {
		return vcpu_text(vcpu) + " function=" + hex(function) + " index=" + hex(index);
	});
	auto r = fixed_reply<kvmi_get_cpuid_reply>(s, KVMI_GET_CPUID, data);
	return Cpuid{r.eax, r.ebx, r.ecx, r.edx};
}

std::vector<std::byte> Session::get_xsave(std::uint16_t vcpu)
{
	auto data = command(state(), request::get_xsave(vcpu), [&] { return vcpu_text(vcpu); });
	return {data.begin(), data.end()};
}

void Session::set_xsave(std::uint16_t vcpu, std::span<const std::byte> xsave)
{
	auto req = request::set_xsave(vcpu, xsave);
	command(state(), req, [&] {
		return vcpu_text(vcpu) + " size=" + std::to_string(xsave.size());
	});
}

std::uint64_t Session::get_xcr(std::uint16_t vcpu, std::uint8_t xcr)
{
	auto &s = state();
	auto data = command(s, request::get_xcr(vcpu, xcr),
			    [&] { return vcpu_text(vcpu) + " xcr=" + std::to_string(xcr); });
	return fixed_reply<kvmi_vcpu_get_xcr_reply>(s, KVMI_VCPU_GET_XCR, data).value;
}

void Session::inject_exception(std::uint16_t vcpu, std::uint8_t vector, std::uint32_t error_code,
			       std::uint64_t address)
{
	command(state(), request::inject_exception(vcpu, vector, error_code, address), [&] {
		return vcpu_text(vcpu) + " vector=" + std::to_string(vector) +
		       " error_code=" + hex(error_code) + " address=" + hex(address);
	});
}

std::uint8_t Session::get_mtrr_type(std::uint16_t vcpu, std::uint64_t gpa)
{
	auto &s = state();
	auto data = command(s, request::get_mtrr_type(vcpu, gpa),
			    [&] { return vcpu_text(vcpu) + " gpa=" + hex(gpa); });
	auto r = fixed_reply<kvmi_get_mtrr_type_reply>(s, KVMI_GET_MTRR_TYPE, data);
	check_padding(s, KVMI_GET_MTRR_TYPE, zero(r.padding));
	return r.type;
}

std::uint64_t Session::translate_gva(std::uint16_t vcpu, std::uint64_t gva)
{
	auto &s = state();
	auto data = command(s, request::translate_gva(vcpu, gva),
			    [&] { return vcpu_text(vcpu) + " gva=" + hex(gva); });
	return fixed_reply<kvmi_vcpu_translate_gva_reply>(s, KVMI_VCPU_TRANSLATE_GVA, data).gpa;
}

void Session::control_singlestep(std::uint16_t vcpu, bool enable)
{
	command(state(), request::control_singlestep(vcpu, enable),
		[&] { return vcpu_text(vcpu) + " enable=" + std::to_string(enable); });
}

} // namespace virtkit::introspect
