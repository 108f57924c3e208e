/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * virtkit.ko userspace ABI: /dev/virtkit and the per-VM file it returns.
 * Documentation/uapi.rst describes every ioctl, its arguments, return
 * values and errors.
 *
 * Rules of this ABI: fixed-width types, explicit padding, user pointers as
 * __u64; every argument struct has `flags` and reserved fields that must be
 * zero (EINVAL otherwise), so they can gain meaning later. Probe features
 * with VIRTKIT_CHECK_EXTENSION, never with the version number.
 */
#ifndef _UAPI_LINUX_VIRTKIT_H
#define _UAPI_LINUX_VIRTKIT_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Bumped only for incompatible changes (none yet). */
#define VIRTKIT_API_VERSION	1

/* The misc device: /dev/virtkit. */
#define VIRTKIT_DEVICE_NAME	"virtkit"

/* Capabilities (VIRTKIT_CHECK_EXTENSION). 0 means absent. */
#define VIRTKIT_CAP_SPP			1 /* 1: SPP_ENABLE/SET/GET/STATS */
#define VIRTKIT_CAP_SPP_FAST_WRITE	2 /* 1: VCPU_RUN completes allowed writes */
#define VIRTKIT_CAP_SPP_MAX_PAGES	3 /* npages limit of one SET/GET call */
/*
 * Guest PKS through the module. Always 0: guest PKS needs KVM's own PKS
 * virtualization (CPUID, CR4.PKS, IA32_PKRS switching and save/restore,
 * its MMU's PK faults), which a module cannot add. The page-walk engine
 * works without it.
 */
#define VIRTKIT_CAP_PKS			4
/*
 * 1: VIRTKIT_VCPU_GUEST_WRMSR performs a WRMSR as the guest's own (KVM's
 * guest write, without its MSR filter). 0 where KVM does not export that
 * write to modules (7.x): the ioctl then fails with EOPNOTSUPP.
 */
#define VIRTKIT_CAP_GUEST_WRMSR		5

/*
 * Sub-page protection: a page is 32 sub-pages of 128 bytes; bit i of a
 * page's access map set = sub-page i writable. All bits set (the default)
 * means not protected.
 */
#define VIRTKIT_SPP_ALL_WRITABLE	0xffffffffu
#define VIRTKIT_SPP_SUBPAGE_SIZE	128
/* GFNs the table describes: guest-physical bits 47:12. */
#define VIRTKIT_SPP_GFN_LIMIT		(1ull << 36)

/* VIRTKIT_ATTACH_VM */
struct virtkit_attach_vm {
	__s32 vm_fd;		/* a KVM VM file descriptor */
	__u32 flags;		/* 0 */
	__u64 reserved[3];	/* 0 */
};

/* VIRTKIT_SPP_ENABLE */
struct virtkit_spp_enable {
	__u32 flags;		/* 0 */
	__u32 reserved[7];	/* 0 */
};

/* VIRTKIT_SPP_SET_ACCESS and VIRTKIT_SPP_GET_ACCESS */
struct virtkit_spp_access {
	__u64 gfn;		/* first guest frame */
	__u64 npages;		/* pages gfn..gfn+npages-1 */
	__u64 maps;		/* user pointer to __u32[npages] access maps */
	__u32 flags;		/* 0 */
	__u32 pad;		/* 0 */
	__u64 reserved[4];	/* 0 */
};

/* VIRTKIT_SPP_GET_STATS: counters since SPP_ENABLE. */
struct virtkit_spp_stats {
	__u64 protected_pages;	/* pages whose map is not ALL_WRITABLE */
	__u64 table_pages;	/* 4 KiB SPPT pages in use */
	__u64 fast_writes;	/* guest writes VCPU_RUN completed in the kernel */
	__u64 user_exits;	/* protected-page writes VCPU_RUN left to userspace */
	__u64 reserved[4];	/* written as 0 */
};

/* VIRTKIT_VCPU_RUN */
struct virtkit_vcpu_run {
	__s32 vcpu_fd;		/* a vCPU of the attached VM */
	__u32 flags;		/* 0 */
	__u64 reserved[3];	/* 0 */
};

/* VIRTKIT_VCPU_GUEST_WRMSR: result */
#define VIRTKIT_GUEST_WRMSR_WRITTEN	0 /* KVM performed the write */
#define VIRTKIT_GUEST_WRMSR_GP		1 /* KVM refused it: the guest gets #GP */

/* VIRTKIT_VCPU_GUEST_WRMSR */
struct virtkit_guest_wrmsr {
	__s32 vcpu_fd;		/* a vCPU of the attached VM */
	__u32 index;		/* the MSR (ECX of the WRMSR) */
	__u64 data;		/* the value (EDX:EAX) */
	__u32 flags;		/* 0 */
	__u32 result;		/* out: VIRTKIT_GUEST_WRMSR_* (ignored on input) */
	__u64 reserved[5];	/* 0 */
};

/*
 * The ioctl magic: unlisted in the kernel's ioctl-number.rst and unused by
 * the UAPI headers of 6.1, 6.12 and 7.3 (0xE5, used before 0.2, is FUSE's).
 */
#define VIRTKIT_IO	0xE7

/* /dev/virtkit and the per-VM file */
#define VIRTKIT_GET_API_VERSION	_IO(VIRTKIT_IO, 0x00)
#define VIRTKIT_CHECK_EXTENSION	_IO(VIRTKIT_IO, 0x01)
/* /dev/virtkit: returns a new per-VM file descriptor (O_CLOEXEC) */
#define VIRTKIT_ATTACH_VM	_IOW(VIRTKIT_IO, 0x02, struct virtkit_attach_vm)

/* per-VM file */
#define VIRTKIT_SPP_ENABLE	_IOW(VIRTKIT_IO, 0x10, struct virtkit_spp_enable)
#define VIRTKIT_SPP_SET_ACCESS	_IOW(VIRTKIT_IO, 0x11, struct virtkit_spp_access)
#define VIRTKIT_SPP_GET_ACCESS	_IOW(VIRTKIT_IO, 0x12, struct virtkit_spp_access)
#define VIRTKIT_SPP_GET_STATS	_IOR(VIRTKIT_IO, 0x13, struct virtkit_spp_stats)
#define VIRTKIT_VCPU_RUN	_IOW(VIRTKIT_IO, 0x20, struct virtkit_vcpu_run)
#define VIRTKIT_VCPU_GUEST_WRMSR _IOWR(VIRTKIT_IO, 0x21, struct virtkit_guest_wrmsr)

#endif /* _UAPI_LINUX_VIRTKIT_H */
