// SPDX-License-Identifier: MIT
/* Names of commands and events, the KVMI error mapping, CommandError, describe(). */
#include <virtkit/introspect.hpp>

#include <cerrno>
#include <cinttypes>
#include <cstdio>

#include "kvmi/tool/names.hpp"
#include "kvmi/tool/wire.hpp"

namespace virtkit::introspect {

namespace detail {

const char *command_cstr(std::uint16_t id) noexcept
{
	switch (id) {
#define NAME(x)                                                                                    \
	case x:                                                                                    \
		return #x
		NAME(KVMI_EVENT_REPLY);
		NAME(KVMI_EVENT);
		NAME(KVMI_GET_VERSION);
		NAME(KVMI_CHECK_COMMAND);
		NAME(KVMI_CHECK_EVENT);
		NAME(KVMI_GET_GUEST_INFO);
		NAME(KVMI_GET_VCPU_INFO);
		NAME(KVMI_PAUSE_VCPU);
		NAME(KVMI_CONTROL_VM_EVENTS);
		NAME(KVMI_CONTROL_EVENTS);
		NAME(KVMI_CONTROL_CR);
		NAME(KVMI_CONTROL_MSR);
		NAME(KVMI_CONTROL_VE);
		NAME(KVMI_GET_REGISTERS);
		NAME(KVMI_SET_REGISTERS);
		NAME(KVMI_GET_CPUID);
		NAME(KVMI_GET_XSAVE);
		NAME(KVMI_READ_PHYSICAL);
		NAME(KVMI_WRITE_PHYSICAL);
		NAME(KVMI_INJECT_EXCEPTION);
		NAME(KVMI_GET_PAGE_ACCESS);
		NAME(KVMI_SET_PAGE_ACCESS);
		NAME(KVMI_GET_MAP_TOKEN);
		NAME(KVMI_GET_MTRR_TYPE);
		NAME(KVMI_CONTROL_SPP);
		NAME(KVMI_GET_PAGE_WRITE_BITMAP);
		NAME(KVMI_SET_PAGE_WRITE_BITMAP);
		NAME(KVMI_CONTROL_CMD_RESPONSE);
		NAME(KVMI_SET_VE_INFO_PAGE);
		NAME(KVMI_GET_MAX_GFN);
		NAME(KVMI_GET_NEXT_AVAILABLE_GFN);
		NAME(KVMI_SWITCH_EPT_VIEW);
		NAME(KVMI_DISABLE_VE);
		NAME(KVMI_GET_EPT_VIEW);
		NAME(KVMI_VCPU_TRANSLATE_GVA);
		NAME(KVMI_CONTROL_EPT_VIEW);
		NAME(KVMI_VCPU_GET_XCR);
		NAME(KVMI_VCPU_SET_XSAVE);
		NAME(KVMI_QUERY_PHYSICAL);
		NAME(KVMI_VCPU_ALLOC_GFN);
		NAME(KVMI_VCPU_FREE_GFN);
		NAME(KVMI_CREATE_EPT_VIEW);
		NAME(KVMI_DESTROY_EPT_VIEW);
		NAME(KVMI_VCPU_CHANGE_GFN);
		NAME(KVMI_VCPU_CONTROL_SINGLESTEP);
#undef NAME
	}
	return "KVMI command";
}

} // namespace detail

std::string command_name(std::uint16_t id)
{
	std::string s = detail::command_cstr(id);
	if (s == "KVMI command")
		s += " " + std::to_string(id);
	return s;
}

std::string event_name(EventId id)
{
	switch (id) {
	case EventId::unhook:
		return "UNHOOK";
	case EventId::cr:
		return "CR";
	case EventId::msr:
		return "MSR";
	case EventId::xsetbv:
		return "XSETBV";
	case EventId::breakpoint:
		return "BREAKPOINT";
	case EventId::hypercall:
		return "HYPERCALL";
	case EventId::pf:
		return "PF";
	case EventId::trap:
		return "TRAP";
	case EventId::descriptor:
		return "DESCRIPTOR";
	case EventId::create_vcpu:
		return "CREATE_VCPU";
	case EventId::pause_vcpu:
		return "PAUSE_VCPU";
	case EventId::singlestep:
		return "SINGLESTEP";
	case EventId::cpuid:
		return "CPUID";
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
