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
 * - The guest's own WRMSR: kvm_set_msr(), vcpu_load(), vcpu_put() and
 *   kvm_read_l1_tsc() are exported to every module up to 6.x; 7.x renamed the write
 *   (kvm_emulate_msr_write(), __kvm_emulate_msr_write()) and exports it
 *   and vcpu_load() to kvm-amd/kvm-intel only, so there is none there.
 */
#ifndef VIRTKIT_COMPAT_H
#define VIRTKIT_COMPAT_H

#include <linux/kvm_host.h>
#include <asm/msr.h>

#include "conftest.h"

#ifndef VIRTKIT_HAVE_INLINE_VCPU_MEMSLOT_LOOKUP
#error "virtkit.ko needs kvm_vcpu_memslots() and __gfn_to_memslot() as inline functions"
#endif

/* Under kvm->srcu. */
static inline struct kvm_memory_slot *virtkit_vcpu_memslot(struct kvm_vcpu *vcpu, gfn_t gfn)
{
	return __gfn_to_memslot(kvm_vcpu_memslots(vcpu), gfn);
}

/* Whether virtkit_guest_wrmsr() can write (VIRTKIT_CAP_GUEST_WRMSR). */
static inline bool virtkit_guest_wrmsr_available(void)
{
	return IS_ENABLED(VIRTKIT_HAVE_GUEST_WRMSR);
}

/*
 * Write an MSR as the vCPU's guest does with WRMSR: KVM's guest write
 * (host_initiated false, kvm.ignore_msrs applied), without the MSR filter.
 * The caller holds vcpu->mutex; the vCPU is loaded and kvm->srcu held
 * around the write, as KVM's KVM_SET_MSRS does. Afterwards the guest's TSC
 * is recorded as KVM records it after every exit from the guest
 * (vcpu_enter_guest()): where the host's TSC is unstable, the next
 * vcpu_load() puts the guest's TSC back to that value, which would undo a
 * write of IA32_TSC or IA32_TSC_ADJUST made here. Returns 0 when KVM wrote
 * it, > 0 when KVM refused it (the guest would get #GP), < 0 an error
 * (the guest's WRMSR would fail KVM_RUN with it).
 */
static inline int virtkit_guest_wrmsr(struct kvm_vcpu *vcpu, u32 index, u64 data)
{
#ifdef VIRTKIT_HAVE_GUEST_WRMSR
	int idx, r;

	if (READ_ONCE(vcpu->kvm->vm_dead))
		return -EIO;
	vcpu_load(vcpu);
	idx = srcu_read_lock(&vcpu->kvm->srcu);
	r = kvm_set_msr(vcpu, index, data);
	vcpu->arch.last_guest_tsc = kvm_read_l1_tsc(vcpu, rdtsc());
	srcu_read_unlock(&vcpu->kvm->srcu, idx);
	vcpu_put(vcpu);
	return r;
#else
	return -EOPNOTSUPP;
#endif
}

#endif /* VIRTKIT_COMPAT_H */
