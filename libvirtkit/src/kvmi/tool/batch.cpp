// SPDX-License-Identifier: MIT
/*
 * Batch: commands without replies between two CONTROL_CMD_RESPONSE
 * messages, sent in one write - the way libkvmi batches, so one round trip
 * pauses every vCPU or applies many page restrictions.
 */
#include <virtkit/introspect.hpp>

#include <cerrno>
#include <utility>

#include "kvmi/tool/names.hpp"
#include "kvmi/tool/session_state.hpp"

namespace virtkit::introspect {

using namespace detail;

Batch &Batch::add(std::uint16_t id, std::span<const std::byte> payload)
{
	auto &s = session_->state();
	s.ensure_connected(command_cstr(id));
	if (payload.size() > 0xffff)
		throw Error(command_cstr(id), EMSGSIZE,
			    std::to_string(payload.size()) + " bytes do not fit kvmi_msg_hdr.size");
	/* The prefix's seq comes before the commands', as on the wire. */
	if (count_ == 0)
		prefix_seq_ = s.next_seq();
	kvmi_msg_hdr h{};
	h.id = id;
	h.size = std::uint16_t(payload.size());
	h.seq = s.next_seq();
	append(messages_, bytes_of(h));
	append(messages_, payload);
	count_++;
	return *this;
}

Batch &Batch::pause_vcpu(std::uint16_t vcpu, bool wait)
{
	kvmi_pause_vcpu c{};
	c.wait = wait;
	return add(KVMI_PAUSE_VCPU, pack(vcpu_hdr(vcpu), c));
}

Batch &Batch::control_events(std::uint16_t vcpu, EventId id, bool enable)
{
	kvmi_control_events c{};
	c.event_id = std::uint16_t(id);
	c.enable = enable;
	return add(KVMI_CONTROL_EVENTS, pack(vcpu_hdr(vcpu), c));
}

Batch &Batch::control_vm_events(EventId id, bool enable)
{
	kvmi_control_vm_events c{};
	c.event_id = std::uint16_t(id);
	c.enable = enable;
	return add(KVMI_CONTROL_VM_EVENTS, pack(c));
}

Batch &Batch::control_cr(std::uint16_t vcpu, std::uint32_t cr, bool enable)
{
	kvmi_control_cr c{};
	c.enable = enable;
	c.cr = cr;
	return add(KVMI_CONTROL_CR, pack(vcpu_hdr(vcpu), c));
}

Batch &Batch::control_msr(std::uint16_t vcpu, std::uint32_t msr, bool enable)
{
	kvmi_control_msr c{};
	c.enable = enable;
	c.msr = msr;
	return add(KVMI_CONTROL_MSR, pack(vcpu_hdr(vcpu), c));
}

Batch &Batch::set_registers(std::uint16_t vcpu, const kvm_regs &regs)
{
	return add(KVMI_SET_REGISTERS, pack(vcpu_hdr(vcpu), regs));
}

Batch &Batch::inject_exception(std::uint16_t vcpu, std::uint8_t vector, std::uint32_t error_code,
			       std::uint64_t address)
{
	kvmi_inject_exception c{};
	c.nr = vector;
	c.error_code = error_code;
	c.address = address;
	return add(KVMI_INJECT_EXCEPTION, pack(vcpu_hdr(vcpu), c));
}

Batch &Batch::write_physical(std::uint64_t gpa, std::span<const std::byte> data)
{
	for (std::size_t done = 0; done < data.size();) {
		/* One page per request, as Session::write_physical. */
		std::size_t n = std::min<std::size_t>(data.size() - done, 4096 - ((gpa + done) & 4095));
		kvmi_write_physical c{};
		c.gpa = gpa + done;
		c.size = n;
		auto payload = pack(c);
		append(payload, data.subspan(done, n));
		add(KVMI_WRITE_PHYSICAL, payload);
		done += n;
	}
	return *this;
}

Batch &Batch::set_page_access(std::span<const PageAccess> pages, std::uint16_t view)
{
	return add(KVMI_SET_PAGE_ACCESS, page_access_payload(pages, view));
}

Batch &Batch::control_spp(bool enable)
{
	kvmi_control_spp c{};
	c.enable = enable;
	return add(KVMI_CONTROL_SPP, pack(c));
}

Batch &Batch::set_page_write_bitmap(std::span<const PageWriteBitmap> pages, std::uint16_t view)
{
	return add(KVMI_SET_PAGE_WRITE_BITMAP, write_bitmap_payload(pages, view));
}

Batch &Batch::control_singlestep(std::uint16_t vcpu, bool enable)
{
	kvmi_vcpu_control_singlestep c{};
	c.enable = enable;
	return add(KVMI_VCPU_CONTROL_SINGLESTEP, pack(vcpu_hdr(vcpu), c));
}

Batch &Batch::raw(std::uint16_t id, std::span<const std::byte> payload)
{
	return add(id, payload);
}

void Batch::commit(bool wait)
{
	if (count_ == 0)
		return;
	const char *op = "KVMI_CONTROL_CMD_RESPONSE";
	auto &s = session_->state();

	struct Control {
		kvmi_msg_hdr hdr;
		kvmi_control_cmd_response cmd;
	};
	static_assert(sizeof(Control) == 16);
	Control prefix{}, suffix{};
	prefix.hdr.id = KVMI_CONTROL_CMD_RESPONSE;
	prefix.hdr.size = sizeof(prefix.cmd);
	prefix.hdr.seq = prefix_seq_;
	prefix.cmd.enable = 0;
	prefix.cmd.now = 1;
	suffix.hdr = prefix.hdr;
	suffix.hdr.seq = s.next_seq();
	suffix.cmd.enable = 1;
	suffix.cmd.now = wait;

	/* The batch is empty from here on, whatever happens to the send. */
	auto messages = std::exchange(messages_, {});
	auto n = std::exchange(count_, 0);
	iovec iov[] = {{&prefix, sizeof(prefix)},
		       {messages.data(), messages.size()},
		       {&suffix, sizeof(suffix)}};
	s.send_raw_bytes(iov, op);
	if (!wait)
		return;
	auto r = s.wait_reply(KVMI_CONTROL_CMD_RESPONSE, suffix.hdr.seq, op);
	if (r.err)
		throw CommandError(KVMI_CONTROL_CMD_RESPONSE, r.err,
				   "the first error of a batch of " + std::to_string(n) + " commands");
}

} // namespace virtkit::introspect
