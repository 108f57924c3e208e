// SPDX-License-Identifier: MIT
/*
 * The process list of a Linux guest, read from outside over KVMI as
 * introspection tools do: starting at init_task, follow task_struct.tasks
 * (every thread-group leader: the processes and kernel threads), reading
 * each task's pid and comm through TRANSLATE_GVA and READ_PHYSICAL on a
 * paused vCPU. Every address and count comes from the guest, so the walk
 * checks them: a pointer that is not mapped, a list that does not return
 * to init_task within max_tasks, or a task seen twice ends it with a
 * message instead of a loop.
 */
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <virtkit/introspect.hpp>

#include "linux_kernel.hpp"

namespace virtkit::tool {

struct GuestTask {
	std::uint64_t task;	/* guest-virtual address of its task_struct */
	std::int32_t pid, tgid;
	std::string comm;
};

struct GuestProcesses {
	/* linux_banner, else "sysname release version machine" of init_uts_ns; empty if neither is known. */
	std::string banner;
	std::vector<GuestTask> tasks; /* init_task first, in list order */
	/* Why the walk stopped early (empty: it came back to init_task). */
	std::string incomplete;
};

inline constexpr std::size_t max_tasks = 1 << 20;

/*
 * Walk the list with vCPU vcpu's page tables (the vCPU must be paused).
 * Throws KernelImageError when init_task does not hold "swapper": the
 * layout is not that of the kernel the guest runs (another build, or
 * KASLR moved it), and virtkit::Error when a command fails.
 */
GuestProcesses list_processes(introspect::Session &s, std::uint16_t vcpu,
			      const LinuxKernelLayout &k);

} // namespace virtkit::tool
