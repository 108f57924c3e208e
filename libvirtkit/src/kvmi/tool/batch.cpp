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
#include "kvmi/tool/requests.hpp"
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

namespace {

/* Queue a request: its payload in one piece, as Batch takes it. */
Batch &queue(Batch &batch, const Request &r)
{
	if (r.tail().empty())
		return batch.raw(r.id(), r.head());
	std::vector<std::byte> payload(r.head().begin(), r.head().end());
	append(payload, r.tail());
	return batch.raw(r.id(), payload);
}

} // namespace

Batch &Batch::pause_vcpu(std::uint16_t vcpu, bool wait)
{
	return queue(*this, request::pause_vcpu(vcpu, wait));
}

Batch &Batch::control_events(std::uint16_t vcpu, EventId id, bool enable)
{
	return queue(*this, request::control_events(vcpu, id, enable));
}

Batch &Batch::control_vm_events(EventId id, bool enable)
{
	return queue(*this, request::control_vm_events(id, enable));
}

Batch &Batch::control_cr(std::uint16_t vcpu, std::uint32_t cr, bool enable)
{
	return queue(*this, request::control_cr(vcpu, cr, enable));
}

Batch &Batch::control_msr(std::uint16_t vcpu, std::uint32_t msr, bool enable)
{
	return queue(*this, request::control_msr(vcpu, msr, enable));
}

Batch &Batch::set_registers(std::uint16_t vcpu, const kvm_regs &regs)
{
	return queue(*this, request::set_registers(vcpu, regs));
}

Batch &Batch::inject_exception(std::uint16_t vcpu, std::uint8_t vector, std::uint32_t error_code,
			       std::uint64_t address)
{
	return queue(*this, request::inject_exception(vcpu, vector, error_code, address));
}

Batch &Batch::write_physical(std::uint64_t gpa, std::span<const std::byte> data)
{
	for_each_page(gpa, data.size(), [&](std::uint64_t at, std::size_t done, std::size_t n) {
		queue(*this, request::write_physical(at, data.subspan(done, n)));
	});
	return *this;
}

Batch &Batch::set_page_access(std::span<const PageAccess> pages, std::uint16_t view)
{
	return queue(*this, request::set_page_access(pages, view));
}

Batch &Batch::control_spp(bool enable)
{
	return queue(*this, request::control_spp(enable));
}

Batch &Batch::set_page_write_bitmap(std::span<const PageWriteBitmap> pages, std::uint16_t view)
{
	return queue(*this, request::set_page_write_bitmap(pages, view));
}

Batch &Batch::control_singlestep(std::uint16_t vcpu, bool enable)
{
	return queue(*this, request::control_singlestep(vcpu, enable));
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
