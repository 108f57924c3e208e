// SPDX-License-Identifier: MIT
/* Names of commands and events, the KVMI error mapping, CommandError, describe(). */
#include <virtkit/introspect.hpp>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <string_view>

#include "kvmi/protocol/messages.hpp"
#include "kvmi/tool/names.hpp"
#include "kvmi/tool/wire.hpp"

namespace virtkit::introspect {

namespace detail {

const char *command_cstr(std::uint16_t id) noexcept
{
	if (id == VIRTKIT_KVMI_SHARE_MEMORY)
		return "VIRTKIT_KVMI_SHARE_MEMORY";
	const kvmi::MessageInfo *m = kvmi::find_message(id);
	return m ? m->name : "KVMI command";
}

} // namespace detail

std::string command_name(std::uint16_t id)
{
	if (id == VIRTKIT_KVMI_SHARE_MEMORY)
		return "VIRTKIT_KVMI_SHARE_MEMORY";
	if (const auto *m = detail::kvmi::find_message(id))
		return m->name;
	return "KVMI command " + std::to_string(id);
}

std::string event_name(EventId id)
{
	/* "KVMI_EVENT_BREAKPOINT" -> "BREAKPOINT" */
	constexpr std::string_view prefix = "KVMI_EVENT_";
	if (const auto *e = detail::kvmi::find_event(std::uint16_t(id))) {
		std::string_view name = e->name;
		if (name.starts_with(prefix))
			return std::string(name.substr(prefix.size()));
	}
	return "event " + std::to_string(unsigned(id));
}

static_assert(unsigned(EventId::unhook) == KVMI_EVENT_UNHOOK &&
	      unsigned(EventId::cr) == KVMI_EVENT_CR && unsigned(EventId::msr) == KVMI_EVENT_MSR &&
	      unsigned(EventId::xsetbv) == KVMI_EVENT_XSETBV &&
	      unsigned(EventId::breakpoint) == KVMI_EVENT_BREAKPOINT &&
	      unsigned(EventId::hypercall) == KVMI_EVENT_HYPERCALL &&
	      unsigned(EventId::pf) == KVMI_EVENT_PF && unsigned(EventId::trap) == KVMI_EVENT_TRAP &&
	      unsigned(EventId::descriptor) == KVMI_EVENT_DESCRIPTOR &&
	      unsigned(EventId::create_vcpu) == KVMI_EVENT_CREATE_VCPU &&
	      unsigned(EventId::pause_vcpu) == KVMI_EVENT_PAUSE_VCPU &&
	      unsigned(EventId::singlestep) == KVMI_EVENT_SINGLESTEP &&
	      unsigned(EventId::cpuid) == KVMI_EVENT_CPUID);
static_assert(std::uint8_t(Action::continue_) == KVMI_EVENT_ACTION_CONTINUE &&
	      std::uint8_t(Action::retry) == KVMI_EVENT_ACTION_RETRY &&
	      std::uint8_t(Action::crash) == KVMI_EVENT_ACTION_CRASH);
static_assert(access_r == KVMI_PAGE_ACCESS_R && access_w == KVMI_PAGE_ACCESS_W &&
	      access_x == KVMI_PAGE_ACCESS_X);

int kvmi_errno(int kvmi_error) noexcept
{
	switch (kvmi_error) {
	case KVMI_ENOSYS:
		return ENOSYS;
	case KVMI_EPERM:
	case KVMI_ENOENT:
	case KVMI_E2BIG:
	case KVMI_EAGAIN:
	case KVMI_ENOMEM:
	case KVMI_EFAULT:
	case KVMI_EBUSY:
	case KVMI_EINVAL:
	case KVMI_EOPNOTSUPP:
		return kvmi_error; /* the same values as the host's errno */
	default:
		return EPROTO;
	}
}

CommandError::CommandError(std::uint16_t command, std::int32_t wire_error, std::string detail)
	: Error(command_name(command), kvmi_errno(-wire_error), std::move(detail)),
	  command_(command), kvmi_error_(-wire_error)
{
}

std::string describe(const Event &ev)
{
	char buf[160];
	std::string s = "vcpu " + std::to_string(ev.vcpu) + " " + event_name(ev.id);
	if (auto *m = ev.get<MsrEvent>()) {
		std::snprintf(buf, sizeof(buf), " 0x%" PRIx32 " 0x%" PRIx64 " -> 0x%" PRIx64,
			      m->msr, m->old_value, m->new_value);
		s += buf;
	} else if (auto *p = ev.get<PfEvent>()) {
		std::snprintf(buf, sizeof(buf), " gpa 0x%" PRIx64 " gva 0x%" PRIx64 " access %c%c%c",
			      p->gpa, p->gva, p->access & access_r ? 'r' : '-',
			      p->access & access_w ? 'w' : '-', p->access & access_x ? 'x' : '-');
		s += buf;
	} else if (auto *b = ev.get<BreakpointEvent>()) {
		std::snprintf(buf, sizeof(buf), " gpa 0x%" PRIx64 " len %u", b->gpa,
			      unsigned(b->insn_len));
		s += buf;
	} else if (auto *t = ev.get<TrapEvent>()) {
		std::snprintf(buf, sizeof(buf), " vector %u error_code 0x%" PRIx32 " cr2 0x%" PRIx64,
			      unsigned(t->vector), t->error_code, t->cr2);
		s += buf;
	} else if (auto *st = ev.get<SinglestepEvent>()) {
		s += st->failed ? " failed" : "";
	}
	std::snprintf(buf, sizeof(buf), " rip 0x%llx", static_cast<unsigned long long>(ev.arch.regs.rip));
	return s + buf;
}

} // namespace virtkit::introspect
