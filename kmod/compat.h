/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Every difference between the kernels virtkit.ko supports, in one place,
 * decided by conftest.sh's probes of the kernel being built against
 * (conftest.h), not by version numbers.
 *
 * - file_is_kvm(): exported to every module up to 6.x; in 7.x only to
 *   kvm-amd/kvm-intel. Without it, kvm_files.c recognises a VM file by
 *   what KVM makes it: an anonymous-inode file named "kvm-vm" whose file
 *   operations belong to a KVM module.
 * - The memslot of a guest frame in a vCPU's address space: inline
 *   (__gfn_to_memslot(kvm_vcpu_memslots())) on every supported kernel;
 *   gfn_to_memslot() and kvm_vcpu_gfn_to_memslot() are restricted in 7.x.
 */
#ifndef VIRTKIT_COMPAT_H
#define VIRTKIT_COMPAT_H

#include <linux/kvm_host.h>

#include "conftest.h"

#ifndef VIRTKIT_HAVE_INLINE_VCPU_MEMSLOT_LOOKUP
#error "virtkit.ko needs kvm_vcpu_memslots() and __gfn_to_memslot() as inline functions"
#endif

/* Under kvm->srcu. */
static inline struct kvm_memory_slot *virtkit_vcpu_memslot(struct kvm_vcpu *vcpu, gfn_t gfn)
{
	return __gfn_to_memslot(kvm_vcpu_memslots(vcpu), gfn);
}

#endif /* VIRTKIT_COMPAT_H */
