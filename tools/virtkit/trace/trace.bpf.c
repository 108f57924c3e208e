// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The BPF half of `virtkit trace` (Documentation/trace.rst): programs on
 * KVM's tracepoints that count, per VM process and vCPU, exits by reason,
 * MMIO, MSR, CR and port I/O exits, SPP traps (MMIO writes to pages KVM maps
 * but may not write: the user backend's read-only slots), and the time from
 * each kvm_exit to the vCPU's next kvm_entry as a log2 histogram.
 *
 * CO-RE without a generated vmlinux.h: the tracepoints' records are
 * declared here with only the fields read, preserve_access_index, and
 * libbpf relocates each access against the running kernel's BTF (kvm.ko's
 * module BTF where KVM is a module). Fields that not every kernel has are
 * read only where bpf_core_field_exists() says they are there.
 *
 * Built with clang -target bpf; `bpftool gen skeleton` embeds the object
 * into the virtkit tool.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "trace_abi.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Set by user space before the load. */
const volatile __u32 target_pid = 0;	/* 0: every process */
const volatile __u64 pidns_dev = 0;	/* the tracer's pid namespace (pids as it sees them) */
const volatile __u64 pidns_ino = 0;
const volatile __u32 default_isa = 0;	/* VT_ISA_* where kvm_exit has no isa field */

/*
 * Set by user space once every program is attached: the programs attach one
 * after the other, and events before the last one is in would be counted
 * by some programs and not others (kvm_exit without its kvm_pio, ...).
 */
volatile __u32 armed = 0;

/* --- the records of KVM's tracepoints (arch/x86/kvm/trace.h), fields read --- */

struct trace_event_raw_kvm_exit {
	unsigned int exit_reason;
	__u32 isa;
	unsigned int vcpu_id;
} __attribute__((preserve_access_index));

struct trace_event_raw_kvm_entry {
	unsigned int vcpu_id;
} __attribute__((preserve_access_index));

struct trace_event_raw_kvm_page_fault {
	__u64 fault_address;
	__u64 error_code;
} __attribute__((preserve_access_index));

struct trace_event_raw_kvm_mmio {
	__u32 type;
	__u64 gpa;
} __attribute__((preserve_access_index));

struct trace_event_raw_kvm_msr {
	unsigned int write;
} __attribute__((preserve_access_index));

struct trace_event_raw_kvm_cr {
	unsigned int rw;
} __attribute__((preserve_access_index));

struct trace_event_raw_kvm_pio {
	unsigned int rw;
	unsigned int port;
} __attribute__((preserve_access_index));

/* kvm_mmio's type (include/trace/events/kvm.h) */
#define KVM_TRACE_MMIO_UNSATISFIED_READ 0
#define KVM_TRACE_MMIO_READ 1
#define KVM_TRACE_MMIO_WRITE 2

/* What the last page fault of the current exit said about its page. */
enum fault_kind {
	FAULT_NONE = 0,		/* no page fault in this exit */
	FAULT_MAPPED,		/* the page is mapped (read-only to the write) */
	FAULT_NOT_PRESENT,	/* not mapped yet: a read-only slot's page not yet read, or unbacked */
	FAULT_MMIO,		/* KVM's MMIO marker (reserved bits): no memory behind the GPA */
};

/* Per vCPU thread: what the current exit has seen so far. */
struct task_state {
	__u64 exit_ns;		/* kvm_exit's time, 0 when in the guest */
	__u32 pid;
	__u32 vcpu;
	__u32 isa;
	__u32 fault;		/* enum fault_kind */
};

/* LRU: threads of VMs that ended are never removed, the oldest go first. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);	/* thread id */
	__type(value, struct task_state);
} tasks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct vt_vcpu_key);
	__type(value, struct vt_vcpu_stats);
} vcpus SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct vt_reason_key);
	__type(value, __u64);
} reasons SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct vt_page_key);
	__type(value, __u64);
} spp_pages SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct vt_port_key);
	__type(value, __u64);
} ports SEC(".maps");

/* Dropped updates (a full map): user space reports them. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

static void count_drop(void)
{
	__u32 zero = 0;
	__u64 *d = bpf_map_lookup_elem(&dropped, &zero);

	if (d)
		__sync_fetch_and_add(d, 1);
}

/*
 * The current task's process id as the tracer sees it (its pid namespace),
 * and whether the task is one we trace.
 */
static int current_pid(__u32 *pid)
{
	struct bpf_pidns_info ns = {};

	if (!armed)
		return -1;
	if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
		return -1;	/* not visible from the tracer's namespace */
	if (target_pid && ns.tgid != target_pid)
		return -1;
	*pid = ns.tgid;
	return 0;
}

static struct vt_vcpu_stats *vcpu_stats(__u32 pid, __u32 vcpu)
{
	struct vt_vcpu_key key = {.pid = pid, .vcpu = vcpu};
	struct vt_vcpu_stats *s = bpf_map_lookup_elem(&vcpus, &key);

	if (s)
		return s;
	struct vt_vcpu_stats zero = {};
	/* EEXIST when another CPU created it first: the lookup finds that one. */
	bpf_map_update_elem(&vcpus, &key, &zero, BPF_NOEXIST);
	s = bpf_map_lookup_elem(&vcpus, &key);
	if (!s)
		count_drop();
	return s;
}

static void add_to(void *map, const void *key)
{
	__u64 *n = bpf_map_lookup_elem(map, key);

	if (n) {
		__sync_fetch_and_add(n, 1);
		return;
	}
	__u64 one = 1;
	if (bpf_map_update_elem(map, key, &one, BPF_NOEXIST)) {
		/* Raced with another CPU creating it, or the map is full. */
		n = bpf_map_lookup_elem(map, key);
		if (n)
			__sync_fetch_and_add(n, 1);
		else
			count_drop();
	}
}

/* The state of the current vCPU thread, NULL when it is not traced. */
static struct task_state *current_task(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	return bpf_map_lookup_elem(&tasks, &tid);
}

/*
 * The state of the current thread for an event inside an exit (kvm_mmio,
 * kvm_msr, kvm_cr, kvm_pio). A KVM that does not trace kvm_exit (kvm_pvm:
 * neither kvm-amd nor kvm-intel is loaded) still fires these: such a
 * thread is counted under vCPU VT_VCPU_UNKNOWN.
 */
static struct task_state *event_task(void)
{
	struct task_state *t = current_task();

	if (t)
		return t;
	/*
	 * kvm-amd and kvm-intel trace every exit: a thread without a state
	 * is one whose exit began before we were armed.
	 */
	if (default_isa != VT_ISA_UNKNOWN)
		return 0;
	__u32 pid;
	if (current_pid(&pid))
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct task_state st = {.pid = pid, .vcpu = VT_VCPU_UNKNOWN, .isa = default_isa};
	if (bpf_map_update_elem(&tasks, &tid, &st, BPF_NOEXIST))
		count_drop();
	return current_task();
}

static __u32 log2_bucket(__u64 v)
{
	__u32 r = 0;

	/* Bounded for the verifier: at most 64 halvings. */
	for (int i = 0; i < 64 && v > 1; i++) {
		v >>= 1;
		r++;
	}
	return r < VT_HIST_BUCKETS ? r : VT_HIST_BUCKETS - 1;
}

SEC("tracepoint/kvm/kvm_exit")
int on_kvm_exit(struct trace_event_raw_kvm_exit *ctx)
{
	__u32 pid;

	if (current_pid(&pid))
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct task_state st = {
		.exit_ns = bpf_ktime_get_ns(),
		.pid = pid,
		.vcpu = ctx->vcpu_id,
		.isa = default_isa,
		.fault = FAULT_NONE,
	};
	if (bpf_core_field_exists(ctx->isa))
		st.isa = ctx->isa;
	if (bpf_map_update_elem(&tasks, &tid, &st, BPF_ANY))
		count_drop();

	struct vt_vcpu_stats *s = vcpu_stats(pid, st.vcpu);
	if (s) {
		__sync_fetch_and_add(&s->exits, 1);
		s->isa = st.isa;
		s->tid = tid;
	}
	struct vt_reason_key rk = {
		.pid = pid, .vcpu = st.vcpu, .isa = st.isa, .reason = ctx->exit_reason,
	};
	add_to(&reasons, &rk);
	return 0;
}

SEC("tracepoint/kvm/kvm_entry")
int on_kvm_entry(struct trace_event_raw_kvm_entry *ctx)
{
	struct task_state *t = current_task();

	if (!t || !t->exit_ns)
		return 0;
	__u64 ns = bpf_ktime_get_ns() - t->exit_ns;
	t->exit_ns = 0;
	t->fault = FAULT_NONE;
	struct vt_vcpu_stats *s = vcpu_stats(t->pid, ctx->vcpu_id);
	if (!s)
		return 0;
	__sync_fetch_and_add(&s->entries, 1);
	__sync_fetch_and_add(&s->lat_count, 1);
	__sync_fetch_and_add(&s->lat_sum_ns, ns);
	if (ns > s->lat_max_ns)
		s->lat_max_ns = ns;	/* one writer: the vCPU's own thread */
	__u32 b = log2_bucket(ns);
	if (b < VT_HIST_BUCKETS)
		__sync_fetch_and_add(&s->hist[b], 1);
	return 0;
}

/*
 * kvm_page_fault: on SVM the nested page fault's error code (x86 #PF
 * layout: bit 0 present, bit 3 reserved bits - KVM's MMIO marker); on VMX
 * the EPT violation's exit qualification (bits 3-5: the GPA was readable,
 * writable or executable, i.e. mapped); with shadow paging the guest's #PF
 * error code (x86 layout).
 */
SEC("tracepoint/kvm/kvm_page_fault")
int on_kvm_page_fault(struct trace_event_raw_kvm_page_fault *ctx)
{
	struct task_state *t = current_task();

	if (!t || !t->exit_ns)
		return 0;
	__u64 ec = ctx->error_code;
	if (t->isa == VT_ISA_VMX)
		t->fault = (ec & 0x38) ? FAULT_MAPPED : FAULT_NOT_PRESENT;
	else if (ec & 0x8)
		t->fault = FAULT_MMIO;
	else
		t->fault = (ec & 0x1) ? FAULT_MAPPED : FAULT_NOT_PRESENT;
	struct vt_vcpu_stats *s = vcpu_stats(t->pid, t->vcpu);
	if (s)
		__sync_fetch_and_add(&s->page_faults, 1);
	return 0;
}

/*
 * KVM installs an MMIO marker for a GPA no memslot backs (with MMIO
 * caching on): the exit's fault was a device's, not a read-only page's.
 * This tells apart the first access to a device page, whose fault looks
 * like any not-present one.
 */
SEC("tracepoint/kvmmmu/mark_mmio_spte")
int on_mark_mmio_spte(void *ctx)
{
	struct task_state *t = current_task();

	if (t && t->exit_ns)
		t->fault = FAULT_MMIO;
	return 0;
}

SEC("tracepoint/kvm/kvm_mmio")
int on_kvm_mmio(struct trace_event_raw_kvm_mmio *ctx)
{
	struct task_state *t = event_task();

	if (!t)
		return 0;
	struct vt_vcpu_stats *s = vcpu_stats(t->pid, t->vcpu);
	if (!s)
		return 0;
	__u32 type = ctx->type;
	if (type != KVM_TRACE_MMIO_WRITE) {
		/* A read exits once (unsatisfied read) and is traced again when completed. */
		if (type == KVM_TRACE_MMIO_UNSATISFIED_READ)
			__sync_fetch_and_add(&s->mmio_reads, 1);
		return 0;
	}
	__sync_fetch_and_add(&s->mmio_writes, 1);
	/*
	 * An SPP trap: an MMIO write in an exit that began with a page fault
	 * on memory (not KVM's MMIO marker). Device MMIO comes with a
	 * reserved-bit fault (SVM, shadow paging) or an EPT misconfiguration
	 * (VMX: no kvm_page_fault); its first access to a page installs the
	 * marker (mark_mmio_spte).
	 */
	if (t->fault != FAULT_MAPPED && t->fault != FAULT_NOT_PRESENT)
		return 0;
	__sync_fetch_and_add(&s->spp_traps, 1);
	struct vt_page_key pk = {.pid = t->pid, .vcpu = t->vcpu, .gfn = ctx->gpa >> 12};
	add_to(&spp_pages, &pk);
	return 0;
}

SEC("tracepoint/kvm/kvm_msr")
int on_kvm_msr(struct trace_event_raw_kvm_msr *ctx)
{
	struct task_state *t = event_task();

	if (!t)
		return 0;
	struct vt_vcpu_stats *s = vcpu_stats(t->pid, t->vcpu);
	if (!s)
		return 0;
	if (ctx->write)
		__sync_fetch_and_add(&s->msr_writes, 1);
	else
		__sync_fetch_and_add(&s->msr_reads, 1);
	return 0;
}

SEC("tracepoint/kvm/kvm_cr")
int on_kvm_cr(struct trace_event_raw_kvm_cr *ctx)
{
	struct task_state *t = event_task();

	if (!t)
		return 0;
	struct vt_vcpu_stats *s = vcpu_stats(t->pid, t->vcpu);
	if (!s)
		return 0;
	if (ctx->rw)
		__sync_fetch_and_add(&s->cr_writes, 1);
	else
		__sync_fetch_and_add(&s->cr_reads, 1);
	return 0;
}

SEC("tracepoint/kvm/kvm_pio")
int on_kvm_pio(struct trace_event_raw_kvm_pio *ctx)
{
	struct task_state *t = event_task();

	if (!t)
		return 0;
	struct vt_vcpu_stats *s = vcpu_stats(t->pid, t->vcpu);
	if (!s)
		return 0;
	__u32 out = ctx->rw ? 1 : 0;
	if (out)
		__sync_fetch_and_add(&s->pio_out, 1);
	else
		__sync_fetch_and_add(&s->pio_in, 1);
	struct vt_port_key pk = {.pid = t->pid, .vcpu = t->vcpu, .port = ctx->port, .out = out};
	add_to(&ports, &pk);
	return 0;
}
