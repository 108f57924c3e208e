// SPDX-License-Identifier: MIT
/*
 * The commands of the virtkit tool. Each command parses its own arguments
 * (everything after the command name) and returns the process exit status:
 * 0 success, 1 runtime failure, 2 usage error. virtkit::Error and other
 * exceptions that escape a command are reported by the dispatcher (exit 1).
 */
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace virtkit::tool {

using Args = std::span<const std::string_view>;

/* Exit status of a usage error (unknown command or option). */
inline constexpr int exit_usage = 2;

/* `virtkit info`: what this host offers virtkit (info.cpp). */
int info_main(Args args);
extern const char info_help[];

/* `virtkit demo`: a guest run end to end, explained (demo.cpp). */
int demo_main(Args args);
extern const char demo_help[];

/* `virtkit run`: boot a Linux kernel, the terminal as its console (run.cpp). */
int run_main(Args args);
extern const char run_help[];

/* `virtkit trace`: a VM's exits and SPP traps from KVM's tracepoints (trace/trace.cpp). */
int trace_main(Args args);
extern const char trace_help[];

/*
 * Print "virtkit COMMAND: message" and the command's help on stderr;
 * returns exit_usage (main.cpp).
 */
int usage_error(std::string_view command, const std::string &message);

/*
 * The options every command takes: -h/--help and --device PATH (the KVM
 * device, default /dev/kvm). Returns an exit status when the command must
 * stop (help printed, or a usage error), nothing when it should run.
 */
std::optional<int> parse_device_options(std::string_view command, const char *help, Args args,
					std::string &device);

/*
 * Advice for a /dev/kvm that cannot be opened or used, for the errno of
 * the failure: what is wrong and what to do (info.cpp).
 */
std::string kvm_advice(int err);

} // namespace virtkit::tool
