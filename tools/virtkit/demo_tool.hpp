// SPDX-License-Identifier: MIT
/*
 * The introspection tool `virtkit demo` runs in-process: a thread that
 * plays an outside KVMI tool with virtkit::introspect, so that the demo
 * needs nothing else. It accepts one VM on a Listener, pauses every vCPU
 * and reads its registers, hooks writes to an MSR on every vCPU and
 * write-protects a page, writes the guest's "go" flag, lets the vCPUs run,
 * answers the events (denies the first MSR write, allows the others, lets
 * the page write land) and detaches: removes its hooks and closes the
 * connection. It says what it does through a callback and records what it
 * saw; the demo checks the record.
 */
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <virtkit/introspect.hpp>

namespace virtkit::tool::demo {

struct ToolPlan {
	std::string secret;
	std::uint32_t msr = 0;		/* writes to hook, on every vCPU */
	std::uint64_t page_gpa = 0;	/* page to write-protect */
	std::uint64_t go_gpa = 0;	/* 8-byte flag the tool sets after hooking */
	unsigned events = 0;		/* MSR and PF events to answer before detaching */
	/* "function+offset" for a guest RIP, for the tool's sentences. */
	std::function<std::string(std::uint64_t rip)> where;
	/* One sentence of what the tool did or saw. */
	std::function<void(const std::string &)> say;
};

/* A vCPU as the tool found it while it was paused (GET_REGISTERS). */
struct PausedVcpu {
	std::uint16_t vcpu = 0;
	introspect::Registers regs; /* msrs: the hooked MSR */
};

/* What the tool saw. */
struct ToolRecord {
	introspect::HandshakeInfo info;
	std::uint32_t vcpus = 0;
	/* Each vCPU once, in the order their PAUSE_VCPU events came. */
	std::vector<PausedVcpu> paused;
	/* The MSR and PF events in arrival order, and the MSR value replied. */
	std::vector<introspect::Event> events;
	std::vector<std::uint64_t> replied_msr;
	bool detached = false;
};

class DemoTool {
public:
	/* Start the tool's thread; it waits on listener for the VM. */
	DemoTool(introspect::Listener listener, ToolPlan plan);
	/* Joins the thread: each of the tool's waits is bounded. */
	~DemoTool();
	DemoTool(const DemoTool &) = delete;
	DemoTool &operator=(const DemoTool &) = delete;

	/* Wait until the tool has detached; rethrows the error that ended it. */
	ToolRecord finish();

private:
	void run(introspect::Listener listener) noexcept;
	void attach(introspect::Session &s);
	void answer_events(introspect::Session &s);
	void detach(introspect::Session &s);

	ToolPlan plan_;
	ToolRecord record_;
	std::exception_ptr error_;
	std::thread thread_;
};

} // namespace virtkit::tool::demo
