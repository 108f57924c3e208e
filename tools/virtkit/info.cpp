// SPDX-License-Identifier: MIT
/*
 * virtkit info - what this host offers virtkit.
 *
 * Every answer is a question asked of the kernel (KVM_CHECK_EXTENSION,
 * KVM_GET_SUPPORTED_CPUID, KVM_GET_MSR_INDEX_LIST, stat of /dev/virtkit and
 * its VIRTKIT_GET_API_VERSION and VIRTKIT_CHECK_EXTENSION) or, for which
 * backend a feature runs with, of the library on a scratch VM;
 * nothing is inferred from CPU models or kernel versions. Capabilities that
 * KVM answers per VM are asked on the fd of a scratch VM: the /dev/kvm answer
 * is only a default, and the features use them per VM.
 *
 * The output is one "key: value" line per fact, aligned, under section
 * headers, with keys unique across sections so that `grep KEY` finds one
 * line. Keep keys stable: scripts read them.
 */
#include <fcntl.h>
#include <linux/virtkit.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <virtkit/introspect.hpp>
#include <virtkit/introspection.hpp>
#include <virtkit/platform.hpp>
#include <virtkit/x86/guest_probes.hpp>
#include <virtkit/virtkit.hpp>

#include <linux/virtkit_kvmi.h> /* event ids */

#include "commands.hpp"
#include "../common/json.hpp"

/* Newer than Debian 12's kernel headers (6.1); ABI values never change. */
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif

namespace virtkit::tool {

const char info_help[] =
	"usage: virtkit info [--json] [--device PATH]\n"
	"\n"
	"Show what this host offers virtkit: the KVM device and API version, the\n"
	"KVM capabilities virtkit's features rely on (asked on /dev/kvm, or on a\n"
	"scratch VM where KVM answers per VM), the CPUID leaves and MSRs KVM\n"
	"supports, whether the virtkit kernel module (/dev/virtkit) is present with\n"
	"its API version and capabilities, and for each feature which backend this\n"
	"host could run and why not, and which one SubpageProtection::enable() picks.\n"
	"\n"
	"Options:\n"
	"  --json          the same as one JSON object: a member per section, each\n"
	"                  an object of the section's fields (strings, as shown)\n"
	"  --device PATH   KVM device to probe (default /dev/kvm)\n"
	"  -h, --help      show this help\n"
	"\n"
	"Exit status: 0 when KVM is usable (the device opens and a VM can be\n"
	"created), 1 when it is not (the reason and what to do go to stderr),\n"
	"2 on a usage error.\n";

namespace {

constexpr const char *virtkit_device = "/dev/" VIRTKIT_DEVICE_NAME;

/* Where KVM answers a capability. */
enum class Scope { system, vm };

/* How a capability's KVM_CHECK_EXTENSION value is shown. */
enum class Show {
	flag,	/* "yes" / "no" */
	number,	/* the value itself */
	amount,	/* "yes (VALUE UNIT)" / "no" */
	mask,	/* "yes (UNIT 0xVALUE)" / "no" */
};

struct CapQuery {
	const char *name;
	long cap;
	Scope scope;
	Show show;
	const char *unit;
};

const CapQuery cap_queries[] = {
	{"KVM_CAP_SET_GUEST_DEBUG", KVM_CAP_SET_GUEST_DEBUG, Scope::system, Show::flag, ""},
	{"KVM_CAP_GUEST_DEBUG_HW_BPS", KVM_CAP_GUEST_DEBUG_HW_BPS, Scope::system, Show::amount,
	 "breakpoints"},
	{"KVM_CAP_MEMORY_FAULT_INFO", KVM_CAP_MEMORY_FAULT_INFO, Scope::system, Show::flag, ""},
	{"KVM_CAP_SYNC_REGS", KVM_CAP_SYNC_REGS, Scope::system, Show::mask, "register sets"},
	{"KVM_CAP_IMMEDIATE_EXIT", KVM_CAP_IMMEDIATE_EXIT, Scope::system, Show::flag, ""},
	{"KVM_CAP_XSAVE2", KVM_CAP_XSAVE2, Scope::system, Show::amount, "bytes of XSAVE state"},
	{"KVM_CAP_NR_VCPUS", KVM_CAP_NR_VCPUS, Scope::system, Show::number, ""},
	{"KVM_CAP_MAX_VCPUS", KVM_CAP_MAX_VCPUS, Scope::system, Show::number, ""},
	{"KVM_CAP_READONLY_MEM", KVM_CAP_READONLY_MEM, Scope::vm, Show::flag, ""},
	{"KVM_CAP_X86_USER_SPACE_MSR", KVM_CAP_X86_USER_SPACE_MSR, Scope::vm, Show::flag, ""},
	{"KVM_CAP_X86_MSR_FILTER", KVM_CAP_X86_MSR_FILTER, Scope::vm, Show::flag, ""},
	{"KVM_CAP_DIRTY_LOG_RING", KVM_CAP_DIRTY_LOG_RING, Scope::vm, Show::amount,
	 "bytes max per vCPU"},
	{"KVM_CAP_DIRTY_LOG_RING_ACQ_REL", KVM_CAP_DIRTY_LOG_RING_ACQ_REL, Scope::vm, Show::flag,
	 ""},
	{"KVM_CAP_NR_MEMSLOTS", KVM_CAP_NR_MEMSLOTS, Scope::vm, Show::number, ""},
};

/* virtkit.ko's capabilities (VIRTKIT_CHECK_EXTENSION on /dev/virtkit). */
const CapQuery module_cap_queries[] = {
	{"VIRTKIT_CAP_SPP", VIRTKIT_CAP_SPP, Scope::system, Show::flag, ""},
	{"VIRTKIT_CAP_SPP_FAST_WRITE", VIRTKIT_CAP_SPP_FAST_WRITE, Scope::system, Show::flag, ""},
	{"VIRTKIT_CAP_SPP_MAX_PAGES", VIRTKIT_CAP_SPP_MAX_PAGES, Scope::system, Show::number, ""},
	{"VIRTKIT_CAP_PKS", VIRTKIT_CAP_PKS, Scope::system, Show::flag, ""},
};

/* Everything probed, before anything is printed. */
struct HostFacts {
	std::string device;
	std::string kernel;
	std::optional<Error> kvm_error;	/* opening /dev/kvm failed */
	int api_version = 0;
	std::size_t vcpu_mmap_size = 0;
	std::optional<Error> vm_error;	/* creating the scratch VM failed */
	std::vector<int> caps;		/* per cap_queries entry; -1: not asked */
	std::size_t cpuid_entries = 0;
	std::size_t msrs = 0;
	std::size_t feature_msrs = 0;
	std::string vendor;
	bool pku = false;
	PksSupport pks;			/* guest PKS: the library's detection */
	bool virtkit_present = false;
	std::string virtkit_state;
	/* With /dev/virtkit present: why asking it failed, or its answers. */
	std::optional<Error> virtkit_error;
	int virtkit_api_version = 0;
	std::vector<int> module_caps;	/* per module_cap_queries entry */
	/* With /dev/virtkit present: why SubpageProtection::enable() refused the kmod backend. */
	std::optional<std::string> spp_kmod_error;
	/* What SubpageProtection::enable() picks by default, or why it failed. */
	std::string spp_automatic;
	/* The backend a tool's introspect::EventLoop gets here (no KVM needed). */
	std::string event_loop;
	/* Paging features of KVM_GET_SUPPORTED_CPUID (a guest gets at most these). */
	bool smep = false, smap = false, page1gb = false, la57 = false;
	/* A new vCPU's TSC rate (KVM_GET_TSC_KHZ), 0 if unknown. */
	std::uint32_t tsc_khz = 0;
	/* The platform probes (virtkit/platform.hpp), with a VM only. */
	std::vector<std::pair<std::string, Probe>> probes;
};

int cap(const HostFacts &f, long which)
{
	for (std::size_t i = 0; i < std::size(cap_queries); i++)
		if (cap_queries[i].cap == which)
			return f.caps[i] < 0 ? 0 : f.caps[i];
	return 0;
}

std::string cpuid_vendor(const std::vector<kvm_cpuid_entry2> &cpuid)
{
	for (auto &e : cpuid) {
		if (e.function != 0)
			continue;
		char s[13];
		std::memcpy(s, &e.ebx, 4);
		std::memcpy(s + 4, &e.edx, 4);
		std::memcpy(s + 8, &e.ecx, 4);
		s[12] = 0;
		return s;
	}
	return "unknown";
}

void probe_kvm(HostFacts &f)
{
	std::optional<System> sys;
	try {
		sys.emplace(System::open(f.device.c_str()));
	} catch (const Error &e) {
		f.kvm_error = e;
		return;
	}
	f.api_version = sys->api_version();
	f.vcpu_mmap_size = sys->vcpu_mmap_size();

	std::optional<Vm> vm;
	try {
		vm.emplace(sys->create_vm());
	} catch (const Error &e) {
		f.vm_error = e;
	}
	for (auto &q : cap_queries) {
		if (q.scope == Scope::system)
			f.caps.push_back(sys->check_extension(q.cap));
		else
			f.caps.push_back(vm ? vm->check_extension(q.cap) : -1);
	}

	auto cpuid = sys->supported_cpuid();
	f.cpuid_entries = cpuid.size();
	f.vendor = cpuid_vendor(cpuid);
	for (auto &e : cpuid) {
		if (e.function == 7 && e.index == 0) {
			f.pku = e.ecx >> 3 & 1;
			f.smep = e.ebx >> 7 & 1;
			f.smap = e.ebx >> 20 & 1;
			f.la57 = e.ecx >> 16 & 1;
		}
		if (e.function == 0x80000001)
			f.page1gb = e.edx >> 26 & 1;
	}
	f.msrs = sys->msr_index_list().size();
	f.pks = sys->pks_support();
	f.feature_msrs = sys->feature_msr_index_list().size();

	if (vm) {
		try {
			f.tsc_khz = vm->create_vcpu(0).tsc_khz();
		} catch (const Error &) {
		}
	}

	/* SPP backends: ask the library, each on a VM of its own. */
	if (!vm) {
		f.spp_kmod_error = "no VM could be created";
		f.spp_automatic = "unknown (no VM could be created)";
		return;
	}
	if (f.virtkit_present) {
		try {
			Vm scratch = sys->create_vm();
			SubpageProtection::enable(scratch, {.backend = SppBackendKind::kmod});
		} catch (const Error &e) {
			f.spp_kmod_error = e.what();
		}
	}
	try {
		Vm scratch = sys->create_vm();
		auto kind = SubpageProtection::enable(scratch).backend();
		f.spp_automatic = kind == SppBackendKind::kmod ? "kmod" : "user";
	} catch (const Error &e) {
		f.spp_automatic = std::string("none: ") + e.what();
	}
	if (const char *env = std::getenv("VIRTKIT_SPP_BACKEND"); env && *env)
		f.spp_automatic += std::string(" (VIRTKIT_SPP_BACKEND=") + env + ")";

	f.probes = {
		{"int3 in a guest", platform::guest_int3(*sys)},
		{"int3 with guest debugging", platform::guest_debug_int3(*sys)},
		{"xgetbv in a guest", platform::guest_xgetbv(*sys)},
		{"2 MiB mappings", platform::large_mappings(*sys)},
		{"cmpxchg16b in a guest", platform::guest_cmpxchg16b(*sys)},
	};
}

void probe_module(HostFacts &f)
{
	struct stat st;
	if (::stat(virtkit_device, &st) == 0) {
		f.virtkit_present = S_ISCHR(st.st_mode);
		f.virtkit_state = f.virtkit_present ? "present"
						    : "present but not a character device";
	} else if (errno == ENOENT) {
		f.virtkit_state = "absent (the virtkit kernel module is not loaded)";
	} else {
		f.virtkit_state = "cannot tell: " + format_error("stat", errno, virtkit_device,
								 Error::VmState::unknown);
	}
	if (!f.virtkit_present)
		return;
	try {
		FileDesc dev = FileDesc::open(virtkit_device, O_RDWR | O_CLOEXEC);
		f.virtkit_api_version = ::ioctl(dev.get(), VIRTKIT_GET_API_VERSION, 0);
		if (f.virtkit_api_version < 0)
			throw Error("VIRTKIT_GET_API_VERSION", errno, virtkit_device);
		for (auto &q : module_cap_queries) {
			int v = ::ioctl(dev.get(), VIRTKIT_CHECK_EXTENSION, q.cap);
			if (v < 0)
				throw Error("VIRTKIT_CHECK_EXTENSION", errno, q.name);
			f.module_caps.push_back(v);
		}
	} catch (const Error &e) {
		f.virtkit_error = e;
	}
}

HostFacts probe(const std::string &device)
{
	HostFacts f;
	f.device = device;
	struct utsname u;
	f.kernel = ::uname(&u) == 0 ? std::string(u.sysname) + " " + u.release + " " + u.machine
				    : "unknown";
	probe_module(f);
	probe_kvm(f);
	try {
		f.event_loop = introspect::EventLoop({}).backend();
	} catch (const Error &e) {
		f.event_loop = std::string("none: ") + e.what();
	}
	return f;
}

/* Printing. */

constexpr int key_width = 32;

/* Text (sections of "key: value" lines) or, with --json, one JSON object. */
struct Output {
	bool json = false;
	bool any_section = false, any_field = false;
} out;

void section(const char *title)
{
	if (out.json)
		std::printf("%s\n  %s: {", out.any_section ? "\n  }," : "{", virtkit::tool::json_string(title).c_str());
	else
		std::printf("%s%s\n", out.any_section ? "\n" : "", title);
	out.any_section = true;
	out.any_field = false;
}

void field(const std::string &key, const std::string &value)
{
	if (out.json)
		std::printf("%s\n    %s: %s", out.any_field ? "," : "", virtkit::tool::json_string(key).c_str(),
			    virtkit::tool::json_string(value).c_str());
	else
		std::printf("  %-*s %s\n", key_width, (key + ":").c_str(), value.c_str());
	out.any_field = true;
}

/* Ends the JSON object (nothing for text). */
void finish()
{
	if (out.json)
		std::printf("%s\n", out.any_section ? "\n  }\n}" : "{}");
}

std::string yes_no(bool b) { return b ? "yes" : "no"; }

std::string cap_value(const CapQuery &q, int v)
{
	if (v < 0)
		return "unknown (no VM could be created)";
	char buf[64];
	switch (q.show) {
	case Show::flag:
		return yes_no(v > 0);
	case Show::number:
		return std::to_string(v);
	case Show::amount:
		return v > 0 ? "yes (" + std::to_string(v) + " " + q.unit + ")" : "no";
	case Show::mask:
		std::snprintf(buf, sizeof(buf), "yes (%s 0x%x)", q.unit, unsigned(v));
		return v > 0 ? buf : "no";
	}
	return "?";
}

/* "ready" or "not ready: needs A, B" for a backend's prerequisites. */
struct Need {
	bool met;
	const char *what;
};

std::string readiness(std::initializer_list<Need> needs)
{
	std::string missing;
	for (auto &n : needs)
		if (!n.met)
			missing += (missing.empty() ? "" : ", ") + std::string(n.what);
	if (!missing.empty())
		return "host not ready: needs " + missing;
	std::string has;
	for (auto &n : needs)
		has += (has.empty() ? "" : ", ") + std::string(n.what);
	return "host ready: has " + has;
}

void print_features(const HostFacts &f)
{
	bool ro = cap(f, KVM_CAP_READONLY_MEM);
	bool umsr = cap(f, KVM_CAP_X86_USER_SPACE_MSR);
	bool filter = cap(f, KVM_CAP_X86_MSR_FILTER);
	bool spp_kmod = f.virtkit_present && !f.spp_kmod_error;

	section("Features (SPP, KVMI and the PKS page-walk engine are implemented)");
	if (ro || spp_kmod)
		field("spp", std::string("available with the ") +
				     (ro && spp_kmod ? "user and kmod backends"
				      : ro	     ? "user backend"
						     : "kmod backend") +
				     " (SubpageProtection::enable())");
	else
		field("spp", "not available on this host: no backend can run (see below)");
	field("spp user backend", std::string(ro ? "available" : "not available") +
					  ": read-only memslots; requires KVM_CAP_READONLY_MEM: " +
					  yes_no(ro));
	if (spp_kmod)
		field("spp kmod backend", "available: needs /dev/virtkit: present");
	else if (f.virtkit_present)
		field("spp kmod backend", "not available: needs /dev/virtkit: present, but " +
						  *f.spp_kmod_error);
	else
		field("spp kmod backend", "not available: needs /dev/virtkit: absent "
					  "(virtkit.ko not loaded)");
	field("spp automatic backend", f.spp_automatic);
	/* KVMI runs in userspace; its write restrictions use the SPP backend. */
	const std::string kvmi_needs = readiness({{ro, "KVM_CAP_READONLY_MEM"},
						  {umsr, "KVM_CAP_X86_USER_SPACE_MSR"},
						  {filter, "KVM_CAP_X86_MSR_FILTER"}});
	field("kvmi", (ro && umsr && filter ? "available (virtkit::Introspection): "
					     : "not available: ") +
			      kvmi_needs);
	if (ro && umsr && filter) {
		std::string bp;
		try {
			auto ev = Introspection::supported_events();
			bp = std::find(ev.begin(), ev.end(), KVMI_EVENT_BREAKPOINT) != ev.end()
				     ? "available: an INT3 in a guest reaches the VMM"
				     : "not available: an INT3 in a guest does not reach the VMM "
				       "on this host (probed)";
		} catch (const Error &e) {
			bp = std::string("unknown: the probe failed: ") + e.what();
		}
		field("kvmi breakpoint events", bp);
		field("kvmi page restrictions", "through the spp backend: " + f.spp_automatic);
	}
	field("kvmi tool event loop", f.event_loop);
	field("pks", "page-walk engine available on any host: Vcpu::translate(gva, access) "
		     "gives the gpa or the exact #PF/#GP, protection keys (PKRU, IA32_PKRS), "
		     "SMEP, SMAP, WP and NX included");
	field("pks guest support",
	      f.pks.available()
		      ? std::string("available: host KVM offers PKS (KVM_GET_SUPPORTED_CPUID "
				    "(7,0):ECX[31], IA32_PKRS (0x6e1) in KVM_GET_MSR_INDEX_LIST)")
		      : "not available: host KVM does not offer PKS: " + f.pks.missing() +
				" (guest PKS needs KVM's own PKS virtualization; "
				"virtkit.ko cannot add it)");
}

void print(const HostFacts &f)
{
	section("Host");
	field("kernel", f.kernel);
	field("virtkit", VIRTKIT_VERSION_STRING);

	section("KVM device");
	field("device", f.device);
	if (f.kvm_error) {
		field("usable", "no: " + std::string(f.kvm_error->what()));
	} else {
		field("usable", f.vm_error ? "no: " + std::string(f.vm_error->what())
					 : "yes (opened, created a VM)");
		field("api version", std::to_string(f.api_version));
		field("vcpu mmap size", std::to_string(f.vcpu_mmap_size) + " bytes");
	}

	if (!f.kvm_error) {
		for (auto scope : {Scope::system, Scope::vm}) {
			section(scope == Scope::system ? "Capabilities (asked on the KVM device)"
						       : "Capabilities (asked on a VM)");
			for (std::size_t i = 0; i < std::size(cap_queries); i++) {
				auto &q = cap_queries[i];
				if (q.scope == scope)
					field(q.name, cap_value(q, f.caps[i]));
			}
		}

		section("CPUID and MSRs (what KVM can give a guest)");
		field("cpu vendor", f.vendor);
		field("supported cpuid entries", std::to_string(f.cpuid_entries));
		field("msr index list", std::to_string(f.msrs) + " MSRs");
		field("feature msr index list", std::to_string(f.feature_msrs) + " MSRs");
		field("cpuid pku (7,0):ECX[3]", yes_no(f.pku));
		field("cpuid pks (7,0):ECX[31]", yes_no(f.pks.cpuid));
		field("msr 0x6E1 IA32_PKRS listed", yes_no(f.pks.msr));
		field("cpuid smep (7,0):EBX[7]", yes_no(f.smep));
		field("cpuid smap (7,0):EBX[20]", yes_no(f.smap));
		field("cpuid la57 (7,0):ECX[16]", yes_no(f.la57));
		field("cpuid page1gb 0x80000001:EDX[26]", yes_no(f.page1gb));
		field("guest tsc rate", f.tsc_khz ? std::to_string(f.tsc_khz) + " kHz (KVM_GET_TSC_KHZ)"
						  : "unknown");
	}

	if (!f.probes.empty()) {
		section("Platform probes (tiny guests; selftests skip on what they find)");
		for (auto &[name, p] : f.probes)
			field(name, p.describe());
	}

	section("virtkit kernel module");
	field("module device", std::string(virtkit_device) + ": " + f.virtkit_state);
	if (f.virtkit_error) {
		field("module usable", std::string("no: ") + f.virtkit_error->what());
	} else if (f.virtkit_present) {
		field("module api version",
		      std::to_string(f.virtkit_api_version) +
			      (f.virtkit_api_version == VIRTKIT_API_VERSION
				       ? " (libvirtkit speaks it)"
				       : " (libvirtkit speaks " +
						 std::to_string(VIRTKIT_API_VERSION) + ")"));
		for (std::size_t i = 0; i < std::size(module_cap_queries); i++)
			field(module_cap_queries[i].name,
			      cap_value(module_cap_queries[i], f.module_caps[i]));
	}

	if (!f.kvm_error)
		print_features(f);
}

} // namespace

std::string kvm_advice(int err)
{
	/* Lines of at most ~76 columns; the caller indents them by two. */
	switch (err) {
	case ENOENT:
	case ENODEV:
	case ENXIO:
		return "This host offers no KVM device. Load the KVM module of your CPU\n"
		       "  (modprobe kvm-intel or kvm-amd), enable VT-x/AMD-V in the firmware,\n"
		       "  or, inside a virtual machine, enable nested virtualization. Without\n"
		       "  /dev/kvm, 'make run' runs the demo on nested KVM in a Debian guest\n"
		       "  under QEMU (scripts/vmtest).";
	case EACCES:
	case EPERM:
		return "You may not open the KVM device: run as root, or join the group that\n"
		       "  owns it (usually kvm): sudo usermod -aG kvm \"$USER\", then log in\n"
		       "  again.";
	case ENOTSUP:
		return "The device does not speak KVM API version 12, which virtkit needs.";
	case ENOTTY:
	case EINVAL:
		return "The device did not answer KVM ioctls: it is not a KVM device.";
	case EBUSY:
		return "KVM refused a new VM: another hypervisor may own the virtualization\n"
		       "  extensions (stop it), or the KVM module failed to initialise (dmesg).";
	default:
		return "See dmesg for what the KVM module reports.";
	}
}

int info_main(Args args)
{
	std::string device = "/dev/kvm";
	std::vector<std::string_view> rest;
	for (std::string_view a : args) {
		if (a == "--json")
			out.json = true;
		else
			rest.push_back(a);
	}
	if (auto stop = parse_device_options("info", info_help, rest, device))
		return *stop;

	HostFacts f = probe(device);
	print(f);
	finish();
	std::fflush(stdout);

	const auto &err = f.kvm_error ? f.kvm_error : f.vm_error;
	if (err) {
		std::fprintf(stderr, "virtkit info: %s is not usable: %s\n  %s\n", device.c_str(),
			     err->what(), kvm_advice(err->err()).c_str());
		return 1;
	}
	return 0;
}

} // namespace virtkit::tool
