// SPDX-License-Identifier: MIT
/*
 * The in-process introspection tool of `virtkit demo` (see demo_tool.hpp).
 *
 * Everything here is what an outside tool would do over the socket; it
 * only runs on a thread of the demo so that the demo is self-contained.
 * The tool does not check the values it sees (the demo does that from
 * the record): it acts on what comes, and fails only when the protocol
 * does (a command refused, an event that does not come in time).
 */
#include "demo_tool.hpp"

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <stdexcept>

#include <linux/virtkit_kvmi.h>

namespace virtkit::tool::demo {

namespace {

using namespace std::chrono_literals;
using namespace virtkit::introspect;

/* Every wait of the tool is bounded by this. */
constexpr auto tool_timeout = 10000ms;

__attribute__((format(printf, 1, 2))) std::string fmt(const char *f, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, f);
	std::vsnprintf(buf, sizeof(buf), f, ap);
	va_end(ap);
	return buf;
}

std::string uuid_text(const std::array<std::uint8_t, 16> &u)
{
	std::string s;
	for (std::size_t i = 0; i < u.size(); i++)
		s += fmt("%s%02x", i == 4 || i == 6 || i == 8 || i == 10 ? "-" : "", u[i]);
	return s;
}

Event next(Session &s, const char *what)
{
	auto ev = s.next_event(tool_timeout);
	if (!ev)
		throw std::runtime_error(std::string("the tool waited 10 s for ") + what);
	return std::move(*ev);
}

} // namespace

DemoTool::DemoTool(introspect::Listener listener, ToolPlan plan)
	: plan_(std::move(plan)),
	  thread_([this, l = std::move(listener)]() mutable { run(std::move(l)); })
{
}

DemoTool::~DemoTool()
{
	if (thread_.joinable())
		thread_.join();
}

ToolRecord DemoTool::finish()
{
	if (thread_.joinable())
		thread_.join();
	if (error_)
		std::rethrow_exception(error_);
	return record_;
}

void DemoTool::run(introspect::Listener listener) noexcept
{
	try {
		SessionOptions o;
		o.command_timeout = tool_timeout;
		Session s = Session::accept(listener, plan_.secret, tool_timeout, o);
		attach(s);
		answer_events(s);
		detach(s);
	} catch (...) {
		/* The Session is gone: the VMM resumes every vCPU, drops every hook. */
		error_ = std::current_exception();
	}
}

void DemoTool::attach(Session &s)
{
	record_.info = s.info();
	record_.vcpus = s.get_guest_info();
	plan_.say(fmt("tool: VM '%s' connected: uuid %s, %u vCPUs, guest memory up to 0x%llx",
		      record_.info.name.c_str(), uuid_text(record_.info.uuid).c_str(),
		      record_.vcpus, (unsigned long long)record_.info.max_gpa.value_or(0)));

	/* Stop every vCPU; each raises PAUSE_VCPU and waits for the reply. */
	s.pause_all_vcpus(record_.vcpus);
	std::vector<Event> waiting;
	while (waiting.size() < record_.vcpus) {
		Event ev = next(s, "the vCPUs to pause");
		if (ev.id != EventId::pause_vcpu)
			throw std::runtime_error("the tool expected PAUSE_VCPU, got " +
						 describe(ev));
		const std::uint32_t msrs[] = {plan_.msr};
		record_.paused.push_back({ev.vcpu, s.get_registers(ev.vcpu, msrs)});
		const auto &r = record_.paused.back().regs;
		plan_.say(fmt("tool: vCPU %u paused at rip 0x%llx (%s), rsp 0x%llx, cr3 0x%llx, "
			      "MSR 0x%x = 0x%llx",
			      unsigned(ev.vcpu), (unsigned long long)r.regs.rip,
			      plan_.where(r.regs.rip).c_str(), (unsigned long long)r.regs.rsp,
			      (unsigned long long)r.sregs.cr3, unsigned(plan_.msr),
			      (unsigned long long)r.msrs.at(0).value));
		waiting.push_back(std::move(ev));
	}

	for (std::uint16_t v = 0; v < record_.vcpus; v++) {
		s.control_events(v, EventId::msr, true);
		s.control_msr(v, plan_.msr, true);
		s.control_events(v, EventId::pf, true);
	}
	const PageAccess ro{plan_.page_gpa, access_r | access_x};
	s.set_page_access(std::span(&ro, 1));
	plan_.say(fmt("tool: hooked writes to MSR 0x%x on every vCPU and write-protected the page "
		      "at gpa 0x%llx (SET_PAGE_ACCESS without W)",
		      unsigned(plan_.msr), (unsigned long long)plan_.page_gpa));

	const std::uint64_t one = 1;
	s.write_physical(plan_.go_gpa, std::as_bytes(std::span(&one, 1)));
	for (auto &ev : waiting)
		s.reply(ev, Action::continue_);
	plan_.say(fmt("tool: wrote 1 to the guest's go flag at gpa 0x%llx (WRITE_PHYSICAL) and "
		      "resumed the vCPUs",
		      (unsigned long long)plan_.go_gpa));
}

void DemoTool::answer_events(Session &s)
{
	while (record_.events.size() < plan_.events) {
		Event ev = next(s, "the guest's writes");
		std::string line = "tool: event: " + describe(ev) + " (" +
				   plan_.where(ev.arch.regs.rip) + ")";
		if (auto *m = ev.get<MsrEvent>()) {
			/* The first write is denied: the reply keeps the old value. */
			bool deny = record_.replied_msr.empty();
			std::uint64_t value = deny ? m->old_value : m->new_value;
			plan_.say(line + (deny ? "; denied: the tool replies the old value" :
						 "; allowed: the tool replies the new value"));
			s.reply_msr(ev, Action::continue_, value);
			record_.replied_msr.push_back(value);
		} else if (ev.get<PfEvent>()) {
			plan_.say(line + "; CONTINUE: the write is performed once");
			s.reply_pf(ev, Action::continue_);
		} else {
			plan_.say(line + "; not expected here, CONTINUE");
			s.reply(ev, Action::continue_);
		}
		record_.events.push_back(std::move(ev));
	}
}

void DemoTool::detach(Session &s)
{
	for (std::uint16_t v = 0; v < record_.vcpus; v++) {
		s.control_msr(v, plan_.msr, false);
		s.control_events(v, EventId::msr, false);
		s.control_events(v, EventId::pf, false);
	}
	const PageAccess rwx{plan_.page_gpa, access_r | access_w | access_x};
	s.set_page_access(std::span(&rwx, 1));
	s.close();
	record_.detached = true;
	plan_.say("tool: removed its hooks and closed the connection: detached");
}

} // namespace virtkit::tool::demo
