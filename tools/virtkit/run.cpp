// SPDX-License-Identifier: MIT
/*
 * virtkit run - boot a Linux kernel on libvirtkit, the terminal as its
 * serial console. This file parses the options; run/ is the VMM
 * (run/machine.cpp builds the machine, run/boot_loader.cpp loads the
 * kernel). Documentation/virtkit-run.rst.
 */
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "../common/kernel_image.hpp"
#include "../common/listen_address.hpp"
#include "../common/secret.hpp"
#include "commands.hpp"
#include "run/boot_loader.hpp"
#include "run/machine.hpp"

namespace virtkit::tool {

const char run_help[] =
	"usage: virtkit run --kernel BZIMAGE [--initrd FILE] [--cmdline STRING]\n"
	"                   [--memory SIZE] [--cpus N] [--decompress vmm|guest]\n"
	"                   [--introspect ADDRESS [--secret-file PATH | --secret-fd N]]\n"
	"                   [--protect SYMBOL[+OFF]:LEN]... [--protect-gpa GPA:LEN]...\n"
	"                   [--system-map FILE]\n"
	"                   [--verbose] [--device PATH]\n"
	"\n"
	"Boot a Linux kernel (an x86-64 bzImage, Linux x86 boot protocol 2.12 or\n"
	"later, entered at its 64-bit entry) with an optional initramfs. The VM has\n"
	"KVM's in-kernel interrupt controllers and PIT, an MP table with N CPUs,\n"
	"a 16550A UART at 0x3f8 (IRQ 4, the guest's ttyS0) connected to this\n"
	"terminal, and a CMOS clock. There is no ACPI, PCI or disk: boot with\n"
	"console=ttyS0 and an initramfs.\n"
	"\n"
	"The terminal is raw while the guest runs: keys go to the guest, Ctrl-C\n"
	"included. Ctrl-A x quits, Ctrl-A a sends Ctrl-A, Ctrl-A h lists the keys.\n"
	"\n"
	"Options:\n"
	"  --kernel BZIMAGE  the kernel to boot (required)\n"
	"  --initrd FILE     an initramfs (cpio, compressed as the kernel accepts)\n"
	"  --cmdline STRING  the kernel command line (default \"console=ttyS0\")\n"
	"  --memory SIZE     guest RAM: a number of MiB or with a K, M or G suffix\n"
	"                    (default 256M)\n"
	"  --cpus N          vCPUs, 1 to 254 (default 1)\n"
	"  --decompress vmm  (default) the VMM decompresses the bzImage's payload (xz\n"
	"                    or zstd) and enters vmlinux's startup_64 (no KASLR)\n"
	"  --decompress guest  load the bzImage as it is and enter its startup_64 at\n"
	"                    code32_start + 0x200: the kernel decompresses itself\n"
	"                    (minutes where KVM emulates the guest kernel: kvm_pvm)\n"
	"  --introspect ADDRESS  serve the VM to a KVMI introspection tool listening\n"
	"                    at ADDRESS (unix:/path or vsock:CID:PORT) from boot on:\n"
	"                    the VM connects when the tool listens, and again after\n"
	"                    it disconnects (virtkit-introspect --processes lists\n"
	"                    the guest's processes)\n"
	"  --secret-file PATH  the secret the tool was given (with --introspect)\n"
	"  --secret-fd N     the same, read from descriptor N (then closed)\n"
	"  --protect SYMBOL[+OFF]:LEN  write-protect LEN bytes of guest kernel data at\n"
	"                    SYMBOL+OFF with sub-page protection (SPP), from the first\n"
	"                    instruction on: a guest write there is not performed, is\n"
	"                    reported here, and the guest runs on (writes to the rest\n"
	"                    of the 128-byte sub-pages it touches trap, and are\n"
	"                    performed). SYMBOL is one the kernel exports (such as\n"
	"                    overflowuid) or, with --system-map, any. The SPP backend\n"
	"                    is virtkit.ko's when /dev/virtkit exists\n"
	"                    (VIRTKIT_SPP_BACKEND=user|kmod chooses)\n"
	"  --protect-gpa GPA:LEN  the same for a guest-physical range\n"
	"  --system-map FILE  the kernel's System.map, for --protect symbols it does\n"
	"                    not export (Debian's /boot/System.map-* is a placeholder)\n"
	"  --verbose         print where the kernel went and, at the end, how many\n"
	"                    exits the VMM handled, which ports and MMIO pages the\n"
	"                    guest touched where there is no device, where each vCPU\n"
	"                    stood and the console interrupt's state\n"
	"  --device PATH     KVM device to use (default /dev/kvm)\n"
	"  -h, --help        show this help\n"
	"\n"
	"Exit status: 0 the guest powered off or rebooted (reboot, poweroff -f with\n"
	"reboot=t, a triple fault), 1 error (the message says which), 2 usage\n"
	"error, 3 quit with Ctrl-A x, 128+N stopped by signal N (SIGINT, SIGTERM,\n"
	"SIGHUP, SIGQUIT). The terminal is restored on every one of them.\n";

namespace {

/* "256M", "1G", "65536K", "512" (MiB). */
bool parse_size(std::string_view s, std::uint64_t &out)
{
	if (s.empty() || s[0] < '0' || s[0] > '9')
		return false;
	std::string str(s);
	char *end = nullptr;
	errno = 0;
	unsigned long long v = std::strtoull(str.c_str(), &end, 10);
	if (errno)
		return false;
	std::string_view unit(end);
	int shift = unit.empty() || unit == "M" || unit == "m" || unit == "MiB" ? 20 :
		    unit == "G" || unit == "g" || unit == "GiB"			? 30 :
		    unit == "K" || unit == "k" || unit == "KiB"			? 10 :
											  -1;
	if (shift < 0 || v > (~0ull >> shift))
		return false;
	out = std::uint64_t(v) << shift;
	return true;
}

bool parse_u32(std::string_view s, std::uint32_t &out)
{
	if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != s.npos)
		return false;
	out = std::uint32_t(std::stoul(std::string(s)));
	return true;
}

} // namespace

int run_main(Args args)
{
	run::RunOptions o;
	std::string memory, cpus, decompress, secret_file, secret_fd, system_map;
	std::vector<std::string> protect, protect_gpa;
	for (std::size_t i = 0; i < args.size(); i++) {
		std::string_view a = args[i];
		if (a == "-h" || a == "--help") {
			std::fputs(run_help, stdout);
			return 0;
		}
		if (a == "--verbose" || a == "-v") {
			o.verbose = true;
			continue;
		}
		std::string_view name = a, value;
		bool inline_value = false;
		if (auto eq = a.find('='); a.starts_with("--") && eq != a.npos) {
			name = a.substr(0, eq);
			value = a.substr(eq + 1);
			inline_value = true;
		}
		std::string *target = name == "--kernel"  ? &o.kernel :
				      name == "--initrd"  ? &o.initrd :
				      name == "--cmdline" ? &o.cmdline :
				      name == "--memory"  ? &memory :
				      name == "--cpus"	  ? &cpus :
				      name == "--device"  ? &o.device :
				      name == "--decompress" ? &decompress :
				      name == "--introspect" ? &o.introspect :
				      name == "--secret-file" ? &secret_file :
				      name == "--secret-fd" ? &secret_fd :
				      name == "--system-map" ? &system_map :
							    nullptr;
		/* Options that may be given more than once. */
		std::vector<std::string> *list = name == "--protect"	 ? &protect :
						 name == "--protect-gpa" ? &protect_gpa :
									   nullptr;
		if (!target && !list)
			return usage_error("run", "unknown option '" + std::string(a) + "'");
		if (!inline_value) {
			if (i + 1 >= args.size())
				return usage_error("run", "option " + std::string(name) + " needs a value");
			value = args[++i];
		}
		if (list)
			list->emplace_back(value);
		else
			*target = std::string(value);
	}
	if (o.kernel.empty())
		return usage_error("run", "--kernel BZIMAGE is required");
	if (!memory.empty()) {
		if (!parse_size(memory, o.memory))
			return usage_error("run", "--memory '" + memory +
							  "': not a size (a number of MiB, or with K, M or G)");
		if (o.memory < (16ull << 20) || o.memory % GuestMemory::page_size)
			return usage_error("run", "--memory '" + memory +
							  "': give at least 16M, in whole 4 KiB pages");
		if (o.memory > (1ull << 40))
			return usage_error("run", "--memory '" + memory + "': at most 1T");
	}
	if (!cpus.empty() && (!parse_u32(cpus, o.cpus) || o.cpus < 1 || o.cpus > 254))
		return usage_error("run", "--cpus '" + cpus + "': give 1 to 254");
	if (!secret_file.empty() && !secret_fd.empty())
		return usage_error("run", "--secret-file and --secret-fd exclude each other");
	if ((!secret_file.empty() || !secret_fd.empty()) && o.introspect.empty())
		return usage_error("run", "--secret-file and --secret-fd go with --introspect");
	try {
		if (!secret_file.empty())
			o.secret = read_secret_file(secret_file);
		else if (!secret_fd.empty())
			o.secret = read_secret_fd_arg(secret_fd);
	} catch (const Error &e) {
		std::fprintf(stderr, "virtkit run: %s\n", e.what());
		return 1;
	}
	if (std::string why = unusable_listen_address(o.introspect); !why.empty()) {
		std::fprintf(stderr, "virtkit run: --introspect %s: %s\n", o.introspect.c_str(),
			     why.c_str());
		return 1;
	}
	for (bool gpa : {false, true})
		for (const std::string &spec : gpa ? protect_gpa : protect) {
			auto r = run::parse_protect(spec, gpa);
			if (!r)
				return usage_error("run", std::string(gpa ? "--protect-gpa '" : "--protect '") +
								  spec + "': give " +
								  (gpa ? "GPA:LEN" : "SYMBOL[+OFF]:LEN") +
								  " (numbers decimal or 0x hex, LEN at least 1)");
			o.protect.push_back(*r);
		}
	if (!system_map.empty() && protect.empty())
		return usage_error("run", "--system-map goes with --protect");
	if (!system_map.empty()) {
		try {
			auto text = read_whole_file(system_map, "--system-map");
			o.system_map = std::string(reinterpret_cast<const char *>(text.data()), text.size());
		} catch (const Error &e) {
			std::fprintf(stderr, "virtkit run: %s\n", e.what());
			return 1;
		}
	}
	if (decompress == "guest")
		o.decompress = run::Decompress::guest;
	else if (!decompress.empty() && decompress != "vmm")
		return usage_error("run", "--decompress '" + decompress + "': give vmm or guest");

	try {
		return run::run_machine(o);
	} catch (const run::BootError &e) {
		std::fprintf(stderr, "virtkit run: %s: %s\n", o.kernel.c_str(), e.what());
		return 1;
	}
}

} // namespace virtkit::tool
