// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Sub-page write protection: the per-VM SPP table (common/spp_table.h, in
 * kernel pages, so it is bit for bit what SPP hardware would walk) and the
 * SPP ioctls of the per-VM file. Semantics as libvirtkit's
 * SubpageProtection: SET is all or nothing, a map of all ones means "not
 * protected", memory is bounded by spp_max_table_pages per VM.
 */
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>

#include <linux/virtkit.h>

#include "virtkit.h"

static __u64 virtkit_sppt_alloc(void *ctx)
{
	struct virtkit_spp *spp = ctx;
	unsigned long page;

	if (spp->table.pages >= READ_ONCE(spp_max_table_pages)) {
		spp->over_budget = true;
		return 0;
	}
	page = get_zeroed_page(GFP_KERNEL_ACCOUNT);
	return page ? __pa(page) : 0;
}

static void virtkit_sppt_free(void *ctx, __u64 addr)
{
	free_page((unsigned long)__va(addr));
}

static __u64 *virtkit_sppt_map(void *ctx, __u64 addr)
{
	return __va(addr);
}

/* Long updates hold spp->lock (write): let others run between spans. */
static void virtkit_sppt_relax(void *ctx)
{
	cond_resched();
}

static const struct vk_sppt_ops virtkit_sppt_ops = {
	.alloc = virtkit_sppt_alloc,
	.free = virtkit_sppt_free,
	.map = virtkit_sppt_map,
	.relax = virtkit_sppt_relax,
};

void virtkit_spp_init(struct virtkit_spp *spp)
{
	init_rwsem(&spp->lock);
	vk_sppt_init(&spp->table, &virtkit_sppt_ops, spp, boot_cpu_data.x86_phys_bits);
	atomic64_set(&spp->fast_writes, 0);
	atomic64_set(&spp->user_exits, 0);
}

void virtkit_spp_destroy(struct virtkit_spp *spp)
{
	vk_sppt_destroy(&spp->table);
}

static long virtkit_spp_enable(struct virtkit_spp *spp, void __user *argp)
{
	struct virtkit_spp_enable arg;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags || memchr_inv(arg.reserved, 0, sizeof(arg.reserved)))
		return -EINVAL;
	down_write(&spp->lock);
	spp->enabled = true;
	up_write(&spp->lock);
	return 0;
}

/* Copy and check the arguments of SET/GET_ACCESS; npages 0 is valid. */
static long virtkit_spp_access_args(void __user *argp, struct virtkit_spp_access *a)
{
	if (copy_from_user(a, argp, sizeof(*a)))
		return -EFAULT;
	if (a->flags || a->pad || memchr_inv(a->reserved, 0, sizeof(a->reserved)))
		return -EINVAL;
	if (a->npages > virtkit_check_extension(VIRTKIT_CAP_SPP_MAX_PAGES))
		return -E2BIG;
	if (a->npages &&
	    (a->gfn >= VK_SPPT_GFN_LIMIT || a->npages > VK_SPPT_GFN_LIMIT - a->gfn))
		return -EINVAL;
	return 0;
}

/* A kernel buffer for the maps of a checked range (npages may be 0). */
static u32 *virtkit_spp_maps_alloc(u64 npages)
{
	return kvmalloc_array(max_t(u64, npages, 1), sizeof(u32), GFP_KERNEL_ACCOUNT);
}

static long virtkit_sppt_errno(int r, const struct virtkit_spp *spp)
{
	switch (r) {
	case VK_SPPT_OK:
		return 0;
	case VK_SPPT_ENOMEM:
		return spp->over_budget ? -ENOSPC : -ENOMEM;
	case VK_SPPT_ERANGE:
		return -EINVAL;
	default:
		return -EIO;	/* a misconfigured entry: cannot happen */
	}
}

static long virtkit_spp_set(struct virtkit_spp *spp, void __user *argp)
{
	struct virtkit_spp_access a;
	u32 *maps, *old = NULL;
	u64 i;
	long r;

	r = virtkit_spp_access_args(argp, &a);
	if (r)
		return r;
	maps = virtkit_spp_maps_alloc(a.npages);
	if (!maps)
		return -ENOMEM;
	r = -EFAULT;
	if (copy_from_user(maps, u64_to_user_ptr(a.maps), a.npages * sizeof(*maps)))
		goto out;
	r = -ENOMEM;
	old = virtkit_spp_maps_alloc(a.npages);
	if (!old)
		goto out;

	down_write(&spp->lock);
	r = -ENOENT;
	if (!spp->enabled)
		goto out_unlock;
	r = virtkit_sppt_errno(vk_sppt_get(&spp->table, a.gfn, a.npages, old), spp);
	if (r)
		goto out_unlock;
	spp->over_budget = false;
	r = virtkit_sppt_errno(vk_sppt_set(&spp->table, a.gfn, a.npages, maps), spp);
	if (r)
		goto out_unlock;
	for (i = 0; i < a.npages; i++) {
		spp->protected_pages += maps[i] != VK_SPP_ALL_WRITABLE;
		spp->protected_pages -= old[i] != VK_SPP_ALL_WRITABLE;
		if (!(i % 4096))
			cond_resched();
	}
out_unlock:
	up_write(&spp->lock);
out:
	kvfree(old);
	kvfree(maps);
	return r;
}

static long virtkit_spp_get(struct virtkit_spp *spp, void __user *argp)
{
	struct virtkit_spp_access a;
	u32 *maps;
	long r;

	r = virtkit_spp_access_args(argp, &a);
	if (r)
		return r;
	maps = virtkit_spp_maps_alloc(a.npages);
	if (!maps)
		return -ENOMEM;
	down_read(&spp->lock);
	r = spp->enabled ? virtkit_sppt_errno(vk_sppt_get(&spp->table, a.gfn, a.npages, maps), spp)
			 : -ENOENT;
	up_read(&spp->lock);
	if (!r && copy_to_user(u64_to_user_ptr(a.maps), maps, a.npages * sizeof(*maps)))
		r = -EFAULT;
	kvfree(maps);
	return r;
}

static long virtkit_spp_stats(struct virtkit_spp *spp, void __user *argp)
{
	struct virtkit_spp_stats s;

	memset(&s, 0, sizeof(s));
	down_read(&spp->lock);
	if (!spp->enabled) {
		up_read(&spp->lock);
		return -ENOENT;
	}
	s.protected_pages = spp->protected_pages;
	s.table_pages = spp->table.pages;
	up_read(&spp->lock);
	s.fast_writes = atomic64_read(&spp->fast_writes);
	s.user_exits = atomic64_read(&spp->user_exits);
	return copy_to_user(argp, &s, sizeof(s)) ? -EFAULT : 0;
}

long virtkit_spp_ioctl(struct virtkit_spp *spp, unsigned int ioctl, void __user *argp)
{
	switch (ioctl) {
	case VIRTKIT_SPP_ENABLE:
		return virtkit_spp_enable(spp, argp);
	case VIRTKIT_SPP_SET_ACCESS:
		return virtkit_spp_set(spp, argp);
	case VIRTKIT_SPP_GET_ACCESS:
		return virtkit_spp_get(spp, argp);
	case VIRTKIT_SPP_GET_STATS:
		return virtkit_spp_stats(spp, argp);
	default:
		return -ENOTTY;
	}
}

/*
 * Whether a guest write of len bytes at gpa, inside one page, may be
 * completed: it must hit a protected page (a page with no map is not ours:
 * it traps for some other reason) and only writable sub-pages. Under
 * spp->lock (read).
 */
enum virtkit_spp_verdict virtkit_spp_check(struct virtkit_spp *spp, gpa_t gpa,
					   unsigned int len)
{
	struct vk_sppt_walk w;
	unsigned int first, last;
	u32 want;

	lockdep_assert_held(&spp->lock);
	if (!spp->enabled || !len || offset_in_page(gpa) + len > PAGE_SIZE)
		return VIRTKIT_SPP_NOT_OURS;
	vk_sppt_lookup(&spp->table, gpa, &w);
	if (w.result != VK_SPPT_WALK_OK || w.map == VK_SPP_ALL_WRITABLE)
		return VIRTKIT_SPP_NOT_OURS;
	first = offset_in_page(gpa) / VK_SPP_SUBPAGE_SIZE;
	last = (offset_in_page(gpa) + len - 1) / VK_SPP_SUBPAGE_SIZE;
	/* Sub-pages first..last, at most 32 of them. */
	want = (u32)(GENMASK_ULL(last, first));
	return (w.map & want) == want ? VIRTKIT_SPP_ALLOWED : VIRTKIT_SPP_DENIED;
}
