/* SPDX-License-Identifier: MIT */
/*
 * <linux/kvm.h> for C++.
 *
 * Kernel UAPI headers before 6.5 declare flexible arrays with
 * __DECLARE_FLEX_ARRAY, an anonymous struct holding an empty struct. An empty
 * struct has size 0 in C but 1 in C++, so in C++ struct kvm_msr_list,
 * kvm_cpuid2, kvm_msrs, kvm_xsave... grow, and every ioctl number computed
 * from them (KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2, KVM_GET_MSRS...) differs
 * from the kernel's, which then rejects them with EINVAL. Redefine the macro
 * the way newer headers do for C++ before including <linux/kvm.h>, and check
 * the layouts against the C ABI.
 *
 * Include this (or any virtkit header) before anything that includes
 * <linux/kvm.h>; the static_asserts below catch the wrong order.
 */
#ifndef VIRTKIT_KVM_H
#define VIRTKIT_KVM_H

#include <linux/stddef.h>

#ifdef __cplusplus
#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]
#endif

#include <linux/kvm.h>

#ifdef __cplusplus
static_assert(sizeof(struct kvm_msr_list) == 4 && sizeof(struct kvm_msrs) == 8 &&
		      sizeof(struct kvm_cpuid2) == 8 && sizeof(struct kvm_signal_mask) == 4 &&
		      sizeof(struct kvm_xsave) == 4096 && sizeof(struct kvm_irq_routing) == 8,
	      "KVM UAPI structs differ from the kernel's C layout: include <virtkit/kvm.h> "
	      "before <linux/kvm.h>");
#endif

#endif /* VIRTKIT_KVM_H */
