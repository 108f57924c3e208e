/* SPDX-License-Identifier: MIT */
/*
 * The guest page-walk permission engine: what the processor does with one
 * linear address, given a vCPU's paging state and guest memory. Shared by
 * libvirtkit and virtkit.ko, so both answer "would this access fault, and
 * why?" with one implementation.
 *
 * Covered (Intel SDM vol. 3, chapter 4): no paging (CR0.PG=0, identity),
 * 4-level and 5-level paging (EFER.LMA=1, CR4.LA57), 4 KiB, 2 MiB and
 * 1 GiB pages, reserved bits, NX, CR0.WP, U/S, SMEP, SMAP (EFLAGS.AC,
 * implicit supervisor accesses), protection keys (PKRU for user-mode
 * addresses with CR4.PKE, IA32_PKRS for supervisor-mode addresses with
 * CR4.PKS). Legacy 32-bit and PAE paging (CR0.PG=1, EFER.LMA=0) are not:
 * VK_WALK_UNSUPPORTED. Where the SDM leaves room, the engine does what
 * QEMU's TCG does (target/i386/tcg/sysemu/excp_helper.c, mmu_translate());
 * page_walk.c says where.
 *
 * A pure query: the engine reads paging-structure entries through the
 * caller's reader and never writes guest memory, so it sets no accessed or
 * dirty bits (the processor would set A in every entry it uses, and D in
 * the leaf on a write). It has no TLB: the answer is what a walk of the
 * tables as they are now gives.
 *
 * Freestanding C: no libc, no kernel API, no allocation, no recursion.
 * Reentrant: all state is in the arguments.
 */
#ifndef VIRTKIT_COMMON_PAGE_WALK_H
#define VIRTKIT_COMMON_PAGE_WALK_H

#include <linux/types.h>

/* The architectural bits the engine reads. */
#define VK_WALK_CR0_WP		(1ull << 16)
#define VK_WALK_CR0_PG		(1ull << 31)
#define VK_WALK_CR4_LA57	(1ull << 12)
#define VK_WALK_CR4_SMEP	(1ull << 20)
#define VK_WALK_CR4_SMAP	(1ull << 21)
#define VK_WALK_CR4_PKE		(1ull << 22)
#define VK_WALK_CR4_PKS		(1ull << 24)
#define VK_WALK_EFER_LMA	(1ull << 10)
#define VK_WALK_EFER_NXE	(1ull << 11)
#define VK_WALK_RFLAGS_AC	(1ull << 18)

/* Paging-structure entry bits. */
#define VK_WALK_PTE_P		(1ull << 0)
#define VK_WALK_PTE_W		(1ull << 1)
#define VK_WALK_PTE_U		(1ull << 2)
#define VK_WALK_PTE_A		(1ull << 5)
#define VK_WALK_PTE_D		(1ull << 6)
#define VK_WALK_PTE_PS		(1ull << 7)
#define VK_WALK_PTE_PAT_LARGE	(1ull << 12)	/* PAT of a 2M/1G leaf */
#define VK_WALK_PTE_ADDR	0x000ffffffffff000ull	/* bits 51:12 */
#define VK_WALK_PTE_KEY_SHIFT	59			/* key: bits 62:59 */
#define VK_WALK_PTE_KEY		(0xfull << VK_WALK_PTE_KEY_SHIFT)
#define VK_WALK_PTE_NX		(1ull << 63)

/* #PF error code bits. */
#define VK_WALK_PFEC_P		(1u << 0)
#define VK_WALK_PFEC_W		(1u << 1)
#define VK_WALK_PFEC_U		(1u << 2)
#define VK_WALK_PFEC_RSVD	(1u << 3)
#define VK_WALK_PFEC_ID		(1u << 4)
#define VK_WALK_PFEC_PK		(1u << 5)

/*
 * An access: one type, optionally marked implicit. Whether it is a
 * user-mode or a supervisor-mode access follows from the state's CPL: an
 * explicit access at CPL 3 is user-mode, every other access (explicit at
 * CPL 0-2, or implicit at any CPL: GDT/LDT/IDT/TSS accesses, ...) is
 * supervisor-mode.
 */
#define VK_WALK_READ		0u
#define VK_WALK_WRITE		1u
#define VK_WALK_FETCH		2u
#define VK_WALK_TYPE_MASK	3u
#define VK_WALK_IMPLICIT	(1u << 2)	/* data accesses only */

/* struct vk_walk.allowed: the access types that would succeed. */
#define VK_WALK_ALLOW_READ	(1u << VK_WALK_READ)
#define VK_WALK_ALLOW_WRITE	(1u << VK_WALK_WRITE)
#define VK_WALK_ALLOW_FETCH	(1u << VK_WALK_FETCH)

/* struct vk_walk.rights: the page's own rights, combined over the levels. */
#define VK_WALK_RIGHT_W		(1u << 0)	/* R/W=1 at every level */
#define VK_WALK_RIGHT_U		(1u << 1)	/* U/S=1 at every level */
#define VK_WALK_RIGHT_X		(1u << 2)	/* XD=0 at every level (or NXE=0) */

/* Page sizes in struct vk_walk.page_size. */
#define VK_WALK_PAGE_4K		0x1000ull
#define VK_WALK_PAGE_2M		0x200000ull
#define VK_WALK_PAGE_1G		0x40000000ull

/*
 * Departures from the SDM, to model an implementation that has them
 * (struct vk_walk_state.quirks).
 */
/*
 * QEMU's TCG (mmu_translate() since its 2022 rewrite) reports a reserved-bit
 * #PF with P=0; the SDM (4.7: "bit 3 of the error code can be set only if
 * bit 0 is also set") and hardware report P=1.
 */
#define VK_WALK_QUIRK_RSVD_NO_P	(1u << 0)
/*
 * QEMU's TCG lets EFLAGS.AC=1 at CPL 0-2 lift SMAP for implicit
 * supervisor-mode accesses too (cpu_mmu_index_kernel()); the SDM (4.6.1),
 * KVM's permission_fault() (PFERR_IMPLICIT_ACCESS) and hardware (measured
 * through kvm_pvm on an AMD CPU) apply SMAP to implicit accesses whatever
 * AC is.
 */
#define VK_WALK_QUIRK_IMPLICIT_SMAP_AC	(1u << 1)

/*
 * The processor's paging features (struct vk_walk_state.features), as the
 * vCPU's CPUID reports them. A feature that is absent changes the rules:
 * without Page1GB, PS in a PDPTE is a reserved bit (#PF RSVD); without NX,
 * SMEP, SMAP, PKU, PKS or LA57 the matching EFER or CR4 bit cannot be set
 * (MOV to CR4, WRMSR and KVM_SET_SREGS refuse it), so a state with one set
 * is VK_WALK_EINVAL. MAXPHYADDR is vk_walk_state.maxphyaddr.
 */
#define VK_WALK_FEAT_NX		(1u << 0)	/* CPUID.80000001H:EDX[20] */
#define VK_WALK_FEAT_PAGE1GB	(1u << 1)	/* CPUID.80000001H:EDX[26] */
#define VK_WALK_FEAT_SMEP	(1u << 2)	/* CPUID.(7,0):EBX[7] */
#define VK_WALK_FEAT_SMAP	(1u << 3)	/* CPUID.(7,0):EBX[20] */
#define VK_WALK_FEAT_PKU	(1u << 4)	/* CPUID.(7,0):ECX[3] */
#define VK_WALK_FEAT_LA57	(1u << 5)	/* CPUID.(7,0):ECX[16] */
#define VK_WALK_FEAT_PKS	(1u << 6)	/* CPUID.(7,0):ECX[31] */
#define VK_WALK_FEAT_ALL	0x7fu

#ifdef __cplusplus
extern "C" {
#endif

/* The vCPU state a walk depends on (KVM_GET_SREGS/REGS and two MSRs). */
struct vk_walk_state {
	__u64 cr0;
	__u64 cr3;
	__u64 cr4;
	__u64 efer;		/* LMA is read as given, not derived */
	__u64 rflags;		/* AC only */
	__u32 pkru;
	__u32 pkrs;		/* IA32_PKRS bits 31:0 (63:32 are reserved) */
	__u32 cpl;		/* 0..3 */
	__u32 maxphyaddr;	/* CPUID.80000008H:EAX[7:0], 32..52 */
	__u32 quirks;		/* VK_WALK_QUIRK_*; 0: the SDM */
	__u32 features;		/* VK_WALK_FEAT_*: the vCPU's CPUID */
};

/*
 * Guest-physical memory: read the 8-byte little-endian paging-structure
 * entry at gpa (8-byte aligned) into *val. 0 on success; any other value is
 * a failure of the reader (no memory there, an I/O error), reported as
 * VK_WALK_EREAD, never as a guest fault.
 */
struct vk_walk_mem {
	int (*read)(void *ctx, __u64 gpa, __u64 *val);
	void *ctx;
};

/* The results of vk_walk_translate(), also in struct vk_walk.result. */
enum {
	VK_WALK_OK = 0,		/* gpa, page_size, rights, key, allowed */
	VK_WALK_PF = 1,		/* #PF with error_code */
	VK_WALK_GP = 2,		/* #GP(0): a non-canonical linear address */
	VK_WALK_EREAD = -1,	/* the reader failed at read_gpa */
	VK_WALK_UNSUPPORTED = -2, /* legacy 32-bit or PAE paging */
	VK_WALK_EINVAL = -3,	/* a bad access or state (cpl > 3, a control
				   bit of a feature the CPU lacks) */
};

/* Paging-structure levels, as the index of vk_walk.entry[]. */
enum {
	VK_WALK_PT = 1,		/* PTE (4 KiB leaf) */
	VK_WALK_PD = 2,		/* PDE (2 MiB leaf with PS) */
	VK_WALK_PDPT = 3,	/* PDPTE (1 GiB leaf with PS) */
	VK_WALK_PML4 = 4,
	VK_WALK_PML5 = 5,
};

struct vk_walk {
	int result;		/* the return value of vk_walk_translate() */
	__u32 error_code;	/* VK_WALK_PF: VK_WALK_PFEC_* */
	/*
	 * VK_WALK_OK, and a #PF with P=1 and RSVD=0 (a protection or key
	 * violation; the walk reached the leaf): the translation, the page
	 * size, the rights of the page (VK_WALK_RIGHT_*), its protection key
	 * (leaf bits 62:59; 0 without paging) and the access types that the
	 * same mode (CPL, implicit or not) may perform (VK_WALK_ALLOW_*,
	 * keys included). Zero otherwise.
	 */
	__u64 gpa;
	__u64 page_size;
	__u32 rights;
	__u32 key;
	__u32 allowed;
	/*
	 * The level of the last entry read (the leaf on success; where a
	 * #PF or reader failure stopped the walk); 0 without paging or on #GP.
	 */
	int level;
	/*
	 * The entries read, by level (entry[level]..entry[top]), and their
	 * guest-physical addresses; the others are 0. VK_WALK_EREAD: the
	 * reader failed on entry_gpa[level] (entry[level] is 0).
	 */
	__u64 entry[6];
	__u64 entry_gpa[6];
	__u64 read_gpa;		/* VK_WALK_EREAD: the address that failed */
};

/*
 * Translate linear address la for access (VK_WALK_READ/WRITE/FETCH, with
 * VK_WALK_IMPLICIT for an implicit supervisor-mode data access) in state s,
 * reading guest memory through mem. Fills *w and returns w->result.
 *
 * The fault is the one the processor would raise for an access of one byte
 * at la (an access crossing a page boundary is two walks). With CR0.PG=0
 * the translation is the identity (gpa = la, as given: the caller passes a
 * 32-bit linear address outside long mode), a 4 KiB page with all rights.
 */
int vk_walk_translate(const struct vk_walk_state *s,
		      const struct vk_walk_mem *mem, __u64 la,
		      unsigned int access, struct vk_walk *w);

#ifdef __cplusplus
}
#endif

#endif /* VIRTKIT_COMMON_PAGE_WALK_H */
