/* SPDX-License-Identifier: MIT */
/*
 * The sub-page protection table (SPPT): the one permission store of
 * sub-page write protection, shared by libvirtkit and virtkit.ko.
 *
 * Format (Documentation/spp.rst, after Intel's SPP design): four levels like
 * EPT, indexed by GPA bits 47:39 (L4), 38:30 (L3), 29:21 (L2) and 20:12
 * (L1).
 *
 *   L4E/L3E/L2E: bit 0 valid; bits 11:1 reserved (0); bits N-1:12 address
 *                of the next 4 KiB table; bits 63:N reserved (0), where N
 *                is the table's address width (maxphyaddr).
 *   L1E:         bit 2i = sub-page i (bytes 128i..128i+127) writable;
 *                bit 2i+1 reserved (0), for i = 0..31.
 *
 * An L1E has no valid bit: a new L1 table is filled with all-writable
 * entries, and a table whose entries are all default again is freed, so the
 * memory used is bounded by the protected pages (at most four table pages
 * per protected page, 4 KiB per 512 protected pages in a run).
 *
 * Freestanding C: no libc, no kernel API, no allocation of its own. Table
 * pages come from the owner's vk_sppt_ops (get_zeroed_page()/__pa() in the
 * kernel, so the in-kernel table is bit for bit what hardware would walk;
 * aligned heap pages in userspace). Not thread-safe: the owner serialises
 * updates against lookups.
 */
#ifndef VIRTKIT_COMMON_SPP_TABLE_H
#define VIRTKIT_COMMON_SPP_TABLE_H

#include <linux/types.h>

#define VK_SPP_SUBPAGE_SIZE	128
#define VK_SPP_SUBPAGES		32
/* The default access map: every sub-page writable, i.e. not protected. */
#define VK_SPP_ALL_WRITABLE	0xffffffffu
/* The L1E of an unprotected page. */
#define VK_SPPT_L1E_DEFAULT	0x5555555555555555ull
/* GFNs the 4-level table can describe: GPA bits 47:12. */
#define VK_SPPT_GFN_LIMIT	(1ull << 36)

#ifdef __cplusplus
extern "C" {
#endif

struct vk_sppt_ops {
	/*
	 * A zeroed 4 KiB table page: its address (bits 11:0 clear, below
	 * 2^maxphyaddr), or 0 when out of memory.
	 */
	__u64 (*alloc)(void *ctx);
	void (*free)(void *ctx, __u64 addr);
	/* The table page at addr, for reading and writing its 512 entries. */
	__u64 *(*map)(void *ctx, __u64 addr);
	/*
	 * Optional (NULL: none): called between the 512-page spans of a long
	 * update or read, where the kernel lets others run (cond_resched()).
	 */
	void (*relax)(void *ctx);
};

struct vk_sppt {
	__u64 root;		/* address of the L4 table; 0 while empty */
	unsigned int maxphyaddr;
	__u64 pages;		/* table pages in use */
	const struct vk_sppt_ops *ops;
	void *ctx;
};

/* Return values of the functions below. */
enum {
	VK_SPPT_OK = 0,
	VK_SPPT_ENOMEM = -1,	/* ops->alloc failed; nothing changed */
	VK_SPPT_ERANGE = -2,	/* range beyond VK_SPPT_GFN_LIMIT or wraps */
	VK_SPPT_EMISCONFIG = -3, /* a lookup met a misconfigured entry */
};

/* What a hardware-style lookup of one GPA found. */
enum vk_sppt_walk_result {
	VK_SPPT_WALK_OK,	/* map holds the page's access map */
	VK_SPPT_WALK_MISS,	/* a non-valid L4E/L3E/L2E at `level` */
	VK_SPPT_WALK_MISCONFIG, /* reserved bits set in the entry at `level` */
};

struct vk_sppt_walk {
	enum vk_sppt_walk_result result;
	int level;		/* 4..1: where the walk stopped */
	__u64 entry;		/* the entry read at `level` */
	__u32 map;		/* WALK_OK: the access map */
};

/* maxphyaddr: the address width of table pages, 13..52 (hardware: CPUID). */
void vk_sppt_init(struct vk_sppt *t, const struct vk_sppt_ops *ops, void *ctx,
		  unsigned int maxphyaddr);
/* Free every table page; the table is empty (and usable) afterwards. */
void vk_sppt_destroy(struct vk_sppt *t);

/* Access map <-> L1E: bit i <-> bit 2i. */
__u64 vk_spp_map_to_l1e(__u32 map);
__u32 vk_spp_l1e_to_map(__u64 l1e);

/*
 * The hardware lookup of one guest-physical address. A GPA at or above 2^48
 * is outside the table: a miss at level 4 with entry 0.
 */
void vk_sppt_lookup(const struct vk_sppt *t, __u64 gpa, struct vk_sppt_walk *w);

/*
 * Access maps of pages gfn..gfn+npages-1 into maps[]; a page the table does
 * not describe (a miss) reads as VK_SPP_ALL_WRITABLE. O(npages).
 * VK_SPPT_ERANGE or VK_SPPT_EMISCONFIG (maps[] then undefined). npages == 0
 * does nothing and succeeds, whatever gfn is.
 */
int vk_sppt_get(const struct vk_sppt *t, __u64 gfn, __u64 npages, __u32 *maps);

/*
 * Set the access maps of pages gfn..gfn+npages-1 from maps[]. All or
 * nothing: on VK_SPPT_ENOMEM, VK_SPPT_ERANGE or VK_SPPT_EMISCONFIG (a
 * misconfigured L4E/L3E/L2E on the way) the table describes exactly what it
 * described before. Tables left all-default are freed. npages == 0 does
 * nothing and succeeds. O(npages).
 */
int vk_sppt_set(struct vk_sppt *t, __u64 gfn, __u64 npages, const __u32 *maps);

#ifndef __KERNEL__
/*
 * Set every page of gfn..gfn+npages-1 to one map (e.g. to clear a range).
 * libvirtkit only: not built into virtkit.ko, which has no use for it.
 */
int vk_sppt_fill(struct vk_sppt *t, __u64 gfn, __u64 npages, __u32 map);
#endif

#ifdef __cplusplus
}
#endif

#endif /* VIRTKIT_COMMON_SPP_TABLE_H */
