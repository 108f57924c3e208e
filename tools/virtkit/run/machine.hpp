// SPDX-License-Identifier: MIT
/*
 * The PC that `virtkit run` builds on libvirtkit: guest RAM, KVM's
 * in-kernel PIC, IOAPIC, LAPICs and PIT, one thread per vCPU, and the few
 * devices Linux needs on a serial console (uart.hpp, cmos.hpp, the i8042's
 * reset line). Everything else is absent: port reads return all ones,
 * writes are dropped, and both are counted for --verbose.
 */
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "boot_loader.hpp"
#include "protect.hpp"

namespace virtkit::tool::run {

struct RunOptions {
	std::string device = "/dev/kvm";
	std::string kernel;
	std::string initrd;
	std::string cmdline = "console=ttyS0";
	std::uint64_t memory = 256ull << 20;
	std::uint32_t cpus = 1;
	Decompress decompress = Decompress::vmm;
	bool verbose = false;
	/* --introspect: the introspection tool's address (empty: none), and its secret. */
	std::string introspect;
	std::string secret;
	/* --protect, --protect-gpa, and --system-map's text (for symbols). */
	std::vector<ProtectRequest> protect;
	std::optional<std::string> system_map;
};

/* The exit statuses of `virtkit run` (Documentation/virtkit-run.rst). */
inline constexpr int exit_guest_stopped = 0;	/* poweroff, reboot, shutdown */
inline constexpr int exit_error = 1;
inline constexpr int exit_escape = 3;		/* the user typed Ctrl-A x */
/* A terminating signal N: 128 + N, as a shell reports it. */

/* Boot the kernel and run it until it stops; returns the exit status. */
int run_machine(const RunOptions &options);

} // namespace virtkit::tool::run
