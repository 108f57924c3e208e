/* SPDX-License-Identifier: MIT */
/*
 * What the BPF side of `virtkit trace` (trace.bpf.c) and its user-space side
 * (trace.cpp) share: the keys and values of the maps the BPF programs fill
 * and user space reads. Plain C with fixed-size fields, included by both.
 */
#ifndef VIRTKIT_TRACE_ABI_H
#define VIRTKIT_TRACE_ABI_H

#ifdef __bpf__
typedef unsigned int vt_u32;
typedef unsigned long long vt_u64;
#else
#include <stdint.h>
typedef uint32_t vt_u32;
typedef uint64_t vt_u64;
#endif

/* Latency histogram: bucket i counts exit-to-entry times in [2^i, 2^(i+1)) ns. */
#define VT_HIST_BUCKETS 40

/* kvm_exit's isa field (KVM_ISA_VMX, KVM_ISA_SVM in arch/x86/kvm/trace.h). */
#define VT_ISA_UNKNOWN 0
#define VT_ISA_VMX 1
#define VT_ISA_SVM 2

/* The vCPU of a thread whose events came without a kvm_exit (a KVM that does not trace it). */
#define VT_VCPU_UNKNOWN 0xffffffffu

/* One vCPU of one VM process: the process's pid (as the tracer sees it) and kvm_exit's vcpu_id. */
struct vt_vcpu_key {
	vt_u32 pid;
	vt_u32 vcpu;
};

struct vt_vcpu_stats {
	vt_u64 exits;		/* kvm_exit */
	vt_u64 entries;		/* kvm_entry */
	vt_u64 page_faults;	/* kvm_page_fault: NPF/EPT violations, shadow #PF */
	vt_u64 mmio_reads;	/* kvm_mmio read or unsatisfied read (an MMIO read exit) */
	vt_u64 mmio_writes;	/* kvm_mmio write: every MMIO write fragment */
	vt_u64 spp_traps;	/* MMIO writes to pages KVM maps but cannot write (trace.rst) */
	vt_u64 msr_reads;	/* kvm_msr */
	vt_u64 msr_writes;
	vt_u64 cr_reads;	/* kvm_cr */
	vt_u64 cr_writes;
	vt_u64 pio_in;		/* kvm_pio */
	vt_u64 pio_out;
	vt_u64 lat_count;	/* exit-to-entry times measured */
	vt_u64 lat_sum_ns;
	vt_u64 lat_max_ns;
	vt_u64 hist[VT_HIST_BUCKETS];
	vt_u32 isa;		/* VT_ISA_* of the last exit */
	vt_u32 tid;		/* the vCPU's thread (last seen) */
};

/* Exits of one vCPU by reason (kvm_exit's exit_reason, vendor-specific). */
struct vt_reason_key {
	vt_u32 pid;
	vt_u32 vcpu;
	vt_u32 isa;
	vt_u32 reason;
};

/* SPP traps of one vCPU by guest-physical page (GPA >> 12). */
struct vt_page_key {
	vt_u32 pid;
	vt_u32 vcpu;
	vt_u64 gfn;
};

/* Port I/O of one vCPU by port and direction (kvm_pio). */
struct vt_port_key {
	vt_u32 pid;
	vt_u32 vcpu;
	vt_u32 port;
	vt_u32 out;
};

#endif
