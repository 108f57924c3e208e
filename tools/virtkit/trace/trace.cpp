// SPDX-License-Identifier: MIT
/*
 * virtkit trace - where a VM's exits and SPP traps come from, live, without
 * touching its VMM (Documentation/trace.rst).
 *
 * The BPF programs of trace.bpf.c (embedded as a bpftool skeleton, CO-RE
 * against the kernel's BTF) count on KVM's tracepoints; this side checks what
 * they need (kernel BTF, tracefs with the kvm events, the pid, the
 * privileges), loads and attaches them, and every --interval reads their
 * maps and prints a table per vCPU, or one JSON object with --json.
 */
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../commands.hpp"
#include "trace.skel.h"
#include "trace_abi.h"

namespace virtkit::tool {

const char trace_help[] =
	"usage: virtkit trace [--pid PID] [--interval SECONDS] [--duration SECONDS]\n"
	"                     [--json] [--verbose]\n"
	"\n"
	"Count a VM's exits from outside its VMM, with BPF programs on KVM's\n"
	"tracepoints (kvm_exit, kvm_entry, kvm_page_fault, kvm_mmio, kvm_msr,\n"
	"kvm_cr, kvm_pio, mark_mmio_spte): per vCPU of each VM process, exits by reason, SPP traps\n"
	"(guest writes to pages KVM maps read-only, handed to the VMM as MMIO: the\n"
	"user backend's protected pages) by guest page, MMIO, MSR, CR and port I/O\n"
	"exits, and a log2 histogram of the time from each exit to the vCPU's next\n"
	"entry. The counts are totals since the start; the table is shown again\n"
	"every interval, until Ctrl-C, --duration, or the traced process ends.\n"
	"\n"
	"Options:\n"
	"  --pid PID           trace only the VM process PID (default: every\n"
	"                      process running KVM guests); stops when PID ends\n"
	"  --interval SECONDS  refresh period (default 1; fractions allowed)\n"
	"  --duration SECONDS  stop after this long (default: until Ctrl-C)\n"
	"  --json              one JSON object per line per interval instead of the\n"
	"                      table; the last one has \"final\": true\n"
	"  --verbose           show libbpf's messages\n"
	"  -h, --help          show this help\n"
	"\n"
	"Needs root (CAP_BPF and CAP_PERFMON), kernel BTF (/sys/kernel/btf/vmlinux)\n"
	"and tracefs with the kvm events (/sys/kernel/tracing/events/kvm).\n"
	"Exit status: 0 success, 1 failure (the message names the cause), 2 usage\n"
	"error.\n";

namespace {

/* --- the skeleton as a move-only owner: destroy() detaches and closes everything --- */

struct SkelDestroy {
	void operator()(trace_bpf *s) const noexcept { trace_bpf__destroy(s); }
};
using Skeleton = std::unique_ptr<trace_bpf, SkelDestroy>;

/* libbpf's messages, kept for the error that follows them (or shown with --verbose). */
std::string libbpf_log;
bool libbpf_verbose = false;

int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	if (level == LIBBPF_DEBUG)
		return 0;
	char buf[1024];
	int n = std::vsnprintf(buf, sizeof(buf), fmt, ap);
	if (libbpf_verbose)
		std::fprintf(stderr, "libbpf: %s", buf);
	libbpf_log += buf;
	return n;
}

[[noreturn]] void fail(const std::string &what)
{
	throw std::runtime_error(what);
}

/* An operation's failure with its errno, and advice for the errnos that have one. */
[[noreturn]] void fail_errno(const std::string &op, int err)
{
	if (err == EPERM || err == EACCES)
		fail("needs CAP_BPF and CAP_PERFMON (run as root): bpf: " +
		     std::string(std::strerror(err)) + " (" + op + ")");
	std::string m = op + ": " + std::strerror(err);
	if (!libbpf_verbose && !libbpf_log.empty())
		m += "\nlibbpf said:\n" + libbpf_log;
	fail(m);
}

bool exists(const std::string &path)
{
	struct stat st;
	return ::stat(path.c_str(), &st) == 0;
}

/* The tracefs directory with events/ in it, or a failure that says what is missing. */
std::string tracefs_dir()
{
	for (const char *d : {"/sys/kernel/tracing", "/sys/kernel/debug/tracing"}) {
		struct stat st;
		std::string events = std::string(d) + "/events";
		if (::stat(events.c_str(), &st) == 0)
			return d;
		if (errno == EACCES)	/* tracefs is root's (mode 0700) */
			fail("needs CAP_BPF and CAP_PERFMON (run as root): stat " + events + ": " +
			     std::strerror(errno));
	}
	fail("tracefs is not mounted (no /sys/kernel/tracing/events): "
	     "mount -t tracefs nodev /sys/kernel/tracing");
}

/* The vendor module's isa for kernels whose kvm_exit has no isa field. */
std::uint32_t module_isa()
{
	if (exists("/sys/module/kvm_amd"))
		return VT_ISA_SVM;
	if (exists("/sys/module/kvm_intel"))
		return VT_ISA_VMX;
	return VT_ISA_UNKNOWN;
}

const char *isa_name(std::uint32_t isa)
{
	return isa == VT_ISA_SVM ? "svm" : isa == VT_ISA_VMX ? "vmx" : "unknown";
}

/* Exit reason names as KVM's own kvm_exit trace prints them (arch/x86/include/uapi/asm/{svm,vmx}.h). */
struct ReasonName {
	std::uint32_t code;
	const char *name;
};

const ReasonName vmx_reasons[] = {
	{0, "EXCEPTION_NMI"}, {1, "EXTERNAL_INTERRUPT"}, {2, "TRIPLE_FAULT"},
	{3, "INIT_SIGNAL"}, {4, "SIPI_SIGNAL"}, {7, "INTERRUPT_WINDOW"}, {8, "NMI_WINDOW"},
	{9, "TASK_SWITCH"}, {10, "CPUID"}, {12, "HLT"}, {13, "INVD"}, {14, "INVLPG"},
	{15, "RDPMC"}, {16, "RDTSC"}, {18, "VMCALL"}, {19, "VMCLEAR"}, {20, "VMLAUNCH"},
	{21, "VMPTRLD"}, {22, "VMPTRST"}, {23, "VMREAD"}, {24, "VMRESUME"}, {25, "VMWRITE"},
	{26, "VMOFF"}, {27, "VMON"}, {28, "CR_ACCESS"}, {29, "DR_ACCESS"},
	{30, "IO_INSTRUCTION"}, {31, "MSR_READ"}, {32, "MSR_WRITE"}, {33, "INVALID_STATE"},
	{34, "MSR_LOAD_FAIL"}, {36, "MWAIT_INSTRUCTION"}, {37, "MONITOR_TRAP_FLAG"},
	{39, "MONITOR_INSTRUCTION"}, {40, "PAUSE_INSTRUCTION"}, {41, "MCE_DURING_VMENTRY"},
	{43, "TPR_BELOW_THRESHOLD"}, {44, "APIC_ACCESS"}, {45, "EOI_INDUCED"},
	{46, "GDTR_IDTR"}, {47, "LDTR_TR"}, {48, "EPT_VIOLATION"}, {49, "EPT_MISCONFIG"},
	{50, "INVEPT"}, {51, "RDTSCP"}, {52, "PREEMPTION_TIMER"}, {53, "INVVPID"},
	{54, "WBINVD"}, {55, "XSETBV"}, {56, "APIC_WRITE"}, {57, "RDRAND"}, {58, "INVPCID"},
	{59, "VMFUNC"}, {60, "ENCLS"}, {61, "RDSEED"}, {62, "PML_FULL"}, {63, "XSAVES"},
	{64, "XRSTORS"}, {67, "UMWAIT"}, {68, "TPAUSE"}, {74, "BUS_LOCK"}, {75, "NOTIFY"},
};

const ReasonName svm_reasons[] = {
	{0x000, "read_cr0"}, {0x002, "read_cr2"}, {0x003, "read_cr3"}, {0x004, "read_cr4"},
	{0x008, "read_cr8"}, {0x010, "write_cr0"}, {0x012, "write_cr2"}, {0x013, "write_cr3"},
	{0x014, "write_cr4"}, {0x018, "write_cr8"}, {0x020, "read_dr0"}, {0x021, "read_dr1"},
	{0x022, "read_dr2"}, {0x023, "read_dr3"}, {0x024, "read_dr4"}, {0x025, "read_dr5"},
	{0x026, "read_dr6"}, {0x027, "read_dr7"}, {0x030, "write_dr0"}, {0x031, "write_dr1"},
	{0x032, "write_dr2"}, {0x033, "write_dr3"}, {0x034, "write_dr4"}, {0x035, "write_dr5"},
	{0x036, "write_dr6"}, {0x037, "write_dr7"}, {0x040, "DE_excp"}, {0x041, "DB_excp"},
	{0x043, "BP_excp"}, {0x044, "OF_excp"}, {0x045, "BR_excp"}, {0x046, "UD_excp"},
	{0x047, "NM_excp"}, {0x048, "DF_excp"}, {0x04a, "TS_excp"}, {0x04b, "NP_excp"},
	{0x04c, "SS_excp"}, {0x04d, "GP_excp"}, {0x04e, "PF_excp"}, {0x050, "MF_excp"},
	{0x051, "AC_excp"}, {0x052, "MC_excp"}, {0x053, "XF_excp"}, {0x060, "interrupt"},
	{0x061, "nmi"}, {0x062, "smi"}, {0x063, "init"}, {0x064, "vintr"},
	{0x065, "cr0_sel_write"}, {0x066, "read_idtr"}, {0x067, "read_gdtr"},
	{0x068, "read_ldtr"}, {0x069, "read_rt"}, {0x06a, "write_idtr"}, {0x06b, "write_gdtr"},
	{0x06c, "write_ldtr"}, {0x06d, "write_rt"}, {0x06e, "rdtsc"}, {0x06f, "rdpmc"},
	{0x070, "pushf"}, {0x071, "popf"}, {0x072, "cpuid"}, {0x073, "rsm"}, {0x074, "iret"},
	{0x075, "swint"}, {0x076, "invd"}, {0x077, "pause"}, {0x078, "hlt"}, {0x079, "invlpg"},
	{0x07a, "invlpga"}, {0x07b, "io"}, {0x07c, "msr"}, {0x07d, "task_switch"},
	{0x07e, "ferr_freeze"}, {0x07f, "shutdown"}, {0x080, "vmrun"}, {0x081, "hypercall"},
	{0x082, "vmload"}, {0x083, "vmsave"}, {0x084, "stgi"}, {0x085, "clgi"},
	{0x086, "skinit"}, {0x087, "rdtscp"}, {0x088, "icebp"}, {0x089, "wbinvd"},
	{0x08a, "monitor"}, {0x08b, "mwait"}, {0x08d, "xsetbv"}, {0x08f, "write_efer_trap"},
	{0x090, "write_cr0_trap"}, {0x094, "write_cr4_trap"}, {0x098, "write_cr8_trap"},
	{0x0a2, "invpcid"}, {0x400, "npf"}, {0x401, "avic_incomplete_ipi"},
	{0x402, "avic_unaccelerated_access"}, {0x403, "vmgexit"},
	{0xffffffff, "invalid_guest_state"},
};

std::string hex(std::uint64_t v)
{
	char b[24];
	std::snprintf(b, sizeof(b), "0x%llx", (unsigned long long)v);
	return b;
}

std::string reason_name(std::uint32_t isa, std::uint32_t reason)
{
	std::uint32_t code = reason;
	std::string suffix;
	if (isa == VT_ISA_VMX) {
		code = reason & 0xffff;
		if (reason & 0x80000000u)
			suffix = "|FAILED_VMENTRY";
		for (auto &r : vmx_reasons)
			if (r.code == code)
				return r.name + suffix;
	} else if (isa == VT_ISA_SVM) {
		for (auto &r : svm_reasons)
			if (r.code == code)
				return r.name;
	}
	return "reason_" + hex(reason);
}

/* --- what one read of the maps gives --- */

struct VcpuReport {
	std::uint32_t pid = 0, vcpu = 0;
	vt_vcpu_stats s{};
	std::map<std::string, std::uint64_t> reasons;	/* name -> exits */
	std::map<std::uint64_t, std::uint64_t> spp_pages; /* gfn -> traps */
	std::map<std::uint32_t, std::uint64_t> pio_out, pio_in; /* port -> exits */
};

struct Snapshot {
	std::vector<VcpuReport> vcpus;	/* by pid, vcpu */
	std::uint64_t dropped = 0;
};

template <class Key, class Value, class Fn> void for_each_elem(int fd, const char *name, Fn fn)
{
	Key key{}, next{};
	Value value{};
	const void *prev = nullptr;
	for (;;) {
		if (bpf_map_get_next_key(fd, prev, &next)) {
			if (errno == ENOENT)
				return;
			fail_errno(std::string("bpf_map_get_next_key (map ") + name + ")", errno);
		}
		if (bpf_map_lookup_elem(fd, &next, &value) == 0)
			fn(next, value);
		else if (errno != ENOENT) /* deleted meanwhile: skip */
			fail_errno(std::string("bpf_map_lookup_elem (map ") + name + ")", errno);
		key = next;
		prev = &key;
	}
}

Snapshot read_maps(const trace_bpf &skel)
{
	std::map<std::pair<std::uint32_t, std::uint32_t>, VcpuReport> by;
	auto at = [&](std::uint32_t pid, std::uint32_t vcpu) -> VcpuReport & {
		auto &r = by[{pid, vcpu}];
		r.pid = pid;
		r.vcpu = vcpu;
		return r;
	};
	for_each_elem<vt_vcpu_key, vt_vcpu_stats>(
		bpf_map__fd(skel.maps.vcpus), "vcpus",
		[&](const vt_vcpu_key &k, const vt_vcpu_stats &v) { at(k.pid, k.vcpu).s = v; });
	for_each_elem<vt_reason_key, std::uint64_t>(
		bpf_map__fd(skel.maps.reasons), "reasons",
		[&](const vt_reason_key &k, std::uint64_t n) {
			at(k.pid, k.vcpu).reasons[reason_name(k.isa, k.reason)] += n;
		});
	for_each_elem<vt_page_key, std::uint64_t>(
		bpf_map__fd(skel.maps.spp_pages), "spp_pages",
		[&](const vt_page_key &k, std::uint64_t n) { at(k.pid, k.vcpu).spp_pages[k.gfn] += n; });
	for_each_elem<vt_port_key, std::uint64_t>(
		bpf_map__fd(skel.maps.ports), "ports", [&](const vt_port_key &k, std::uint64_t n) {
			auto &r = at(k.pid, k.vcpu);
			(k.out ? r.pio_out : r.pio_in)[k.port] += n;
		});
	Snapshot snap;
	for (auto &[k, r] : by)
		snap.vcpus.push_back(std::move(r));
	std::uint32_t zero = 0;
	std::uint64_t d = 0;
	if (bpf_map_lookup_elem(bpf_map__fd(skel.maps.dropped), &zero, &d) == 0)
		snap.dropped = d;
	return snap;
}

/* --- output --- */

/* ns in the largest of ns, us, ms, s that keeps it at 1 or more (ns below 1 us). */
struct Scaled {
	double value;
	const char *unit;
	int rank; /* 0 ns, 1 us, 2 ms, 3 s */
};

Scaled scaled(double ns)
{
	if (ns < 1e3)
		return {ns, "ns", 0};
	if (ns < 1e6)
		return {ns / 1e3, "us", 1};
	if (ns < 1e9)
		return {ns / 1e6, "ms", 2};
	return {ns / 1e9, "s", 3};
}

/* "812 ns", "16.4 us", "4.2 ms", "2.15 s". */
std::string duration_text(double ns)
{
	static constexpr int decimals[] = {0, 1, 1, 2};
	const Scaled v = scaled(ns);
	char b[32];
	std::snprintf(b, sizeof(b), "%.*f %s", decimals[v.rank], v.value, v.unit);
	return b;
}

/* A power of two of nanoseconds, three digits: 512ns, 16.4us, 4.19ms, 2.15s. */
std::string pow2_text(unsigned i)
{
	const Scaled v = scaled(std::ldexp(1.0, int(i)));
	char b[16];
	std::snprintf(b, sizeof(b), "%.3g%s", v.value, v.unit);
	return b;
}

/* A vCPU id; "?" for threads whose exits KVM did not trace (their other events counted). */
std::string vcpu_text(std::uint32_t vcpu)
{
	return vcpu == VT_VCPU_UNKNOWN ? "?" : std::to_string(vcpu);
}

struct Options {
	std::optional<std::uint32_t> pid;
	double interval = 1.0;
	std::optional<double> duration;
	bool json = false;
	bool verbose = false;
};

void print_table(std::FILE *out, const Snapshot &snap, const Options &o, double elapsed,
		 bool final)
{
	std::fprintf(out, "virtkit trace: %s, %.1f s%s\n",
		     o.pid ? ("pid " + std::to_string(*o.pid)).c_str() : "all VM processes",
		     elapsed, final ? " (final)" : "");
	if (snap.vcpus.empty()) {
		std::fprintf(out, "  no exits yet\n\n");
		return;
	}
	std::fprintf(out, "%7s %5s %10s %9s %9s %9s %9s %9s %10s %10s\n", "PID", "VCPU", "EXITS",
		     "SPP-TRAP", "MMIO-W/R", "MSR-W/R", "CR-W/R", "PIO-O/I", "LAT-AVG", "LAT-MAX");
	for (auto &r : snap.vcpus) {
		auto pair = [](std::uint64_t a, std::uint64_t b) {
			return std::to_string(a) + "/" + std::to_string(b);
		};
		double avg = r.s.lat_count ? double(r.s.lat_sum_ns) / double(r.s.lat_count) : 0;
		std::fprintf(out, "%7u %5s %10llu %9llu %9s %9s %9s %9s %10s %10s\n", r.pid,
			     vcpu_text(r.vcpu).c_str(),
			     (unsigned long long)r.s.exits, (unsigned long long)r.s.spp_traps,
			     pair(r.s.mmio_writes, r.s.mmio_reads).c_str(),
			     pair(r.s.msr_writes, r.s.msr_reads).c_str(),
			     pair(r.s.cr_writes, r.s.cr_reads).c_str(),
			     pair(r.s.pio_out, r.s.pio_in).c_str(),
			     r.s.lat_count ? duration_text(avg).c_str() : "-",
			     r.s.lat_count ? duration_text(double(r.s.lat_max_ns)).c_str() : "-");
	}
	for (auto &r : snap.vcpus) {
		std::fprintf(out, "\npid %u vcpu %s (%s):\n  exits by reason:", r.pid,
			     vcpu_text(r.vcpu).c_str(), isa_name(r.s.isa));
		if (r.reasons.empty())
			std::fprintf(out, " none traced (this KVM does not trace kvm_exit)");
		std::vector<std::pair<std::uint64_t, std::string>> byn;
		for (auto &[name, n] : r.reasons)
			byn.emplace_back(n, name);
		std::sort(byn.rbegin(), byn.rend());
		for (auto &[n, name] : byn)
			std::fprintf(out, " %s %llu", name.c_str(), (unsigned long long)n);
		std::fputc('\n', out);
		if (!r.spp_pages.empty()) {
			std::fprintf(out, "  spp traps by page:");
			for (auto &[gfn, n] : r.spp_pages)
				std::fprintf(out, " %s %llu", hex(gfn << 12).c_str(),
					     (unsigned long long)n);
			std::fputc('\n', out);
		}
		for (auto *m : {&r.pio_out, &r.pio_in}) {
			if (m->empty())
				continue;
			std::fprintf(out, "  port %s:", m == &r.pio_out ? "out" : "in");
			for (auto &[port, n] : *m)
				std::fprintf(out, " %s %llu", hex(port).c_str(), (unsigned long long)n);
			std::fputc('\n', out);
		}
		if (!r.s.lat_count)
			continue;
		std::uint64_t peak = *std::max_element(std::begin(r.s.hist), std::end(r.s.hist));
		std::fprintf(out, "  exit-to-entry latency (%llu exits):\n",
			     (unsigned long long)r.s.lat_count);
		for (unsigned i = 0; i < VT_HIST_BUCKETS; i++) {
			if (!r.s.hist[i])
				continue;
			int bar = int((r.s.hist[i] * 40 + peak - 1) / peak);
			std::fprintf(out, "    %7s .. %-7s %10llu |%.*s\n", pow2_text(i).c_str(),
				     pow2_text(i + 1).c_str(), (unsigned long long)r.s.hist[i], bar,
				     "****************************************");
		}
	}
	if (snap.dropped)
		std::fprintf(out, "\nwarning: %llu updates dropped (a BPF map was full)\n",
			     (unsigned long long)snap.dropped);
	std::fputc('\n', out);
}

std::string json_string(const std::string &s)
{
	std::string o = "\"";
	for (char c : s) {
		if (c == '"' || c == '\\')
			o += '\\';
		o += c;
	}
	return o + "\"";
}

void print_json(std::FILE *out, const Snapshot &snap, const Options &o, double elapsed,
		bool final)
{
	std::string j = "{\"elapsed_s\":" + std::to_string(elapsed) +
			",\"final\":" + (final ? "true" : "false") +
			",\"pid\":" + (o.pid ? std::to_string(*o.pid) : "null") +
			",\"dropped\":" + std::to_string(snap.dropped) + ",\"vcpus\":[";
	bool first = true;
	for (auto &r : snap.vcpus) {
		j += first ? "{" : ",{";
		first = false;
		auto num = [&](const char *k, std::uint64_t v, bool comma = true) {
			j += std::string(comma ? "," : "") + "\"" + k + "\":" + std::to_string(v);
		};
		num("pid", r.pid, false);
		if (r.vcpu == VT_VCPU_UNKNOWN)
			j += ",\"vcpu\":null";
		else
			num("vcpu", r.vcpu);
		j += ",\"isa\":" + json_string(isa_name(r.s.isa));
		num("exits", r.s.exits);
		j += ",\"exits_by_reason\":{";
		bool f = true;
		for (auto &[name, n] : r.reasons) {
			j += (f ? "" : ",") + json_string(name) + ":" + std::to_string(n);
			f = false;
		}
		j += "}";
		num("spp_traps", r.s.spp_traps);
		j += ",\"spp_traps_by_page\":{";
		f = true;
		for (auto &[gfn, n] : r.spp_pages) {
			j += (f ? "" : ",") + json_string(hex(gfn << 12)) + ":" + std::to_string(n);
			f = false;
		}
		j += "}";
		num("mmio_writes", r.s.mmio_writes);
		num("mmio_reads", r.s.mmio_reads);
		num("msr_writes", r.s.msr_writes);
		num("msr_reads", r.s.msr_reads);
		num("cr_writes", r.s.cr_writes);
		num("cr_reads", r.s.cr_reads);
		num("page_faults", r.s.page_faults);
		num("pio_out", r.s.pio_out);
		num("pio_in", r.s.pio_in);
		for (auto *m : {&r.pio_out, &r.pio_in}) {
			j += m == &r.pio_out ? ",\"pio_out_by_port\":{" : ",\"pio_in_by_port\":{";
			f = true;
			for (auto &[port, n] : *m) {
				j += (f ? "" : ",") + json_string(hex(port)) + ":" + std::to_string(n);
				f = false;
			}
			j += "}";
		}
		j += ",\"latency_ns\":{";
		num("count", r.s.lat_count, false);
		num("sum", r.s.lat_sum_ns);
		num("max", r.s.lat_max_ns);
		j += ",\"log2_buckets\":[";
		f = true;
		for (unsigned i = 0; i < VT_HIST_BUCKETS; i++) {
			if (!r.s.hist[i])
				continue;
			j += std::string(f ? "" : ",") + "{\"from\":" +
			     std::to_string(1ull << i) + ",\"to\":" + std::to_string(2ull << i) +
			     ",\"count\":" + std::to_string(r.s.hist[i]) + "}";
			f = false;
		}
		j += "]}}";
	}
	j += "]}\n";
	std::fputs(j.c_str(), out);
}

/* Whether process pid is still running (not gone, not a zombie). */
bool process_alive(std::uint32_t pid)
{
	std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
	std::string line;
	if (!std::getline(f, line))
		return false;
	auto p = line.rfind(')');
	return p != std::string::npos && p + 2 < line.size() && line[p + 2] != 'Z' &&
	       line[p + 2] != 'X';
}

std::optional<double> parse_seconds(std::string_view s)
{
	try {
		std::size_t used = 0;
		double v = std::stod(std::string(s), &used);
		if (used != s.size() || !(v > 0) || v > 1e9)
			return std::nullopt;
		return v;
	} catch (const std::exception &) {
		return std::nullopt;
	}
}

} // namespace

int trace_main(Args args)
{
	Options o;
	for (std::size_t i = 0; i < args.size(); i++) {
		std::string_view a = args[i];
		auto value = [&](std::string_view name) -> std::optional<std::string_view> {
			if (a == name && i + 1 < args.size())
				return args[++i];
			if (a.size() > name.size() && a.starts_with(name) && a[name.size()] == '=')
				return a.substr(name.size() + 1);
			return std::nullopt;
		};
		if (a == "-h" || a == "--help") {
			std::fputs(trace_help, stdout);
			return 0;
		} else if (a == "--json") {
			o.json = true;
		} else if (a == "--verbose") {
			o.verbose = true;
		} else if (auto v = value("--pid")) {
			std::uint32_t pid = 0;
			auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), pid);
			if (ec != std::errc() || p != v->data() + v->size() || pid == 0)
				return usage_error("trace", "--pid needs a process id, not '" +
								    std::string(*v) + "'");
			o.pid = pid;
		} else if (auto v = value("--interval")) {
			auto s = parse_seconds(*v);
			if (!s)
				return usage_error("trace", "--interval needs a positive number of seconds");
			o.interval = *s;
		} else if (auto v = value("--duration")) {
			auto s = parse_seconds(*v);
			if (!s)
				return usage_error("trace", "--duration needs a positive number of seconds");
			o.duration = s;
		} else if (a == "--pid" || a == "--interval" || a == "--duration") {
			return usage_error("trace", "option " + std::string(a) + " needs a value");
		} else {
			return usage_error("trace", "unknown option '" + std::string(a) + "'");
		}
	}

	/* What the programs need, each missing piece named before libbpf tries. */
	if (o.pid && !exists("/proc/" + std::to_string(*o.pid)))
		fail("no process with pid " + std::to_string(*o.pid));
	if (!exists("/sys/kernel/btf/vmlinux"))
		fail("no kernel BTF (/sys/kernel/btf/vmlinux): the BPF programs are CO-RE and "
		     "need a kernel built with CONFIG_DEBUG_INFO_BTF");
	std::string tracefs = tracefs_dir();
	const char *events[] = {"kvm/kvm_exit", "kvm/kvm_entry", "kvm/kvm_page_fault",
				"kvm/kvm_mmio", "kvm/kvm_msr", "kvm/kvm_cr", "kvm/kvm_pio",
				"kvmmmu/mark_mmio_spte"};
	std::vector<std::string> missing;
	for (const char *e : events)
		if (!exists(tracefs + "/events/" + e))
			missing.push_back(e);
	if (!exists(tracefs + "/events/kvm/kvm_exit") || !exists(tracefs + "/events/kvm/kvm_entry"))
		fail("no kvm tracepoints (" + tracefs +
		     "/events/kvm/kvm_exit): is the kvm module loaded?");

	libbpf_verbose = o.verbose;
	libbpf_set_print(libbpf_print);
	Skeleton skel(trace_bpf__open());
	if (!skel)
		fail_errno("open the BPF object (trace_bpf__open)", errno);
	struct stat ns;
	if (::stat("/proc/self/ns/pid", &ns))
		fail_errno("stat /proc/self/ns/pid", errno);
	skel->rodata->target_pid = o.pid.value_or(0);
	skel->rodata->pidns_dev = ns.st_dev;
	skel->rodata->pidns_ino = ns.st_ino;
	skel->rodata->default_isa = module_isa();
	/* Optional tracepoints this kernel lacks: their counts stay 0. */
	for (auto &m : missing) {
		struct bpf_program *prog;
		bpf_object__for_each_program(prog, skel->obj)
			if (std::string(bpf_program__section_name(prog)) == "tracepoint/" + m)
				bpf_program__set_autoload(prog, false);
	}
	if (trace_bpf__load(skel.get()))
		fail_errno("load the BPF programs (bpf BPF_PROG_LOAD)", errno);
	if (trace_bpf__attach(skel.get()))
		fail_errno("attach to the kvm tracepoints (perf_event_open)", errno);
	/* All attached: count from now on, in every program at once. */
	skel->bss->armed = 1;

	std::string what = o.pid ? "pid " + std::to_string(*o.pid) : "every VM process";
	std::string lacking;
	for (auto &m : missing)
		lacking += (lacking.empty() ? " (not in this kernel: " : ", ") + m;
	std::fprintf(stderr, "virtkit trace: tracing %s on %zu KVM tracepoints%s; Ctrl-C stops\n",
		     what.c_str(), std::size(events) - missing.size(),
		     lacking.empty() ? "" : (lacking + ")").c_str());

	sigset_t stop;
	sigemptyset(&stop);
	sigaddset(&stop, SIGINT);
	sigaddset(&stop, SIGTERM);
	if (sigprocmask(SIG_BLOCK, &stop, nullptr))
		fail_errno("sigprocmask", errno);

	using Clock = std::chrono::steady_clock;
	const auto start = Clock::now();
	auto elapsed = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
	const bool tty = !o.json && isatty(STDOUT_FILENO);
	/* Whether to stop: a signal, --duration, or the traced process gone (checked every 0.2 s). */
	auto wait_until = [&](double when) {
		for (;;) {
			double now = elapsed();
			if (o.duration && now >= *o.duration)
				return true;
			if (o.pid && !process_alive(*o.pid))
				return true;
			if (now >= when)
				return false;
			double wait = std::min({when - now, 0.2,
						o.duration ? *o.duration - now : 0.2});
			struct timespec ts = {0, long(wait * 1e9)};
			int sig = sigtimedwait(&stop, nullptr, &ts);
			if (sig > 0)
				return true;
			if (sig < 0 && errno != EAGAIN && errno != EINTR)
				fail_errno("sigtimedwait", errno);
		}
	};
	for (double next = o.interval;; next += o.interval) {
		bool final = wait_until(next);
		Snapshot snap = read_maps(*skel);
		if (o.json) {
			print_json(stdout, snap, o, elapsed(), final);
		} else {
			if (tty)
				std::fputs("\033[H\033[J", stdout);
			print_table(stdout, snap, o, elapsed(), final);
		}
		std::fflush(stdout);
		if (final)
			return 0;
	}
}

} // namespace virtkit::tool
