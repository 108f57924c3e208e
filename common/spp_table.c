// SPDX-License-Identifier: MIT
/*
 * The sub-page protection table: see spp_table.h for the format.
 *
 * Freestanding C11 that also builds in the kernel: no libc, no allocation
 * of its own (table pages come from t->ops), no floating point. Lookups
 * (sppt_descend()) are iterative; only vk_sppt_destroy() recurses, at most
 * four levels deep.
 *
 * Invariant kept by every update: a table page reachable from the root is
 * never "empty", i.e. an L1 table has at least one entry other than
 * VK_SPPT_L1E_DEFAULT and an L2/L3/L4 table has at least one valid entry.
 * So the memory used is bounded by the protected pages, and the rollback of
 * a failed update (which prunes the empty tables of its range) frees
 * exactly the tables that update created.
 */
#include "spp_table.h"

/* The kernel's <linux/types.h> defines NULL; the uapi one does not. */
#ifndef NULL
#define NULL ((void *)0)
#endif

#define SPPT_ENTRIES		512
#define SPPT_INDEX_BITS		9
#define SPPT_VALID		0x1ull
/* Bits 11:1 of an L4E/L3E/L2E are reserved. */
#define SPPT_LOW_RSVD		0xffeull
/* The odd bits of an L1E are reserved. */
#define SPPT_L1E_RSVD		0xaaaaaaaaaaaaaaaaull
/* Pages covered by one entry of a level-l table: 1 << sppt_shift(l). */
#define SPPT_L1_PAGES		(1ull << 9)	/* an L1 table: 2 MiB */
#define SPPT_L2_PAGES		(1ull << 18)	/* an L2 table: 1 GiB */
#define SPPT_L3_PAGES		(1ull << 27)	/* an L3 table: 512 GiB */
/* The GPAs a 4-level table describes: bits 47:0. */
#define SPPT_GPA_BITS		48

/* Where a lookup of one GFN stopped, and the tables it went through. */
struct sppt_path {
	__u64 *tbl[5];		/* tbl[l]: the level-l table, or NULL */
	__u64 addr[5];		/* its address */
	/*
	 * VK_SPPT_WALK_OK: level 1, tbl[1..4] all set (the L1E is not read).
	 * MISS/MISCONFIG: the level of the entry that stopped the walk (level
	 * 4 with tbl[4] == NULL for an empty table); tbl[level] is set,
	 * tbl[level - 1] and below are NULL.
	 */
	enum vk_sppt_walk_result result;
	int level;
	__u64 entry;		/* the entry that stopped the walk */
};

/* The source of the new maps of an update: maps[] or one map. */
struct sppt_src {
	const __u32 *maps;	/* NULL: every page gets `map` */
	__u32 map;
	__u64 gfn;		/* the page of maps[0] */
};

static __u64 sppt_high_rsvd(const struct vk_sppt *t)
{
	if (t->maxphyaddr >= 64)
		return 0;
	return ~0ull << t->maxphyaddr;
}

/* The reserved bits of an L4E/L3E/L2E. */
static __u64 sppt_rsvd(const struct vk_sppt *t)
{
	return (sppt_high_rsvd(t) | SPPT_LOW_RSVD) & ~SPPT_VALID;
}

/* The next-table address field of an L4E/L3E/L2E: bits N-1:12. */
static __u64 sppt_addr(const struct vk_sppt *t, __u64 entry)
{
	return entry & ~(sppt_high_rsvd(t) | 0xfffull);
}

static unsigned int sppt_index(__u64 gfn, int level)
{
	return (gfn >> (SPPT_INDEX_BITS * (level - 1))) & (SPPT_ENTRIES - 1);
}

static __u64 *sppt_map(const struct vk_sppt *t, __u64 addr)
{
	return t->ops->map(t->ctx, addr);
}

static void sppt_relax(const struct vk_sppt *t)
{
	if (t->ops->relax)
		t->ops->relax(t->ctx);
}

static __u64 sppt_min(__u64 a, __u64 b)
{
	return a < b ? a : b;
}

/* The first page after the L1 table span holding gfn, capped at end. */
static __u64 sppt_span_end(__u64 gfn, __u64 end)
{
	return sppt_min((gfn | (SPPT_L1_PAGES - 1)) + 1, end);
}

/* Whether gfn..gfn+npages-1 lies within the table's reach. */
static int sppt_range_ok(__u64 gfn, __u64 npages)
{
	return gfn < VK_SPPT_GFN_LIMIT && npages <= VK_SPPT_GFN_LIMIT - gfn;
}

static __u32 sppt_src_map(const struct sppt_src *s, __u64 gfn)
{
	return s->maps ? s->maps[gfn - s->gfn] : s->map;
}

/* Whether any page of gfn..end-1 gets a map other than all-writable. */
static int sppt_src_protects(const struct sppt_src *s, __u64 gfn, __u64 end)
{
	if (!s->maps)
		return s->map != VK_SPP_ALL_WRITABLE;
	for (; gfn < end; gfn++)
		if (s->maps[gfn - s->gfn] != VK_SPP_ALL_WRITABLE)
			return 1;
	return 0;
}

/* The hardware lookup of gfn's L1 table; see struct sppt_path. */
static void sppt_descend(const struct vk_sppt *t, __u64 gfn,
			 struct sppt_path *p)
{
	__u64 rsvd = sppt_rsvd(t);
	int l;

	for (l = 0; l < 5; l++) {
		p->tbl[l] = NULL;
		p->addr[l] = 0;
	}
	p->result = VK_SPPT_WALK_MISS;
	p->level = 4;
	p->entry = 0;
	if (!t->root)
		return;
	p->addr[4] = t->root;
	p->tbl[4] = sppt_map(t, t->root);
	for (l = 4; l > 1; l--) {
		__u64 e = p->tbl[l][sppt_index(gfn, l)];

		p->level = l;
		p->entry = e;
		if (!(e & SPPT_VALID))
			return;
		if (e & rsvd) {
			p->result = VK_SPPT_WALK_MISCONFIG;
			return;
		}
		p->addr[l - 1] = sppt_addr(t, e);
		p->tbl[l - 1] = sppt_map(t, p->addr[l - 1]);
	}
	p->result = VK_SPPT_WALK_OK;
	p->level = 1;
	p->entry = 0;
}

/*
 * Complete a missing path to gfn's L1 table (p: a MISS from sppt_descend()).
 * On VK_SPPT_ENOMEM the tables created so far stay linked (and empty): the
 * caller prunes them.
 */
static int sppt_populate(struct vk_sppt *t, __u64 gfn, struct sppt_path *p)
{
	__u64 addr, *tbl;
	int l, i;

	if (!t->root) {
		addr = t->ops->alloc(t->ctx);
		if (!addr)
			return VK_SPPT_ENOMEM;
		t->pages++;
		t->root = addr;
		p->addr[4] = addr;
		p->tbl[4] = sppt_map(t, addr);
	}
	for (l = p->level; l > 1; l--) {
		addr = t->ops->alloc(t->ctx);
		if (!addr)
			return VK_SPPT_ENOMEM;
		t->pages++;
		tbl = sppt_map(t, addr);
		/* A zeroed L1 table would protect every sub-page. */
		if (l == 2)
			for (i = 0; i < SPPT_ENTRIES; i++)
				tbl[i] = VK_SPPT_L1E_DEFAULT;
		/* Link the table only once its contents are right. */
		p->tbl[l][sppt_index(gfn, l)] = addr | SPPT_VALID;
		p->addr[l - 1] = addr;
		p->tbl[l - 1] = tbl;
	}
	p->result = VK_SPPT_WALK_OK;
	p->level = 1;
	p->entry = 0;
	return VK_SPPT_OK;
}

static int sppt_l1_is_default(const __u64 *tbl)
{
	int i;

	for (i = 0; i < SPPT_ENTRIES; i++)
		if (tbl[i] != VK_SPPT_L1E_DEFAULT)
			return 0;
	return 1;
}

static int sppt_table_is_empty(const __u64 *tbl)
{
	int i;

	for (i = 0; i < SPPT_ENTRIES; i++)
		if (tbl[i] & SPPT_VALID)
			return 0;
	return 1;
}

/* Unlink (entry := 0) and free the level-l table of path p. */
static void sppt_drop(struct vk_sppt *t, struct sppt_path *p, __u64 gfn,
		      int l)
{
	if (l == 4)
		t->root = 0;
	else
		p->tbl[l + 1][sppt_index(gfn, l + 1)] = 0;
	t->ops->free(t->ctx, p->addr[l]);
	t->pages--;
	p->tbl[l] = NULL;
	p->addr[l] = 0;
}

/*
 * Free the empty tables that cover gfn..end-1 (end > gfn): all-default L1
 * tables, then L2/L3 tables left without a valid entry, then the root.
 * Each table is examined once: an L1 table at its span, an L2/L3 table at
 * the last span of the range it covers, the root at the last span. With a
 * source, an L1 table whose span the source protects is not examined (it
 * holds a non-default entry). Misconfigured entries count as valid and are
 * not followed.
 */
static void sppt_prune(struct vk_sppt *t, __u64 gfn, __u64 end,
		       const struct sppt_src *src)
{
	struct sppt_path p;
	__u64 next;
	int last;

	for (; gfn < end; gfn = next) {
		sppt_relax(t);
		next = sppt_span_end(gfn, end);
		last = next == end;
		sppt_descend(t, gfn, &p);
		if (p.result == VK_SPPT_WALK_OK &&
		    !(src && sppt_src_protects(src, gfn, next)) &&
		    sppt_l1_is_default(p.tbl[1]))
			sppt_drop(t, &p, gfn, 1);
		if (p.tbl[2] && (last || !(next & (SPPT_L2_PAGES - 1))) &&
		    sppt_table_is_empty(p.tbl[2]))
			sppt_drop(t, &p, gfn, 2);
		if (p.tbl[3] && (last || !(next & (SPPT_L3_PAGES - 1))) &&
		    sppt_table_is_empty(p.tbl[3]))
			sppt_drop(t, &p, gfn, 3);
		if (p.tbl[4] && last && sppt_table_is_empty(p.tbl[4]))
			sppt_drop(t, &p, gfn, 4);
	}
}

/*
 * vk_sppt_set() and vk_sppt_fill(), in three passes over the range:
 *
 * 1. Check every existing path and create the tables of every span that
 *    gets a protected page. This is the only pass that can fail: on
 *    failure, prune what it created (the table is as before) and return.
 * 2. Write the L1Es. A span without an L1 table gets no protected page
 *    (pass 1), so reads as all-writable already.
 * 3. Free the tables of the range that are now empty.
 */
static int sppt_update(struct vk_sppt *t, __u64 gfn, __u64 npages,
		       const struct sppt_src *src)
{
	struct sppt_path p;
	__u64 end, g, next;
	int rc = VK_SPPT_OK;

	/* Nothing to do, whatever gfn is. */
	if (!npages)
		return VK_SPPT_OK;
	if (!sppt_range_ok(gfn, npages))
		return VK_SPPT_ERANGE;
	end = gfn + npages;

	for (g = gfn; g < end; g = next) {
		sppt_relax(t);
		next = sppt_span_end(g, end);
		sppt_descend(t, g, &p);
		if (p.result == VK_SPPT_WALK_MISCONFIG) {
			rc = VK_SPPT_EMISCONFIG;
			break;
		}
		if (p.result == VK_SPPT_WALK_MISS &&
		    sppt_src_protects(src, g, next)) {
			rc = sppt_populate(t, g, &p);
			if (rc)
				break;
		}
	}
	if (rc) {
		sppt_prune(t, gfn, next, NULL);
		return rc;
	}

	for (g = gfn; g < end; g = next) {
		sppt_relax(t);
		next = sppt_span_end(g, end);
		sppt_descend(t, g, &p);
		if (p.result != VK_SPPT_WALK_OK)
			continue;
		for (; g < next; g++)
			p.tbl[1][sppt_index(g, 1)] =
				vk_spp_map_to_l1e(sppt_src_map(src, g));
	}

	sppt_prune(t, gfn, end, src);
	return VK_SPPT_OK;
}

void vk_sppt_init(struct vk_sppt *t, const struct vk_sppt_ops *ops, void *ctx,
		  unsigned int maxphyaddr)
{
	t->root = 0;
	t->maxphyaddr = maxphyaddr;
	t->pages = 0;
	t->ops = ops;
	t->ctx = ctx;
}

/*
 * Free the level-l table at addr and the tables below it. Every valid entry
 * is followed through its address field, reserved bits or not: they do not
 * change where the next table is, and the table owns it.
 */
static void sppt_free_tree(struct vk_sppt *t, __u64 addr, int l)
{
	__u64 *tbl;
	int i;

	if (l > 1) {
		tbl = sppt_map(t, addr);
		for (i = 0; i < SPPT_ENTRIES; i++)
			if (tbl[i] & SPPT_VALID)
				sppt_free_tree(t, sppt_addr(t, tbl[i]), l - 1);
	}
	t->ops->free(t->ctx, addr);
}

void vk_sppt_destroy(struct vk_sppt *t)
{
	if (t->root)
		sppt_free_tree(t, t->root, 4);
	t->root = 0;
	t->pages = 0;
}

/* Bit i of map -> bit 2i: spread 16, 8, 4, 2, 1 bits apart. */
__u64 vk_spp_map_to_l1e(__u32 map)
{
	__u64 x = map;

	x = (x | (x << 16)) & 0x0000ffff0000ffffull;
	x = (x | (x << 8)) & 0x00ff00ff00ff00ffull;
	x = (x | (x << 4)) & 0x0f0f0f0f0f0f0f0full;
	x = (x | (x << 2)) & 0x3333333333333333ull;
	x = (x | (x << 1)) & 0x5555555555555555ull;
	return x;
}

/* Bit 2i of l1e -> bit i; the odd (reserved) bits are ignored. */
__u32 vk_spp_l1e_to_map(__u64 l1e)
{
	__u64 x = l1e & 0x5555555555555555ull;

	x = (x | (x >> 1)) & 0x3333333333333333ull;
	x = (x | (x >> 2)) & 0x0f0f0f0f0f0f0f0full;
	x = (x | (x >> 4)) & 0x00ff00ff00ff00ffull;
	x = (x | (x >> 8)) & 0x0000ffff0000ffffull;
	x = (x | (x >> 16)) & 0x00000000ffffffffull;
	return (__u32)x;
}

/*
 * A GPA at or above 2^48 is beyond what a 4-level table indexes: it reads
 * as a miss at level 4 (entry 0), like an empty table, rather than as the
 * entry its bits 47:39 would alias.
 */
void vk_sppt_lookup(const struct vk_sppt *t, __u64 gpa, struct vk_sppt_walk *w)
{
	struct sppt_path p;
	__u64 gfn = gpa >> 12;
	__u64 l1e;

	w->map = 0;
	if (gpa >> SPPT_GPA_BITS) {
		w->result = VK_SPPT_WALK_MISS;
		w->level = 4;
		w->entry = 0;
		return;
	}
	sppt_descend(t, gfn, &p);
	w->result = p.result;
	w->level = p.level;
	w->entry = p.entry;
	if (p.result != VK_SPPT_WALK_OK)
		return;
	l1e = p.tbl[1][sppt_index(gfn, 1)];
	w->entry = l1e;
	if (l1e & SPPT_L1E_RSVD) {
		w->result = VK_SPPT_WALK_MISCONFIG;
		return;
	}
	w->map = vk_spp_l1e_to_map(l1e);
}

/* npages == 0 returns VK_SPPT_OK whatever gfn is, like vk_sppt_set(). */
int vk_sppt_get(const struct vk_sppt *t, __u64 gfn, __u64 npages, __u32 *maps)
{
	struct sppt_path p;
	__u64 end, g, next, l1e;

	if (!npages)
		return VK_SPPT_OK;
	if (!sppt_range_ok(gfn, npages))
		return VK_SPPT_ERANGE;
	end = gfn + npages;

	for (g = gfn; g < end; g = next) {
		sppt_relax(t);
		next = sppt_span_end(g, end);
		sppt_descend(t, g, &p);
		if (p.result == VK_SPPT_WALK_MISCONFIG)
			return VK_SPPT_EMISCONFIG;
		if (p.result == VK_SPPT_WALK_MISS) {
			for (; g < next; g++)
				maps[g - gfn] = VK_SPP_ALL_WRITABLE;
			continue;
		}
		for (; g < next; g++) {
			l1e = p.tbl[1][sppt_index(g, 1)];
			if (l1e & SPPT_L1E_RSVD)
				return VK_SPPT_EMISCONFIG;
			maps[g - gfn] = vk_spp_l1e_to_map(l1e);
		}
	}
	return VK_SPPT_OK;
}

/*
 * Besides VK_SPPT_ENOMEM and VK_SPPT_ERANGE, an update that meets a
 * misconfigured L4E/L3E/L2E on its range returns VK_SPPT_EMISCONFIG, with
 * nothing changed: it does not build on an entry hardware would refuse.
 * Reserved bits of the L1Es it writes are overwritten.
 */
int vk_sppt_set(struct vk_sppt *t, __u64 gfn, __u64 npages, const __u32 *maps)
{
	struct sppt_src src = { .maps = maps, .map = 0, .gfn = gfn };

	return sppt_update(t, gfn, npages, &src);
}

#ifndef __KERNEL__
/* Userspace only: the module stores the maps it is given (vk_sppt_set()). */
int vk_sppt_fill(struct vk_sppt *t, __u64 gfn, __u64 npages, __u32 map)
{
	struct sppt_src src = { .maps = NULL, .map = map, .gfn = gfn };

	return sppt_update(t, gfn, npages, &src);
}
#endif /* !__KERNEL__ */
