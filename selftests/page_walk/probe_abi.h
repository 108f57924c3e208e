/* SPDX-License-Identifier: MIT */
/*
 * The contract between the access-probe image (probe/, a freestanding
 * x86-64 program that performs memory accesses and records the faults the
 * processor raises) and the host programs that build its page tables and
 * case table and compare the faults with the page-walk engine's prediction
 * (access_matrix.cpp): the QEMU oracle (qemu_oracle.cpp) and the /dev/kvm
 * comparison (selftests/x86/page_walk_host.cpp).
 *
 * Guest-physical layout (identical under QEMU and KVM):
 *
 *   0x100000  the probe image (PW_IMAGE_BASE): multiboot header and 32-bit
 *             entry
 *   0x101000  its user-mode page: the CPL3 access stub (PW_USER_BASE)
 *   0x102000  the user-mode stack page (PW_USER_STACK)
 *   0x103000  supervisor code, data and stacks, up to at most 0x200000
 *   0x200000  the probe frame (PW_PROBE_PHYS): every probed linear address
 *             maps here (4 KiB, 2 MiB and 1 GiB leaves alike). Byte 0 is
 *             0xc3 (RET: fetched, read and written back as is), bytes 8..15
 *             a DPL3 data-segment descriptor for the implicit accesses.
 *   0x400000  the case image (PW_CASES_BASE), written by the host: struct
 *             pw_header, paging structures, the case table, the results.
 *
 * The image starts in 32-bit protected mode with paging off (multiboot, or
 * the KVM test's flat 32-bit state), at the multiboot header's entry. It
 * enters long mode with the case image's first root (CR3), runs every case,
 * writes struct pw_header.out and ends with an OUT to PW_EXIT_PORT:
 * QEMU's isa-debug-exit, or a KVM_EXIT_IO for the KVM test. PW_EXIT_OK means
 * every case ran; any other value is a PW_EXIT_* reason.
 */
#ifndef VIRTKIT_PAGE_WALK_PROBE_ABI_H
#define VIRTKIT_PAGE_WALK_PROBE_ABI_H

#ifdef __ASSEMBLER__
#define PW_U64(x) x
#else
#include <linux/types.h>
#define PW_U64(x) x##ull
#endif

#define PW_IMAGE_BASE		0x100000
#define PW_USER_BASE		0x101000	/* user stub page */
#define PW_USER_STACK		0x102000	/* user stack page */
#define PW_PROBE_PHYS		0x200000
#define PW_PROBE_DESC		8		/* descriptor offset in a probe page */
#define PW_CASES_BASE		0x400000
#define PW_EXIT_PORT		0xf4

#define PW_MAGIC		PW_U64(0x31454c4241544b56)	/* "VKTABLE1" */

/* pw_header.out.status and the value written to PW_EXIT_PORT. */
#define PW_EXIT_OK		0x10
#define PW_EXIT_BAD_HEADER	0x11	/* magic or layout wrong */
#define PW_EXIT_NO_LONG_MODE	0x12	/* CPUID 80000001H:EDX[29] clear */
#define PW_EXIT_NO_LA57		0x13	/* 5-level asked, CPUID 7:ECX[16] clear */
#define PW_EXIT_UNEXPECTED	0x14	/* an exception outside a probe (out.vector) */

/* Selectors of the image's GDT (also the LDT descriptor it points at a probe). */
#define PW_SEL_KERNEL_CS	0x08
#define PW_SEL_KERNEL_DS	0x10
#define PW_SEL_USER_DS		0x18	/* used with RPL 3 */
#define PW_SEL_USER_CS		0x20	/* used with RPL 3 */
#define PW_SEL_TSS		0x28	/* 16 bytes */
#define PW_SEL_LDT		0x38	/* 16 bytes; base = the probed page */
/* Index 1 of the LDT: the descriptor at PW_PROBE_DESC of the probed page. */
#define PW_SEL_PROBE		0x0c

/* Access kinds (pw_case.ctl bits 2:0). */
#define PW_ACC_READ		0	/* mov (la), %al */
#define PW_ACC_WRITE		1	/* mov $0xc3, (la) */
#define PW_ACC_FETCH		2	/* call *la (la holds RET) */
#define PW_ACC_IMPLICIT_READ	3	/* mov PW_SEL_PROBE, %ds: descriptor read */
#define PW_ACC_IMPLICIT_WRITE	4	/* the same, accessed bit clear: read, then write */
#define PW_ACC_MASK		7

/* pw_case.ctl: the state the access runs in. */
#define PW_CTL_CPL3		(1u << 3)
#define PW_CTL_WP		(1u << 4)	/* CR0.WP */
#define PW_CTL_SMEP		(1u << 5)	/* CR4.SMEP */
#define PW_CTL_SMAP		(1u << 6)	/* CR4.SMAP */
#define PW_CTL_AC		(1u << 7)	/* EFLAGS.AC */
#define PW_CTL_PKE		(1u << 8)	/* CR4.PKE */
#define PW_CTL_PKS		(1u << 9)	/* CR4.PKS */
#define PW_CTL_NXE		(1u << 10)	/* EFER.NXE */
#define PW_CTL_ROOT_SHIFT	12		/* bits 13:12: index in pw_header.roots */
#define PW_CTL_ROOT_MASK	(3u << PW_CTL_ROOT_SHIFT)
#define PW_CTL_KEYS_SHIFT	16		/* bits 23:16: index in pw_header.keys */
#define PW_CTL_KEYS_MASK	(0xffu << PW_CTL_KEYS_SHIFT)
#define PW_CTL_KNOWN		0x00ff37ffu

/* pw_result.vector when the access completed without an exception. */
#define PW_NO_FAULT		0xff
/* pw_result.flags */
#define PW_RES_RAN		(1u << 0)	/* the case was executed */
#define PW_RES_CR2_IN_PAGE	(1u << 1)	/* #PF: CR2 in the probed page */
#define PW_RES_UNSUPPORTED	(1u << 2)	/* the CPU lacks a feature the case needs */

/* pw_header.out.features: what CPUID reported inside the guest. */
#define PW_FEAT_NX		(1u << 0)
#define PW_FEAT_SMEP		(1u << 1)
#define PW_FEAT_SMAP		(1u << 2)
#define PW_FEAT_PKU		(1u << 3)
#define PW_FEAT_PKS		(1u << 4)
#define PW_FEAT_LA57		(1u << 5)
#define PW_FEAT_PAGE1GB		(1u << 6)	/* 80000001H:EDX[26] */

#define PW_MAX_ROOTS		4
#define PW_MAX_KEYSETS		256

/* Offsets in struct pw_header, for the assembly (checked in probe/main.c). */
#define PW_HDR_LA57		12
#define PW_HDR_ROOT0		16
#define PW_HDR_STATUS		(16 + 8 * PW_MAX_ROOTS + 24 + 8 * PW_MAX_KEYSETS)
#define PW_HDR_VECTOR		(PW_HDR_STATUS + 12)

#ifndef __ASSEMBLER__

/* One access: at linear address la, in the state ctl describes. */
struct pw_case {
	__u64 la;
	__u32 ctl;
	__u32 id;		/* the host's case number, not read by the image */
};

struct pw_result {
	__u8 vector;		/* PW_NO_FAULT, or the exception vector */
	__u8 flags;		/* PW_RES_* */
	__u16 pad;
	__u32 error_code;
};

/* A PKRU/PKRS pair (pw_case.ctl's keys index). */
struct pw_keyset {
	__u32 pkru;
	__u32 pkrs;
};

/* At PW_CASES_BASE. All addresses are guest-physical and identity mapped. */
struct pw_header {
	__u64 magic;		/* PW_MAGIC */
	__u32 header_size;	/* sizeof(struct pw_header) */
	__u32 la57;		/* 1: 5-level paging, 0: 4-level */
	__u64 roots[PW_MAX_ROOTS];	/* CR3 values; roots[0] at boot */
	__u64 cases;		/* struct pw_case[ncases] */
	__u64 results;		/* struct pw_result[ncases], zeroed by the host */
	__u64 ncases;
	struct pw_keyset keys[PW_MAX_KEYSETS];
	/* Written by the image. */
	struct {
		__u32 status;		/* PW_EXIT_* */
		__u32 features;		/* PW_FEAT_* */
		__u32 maxphyaddr;	/* CPUID 80000008H:EAX[7:0] */
		__u32 vector;		/* PW_EXIT_UNEXPECTED: the exception */
		__u64 done;		/* cases run */
	} out;
};

#endif /* __ASSEMBLER__ */

#endif /* VIRTKIT_PAGE_WALK_PROBE_ABI_H */
