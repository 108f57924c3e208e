/* SPDX-License-Identifier: MIT */
/*
 * KVM UAPI definitions newer than the oldest kernel headers we build against
 * (Debian 12's linux-libc-dev is 6.1). Values are ABI and never change.
 */
#pragma once

#include <virtkit/kvm.h>

#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif

/* kvm_run.memory_fault (6.8+): same offset as the other exit payloads. */
struct virtkit_kvm_memory_fault {
	__u64 flags;
	__u64 gpa;
	__u64 size;
};
