// SPDX-License-Identifier: MIT
/*
 * virtkit - command-line tool of libvirtkit.
 *
 *   virtkit info    what this host's KVM offers virtkit
 *   virtkit demo    run a small guest and explain what it shows
 *   virtkit run     boot a Linux kernel, the terminal as its serial console
 *   virtkit trace   count a VM's exits and SPP traps from KVM's tracepoints
 *
 * This file only dispatches: it finds the command, hands it the remaining
 * arguments, and turns exceptions that escape it into one line on stderr
 * and exit status 1.
 */
#include <cstdio>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include <virtkit/virtkit.hpp>
#include <virtkit/x86/guest_vm.hpp>

#include "commands.hpp"

namespace virtkit::tool {
namespace {

struct Command {
	const char *name;
	const char *summary;
	const char *help;
	int (*run)(Args args);
};

const Command commands[] = {
	{"info", "show what this host's KVM offers virtkit", info_help, info_main},
	{"demo", "run a small guest end to end and explain what it shows", demo_help,
	 demo_main},
	{"run", "boot a Linux kernel with the terminal as its serial console", run_help,
	 run_main},
	{"trace", "count a VM's exits and SPP traps per vCPU, live (BPF)", trace_help,
	 trace_main},
};

const Command *find(std::string_view name)
{
	for (auto &c : commands)
		if (name == c.name)
			return &c;
	return nullptr;
}

void usage(std::FILE *out)
{
	std::fprintf(out,
		     "usage: virtkit COMMAND [OPTIONS]\n"
		     "       virtkit help [COMMAND]\n"
		     "       virtkit --version\n"
		     "\n"
		     "Commands:\n");
	for (auto &c : commands)
		std::fprintf(out, "  %-8s %s\n", c.name, c.summary);
	std::fprintf(out, "\n'virtkit COMMAND --help' describes a command and its options.\n"
			  "Exit status: 0 success, 1 failure (the message names the "
			  "operation and errno), 2 usage error.\n");
}

int main_help(Args args)
{
	if (args.empty()) {
		usage(stdout);
		return 0;
	}
	const Command *c = find(args[0]);
	if (!c || args.size() > 1) {
		if (c)
			std::fprintf(stderr, "virtkit help: too many arguments\n\n");
		else
			std::fprintf(stderr, "virtkit help: unknown command '%.*s'\n\n",
				     int(args[0].size()), args[0].data());
		usage(stderr);
		return exit_usage;
	}
	std::fputs(c->help, stdout);
	return 0;
}

} // namespace

int usage_error(std::string_view command, const std::string &message)
{
	std::fprintf(stderr, "virtkit %.*s: %s\n\n", int(command.size()), command.data(),
		     message.c_str());
	if (const Command *c = find(command))
		std::fputs(c->help, stderr);
	else
		usage(stderr);
	return exit_usage;
}

std::optional<int> parse_device_options(std::string_view command, const char *help, Args args,
					std::string &device)
{
	for (std::size_t i = 0; i < args.size(); i++) {
		auto a = args[i];
		if (a == "-h" || a == "--help") {
			std::fputs(help, stdout);
			return 0;
		} else if (a == "--device" && i + 1 < args.size()) {
			device = args[++i];
		} else if (a.starts_with("--device=")) {
			device = a.substr(9);
		} else if (a == "--device") {
			return usage_error(command, "option --device needs a PATH");
		} else {
			return usage_error(command, "unknown option '" + std::string(a) + "'");
		}
	}
	return std::nullopt;
}

} // namespace virtkit::tool

int main(int argc, char **argv)
{
	using namespace virtkit::tool;

	std::vector<std::string_view> args(argv + 1, argv + argc);
	if (args.empty()) {
		std::fprintf(stderr, "virtkit: no command given\n\n");
		usage(stderr);
		return exit_usage;
	}
	std::string_view name = args[0];
	Args rest = Args(args).subspan(1);
	if (name == "help" || name == "--help" || name == "-h")
		return main_help(rest);
	if (name == "--version") {
		std::printf("virtkit %s\n", VIRTKIT_VERSION_STRING);
		return 0;
	}
	const Command *c = find(name);
	if (!c) {
		std::fprintf(stderr, "virtkit: unknown %s '%.*s'\n\n",
			     name.starts_with("-") ? "option" : "command", int(name.size()),
			     name.data());
		usage(stderr);
		return exit_usage;
	}

	try {
		return c->run(rest);
	} catch (const virtkit::Error &e) {
		std::fprintf(stderr, "virtkit %s: %s\n", c->name, e.what());
	} catch (const virtkit::x86::GuestFailure &e) {
		std::fprintf(stderr, "virtkit %s: guest failed: %s\n", c->name, e.what());
	} catch (const std::exception &e) {
		std::fprintf(stderr, "virtkit %s: %s\n", c->name, e.what());
	}
	return 1;
}
