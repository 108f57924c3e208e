// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * VIRTKIT_VCPU_RUN: KVM_RUN with sub-page protection's fast path.
 *
 * libvirtkit puts protected pages in read-only memslots. A guest write
 * there is not performed by KVM: its emulator decodes the instruction and
 * prepares an MMIO exit, holding every fragment of the write (at most one
 * per page) in the vCPU. Here, after KVM's own KVM_RUN returns such an
 * exit, the whole write is checked against the SPP table before any byte
 * of it is stored: when every fragment lies in a protected page and only
 * in writable sub-pages, it is written to the VMM's memory and the vCPU
 * re-enters the guest without going back to userspace. Anything else - a
 * write touching a write-protected sub-page, a locked read-modify-write
 * (locked_rmw.c), a guard page, device MMIO, a page under dirty logging, a
 * slot being changed, VMM memory that cannot be written, every other exit,
 * signals and immediate_exit - returns to userspace untouched, exactly as
 * KVM_RUN would have returned it.
 *
 * A write is performed whole or not at all: the VMM pages of all its
 * fragments are pinned first (this may fault, so it happens before any
 * lock but vcpu->mutex, as in KVM's own KVM_RUN), then, under kvm->srcu
 * and spp->lock, the memslots are looked up again, the write is decided
 * and stored through the pinned pages, which cannot fail. Lock order:
 * vcpu->mutex, kvm->srcu, spp->lock.
 */
#include <linux/file.h>
#include <linux/highmem.h>
#include <linux/kvm_host.h>
#include <linux/mm.h>
#include <linux/sched.h>
#include <linux/uaccess.h>

#include <linux/virtkit.h>

#include "compat.h"
#include "virtkit.h"

/*
 * Fragments longer than this go to userspace, like libvirtkit's own limit
 * on one write (SppViolation::max_write).
 */
#define VIRTKIT_FAST_WRITE_MAX	64
/* KVM reports a fragment in pieces of at most this many bytes. */
#define VIRTKIT_MMIO_PIECE	8
/* Slot changes between pinning and storing before giving up to userspace. */
#define VIRTKIT_PIN_RETRIES	3

/* One guest write as decided on: read once, under vcpu->mutex. */
struct virtkit_write {
	struct {
		gpa_t gpa;
		unsigned long hva;
		unsigned int len;
		struct page *page;	/* pinned VMM page of hva */
		u8 bytes[VIRTKIT_FAST_WRITE_MAX];
	} frag[KVM_MAX_MMIO_FRAGMENTS];
	int nr;
	int pinned;
};

/*
 * The MMIO pieces KVM reports for w: each fragment in pieces of up to 8
 * bytes, in order, one exit each. Piece k of w is (gpa, len, bytes).
 */
static int virtkit_write_pieces(const struct virtkit_write *w)
{
	int i, n = 0;

	for (i = 0; i < w->nr; i++)
		n += DIV_ROUND_UP(w->frag[i].len, VIRTKIT_MMIO_PIECE);
	return n;
}

static bool virtkit_piece_matches(const struct virtkit_write *w, int k, const struct kvm_run *run)
{
	unsigned int off, len;
	int i;

	for (i = 0; i < w->nr; i++) {
		int n = DIV_ROUND_UP(w->frag[i].len, VIRTKIT_MMIO_PIECE);

		if (k >= n) {
			k -= n;
			continue;
		}
		off = k * VIRTKIT_MMIO_PIECE;
		len = min_t(unsigned int, VIRTKIT_MMIO_PIECE, w->frag[i].len - off);
		return run->exit_reason == KVM_EXIT_MMIO && run->mmio.is_write &&
		       run->mmio.phys_addr == w->frag[i].gpa + off && run->mmio.len == len &&
		       !memcmp(run->mmio.data, w->frag[i].bytes + off, len);
	}
	return false;
}

/*
 * Whether the exit just returned is the first piece of an emulated guest
 * write that the fast path may take; copies its fragments into w.
 */
static bool virtkit_write_snapshot(struct kvm_vcpu *vcpu, struct virtkit_write *w)
{
	int i;

	w->nr = vcpu->mmio_nr_fragments;
	w->pinned = 0;
	if (READ_ONCE(vcpu->run->exit_reason) != KVM_EXIT_MMIO || !vcpu->mmio_needed ||
	    !vcpu->mmio_is_write || vcpu->mmio_cur_fragment ||
	    w->nr < 1 || w->nr > KVM_MAX_MMIO_FRAGMENTS)
		return false;
	for (i = 0; i < w->nr; i++) {
		const struct kvm_mmio_fragment *f = &vcpu->mmio_fragments[i];

		if (!f->len || f->len > VIRTKIT_FAST_WRITE_MAX ||
		    offset_in_page(f->gpa) + f->len > PAGE_SIZE)
			return false;
		w->frag[i].gpa = f->gpa;
		w->frag[i].len = f->len;
		memcpy(w->frag[i].bytes, f->data, f->len);
	}
	/* The exit must be the write's first piece, as KVM's protocol has it. */
	return !WARN_ON_ONCE(!virtkit_piece_matches(w, 0, vcpu->run));
}

/*
 * The VMM addresses of w's fragments in the vCPU's address space, or false
 * when one is not RAM that traps only because it is read-only for SPP:
 * with dirty logging on, userspace completes the write and logs it; a slot
 * being deleted or moved (KVM_MEMSLOT_INVALID) is left alone. Under
 * kvm->srcu.
 */
static bool virtkit_write_resolve(struct kvm_vcpu *vcpu, struct virtkit_write *w,
				  unsigned long *hva)
{
	int i;

	for (i = 0; i < w->nr; i++) {
		gfn_t gfn = gpa_to_gfn(w->frag[i].gpa);
		struct kvm_memory_slot *slot = virtkit_vcpu_memslot(vcpu, gfn);

		if (!slot || !(slot->flags & KVM_MEM_READONLY) ||
		    (slot->flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEMSLOT_INVALID)))
			return false;
		hva[i] = __gfn_to_hva_memslot(slot, gfn) + offset_in_page(w->frag[i].gpa);
	}
	return true;
}

static void virtkit_write_unpin(struct virtkit_write *w, bool dirty)
{
	int i;

	for (i = 0; i < w->pinned; i++)
		unpin_user_pages_dirty_lock(&w->frag[i].page, 1, dirty);
	w->pinned = 0;
}

/* Pin the VMM pages of w's fragments for writing; false if one cannot be. */
static bool virtkit_write_pin(struct virtkit_write *w)
{
	int i;

	for (i = 0; i < w->nr; i++) {
		if (pin_user_pages_fast(w->frag[i].hva & PAGE_MASK, 1, FOLL_WRITE,
					&w->frag[i].page) != 1) {
			virtkit_write_unpin(w, false);
			return false;
		}
		w->pinned++;
	}
	return true;
}

/* Store one fragment: aligned 1/2/4/8 bytes as one access, like the guest's. */
static void virtkit_store(struct page *page, unsigned long hva, const u8 *data, unsigned int len)
{
	u8 *p = (u8 *)kmap_local_page(page) + offset_in_page(hva);
	union {
		u16 w;
		u32 l;
		u64 q;
	} v;

	memcpy(&v, data, min_t(unsigned int, len, sizeof(v)));
	if (len == 1)
		WRITE_ONCE(*p, data[0]);
	else if (len == 2 && IS_ALIGNED(hva, 2))
		WRITE_ONCE(*(u16 *)p, v.w);
	else if (len == 4 && IS_ALIGNED(hva, 4))
		WRITE_ONCE(*(u32 *)p, v.l);
	else if (len == 8 && IS_ALIGNED(hva, 8))
		WRITE_ONCE(*(u64 *)p, v.q);
	else
		memcpy(p, data, len);
	kunmap_local(p);
}

/* What the fast path did with a guest write. */
enum virtkit_fast_result {
	VIRTKIT_FAST_NOT_OURS,	/* not a write to a protected page: userspace's */
	VIRTKIT_FAST_TO_USER,	/* a protected-page write left to userspace */
	VIRTKIT_FAST_STORED,	/* allowed, and stored whole */
};

/* Decide on w's fragments. Under kvm->srcu and spp->lock (read). */
static enum virtkit_spp_verdict virtkit_write_check(struct virtkit_vm *vm,
						    const struct virtkit_write *w)
{
	enum virtkit_spp_verdict v = VIRTKIT_SPP_ALLOWED;
	int i;

	for (i = 0; i < w->nr && v == VIRTKIT_SPP_ALLOWED; i++)
		v = virtkit_spp_check(&vm->spp, w->frag[i].gpa, w->frag[i].len);
	return v;
}

static enum virtkit_fast_result virtkit_left_result(enum virtkit_spp_verdict v)
{
	return v == VIRTKIT_SPP_NOT_OURS ? VIRTKIT_FAST_NOT_OURS : VIRTKIT_FAST_TO_USER;
}

/* Only decide (a write that must not be completed here): under the locks. */
static enum virtkit_fast_result virtkit_write_leave(struct virtkit_vm *vm, struct kvm_vcpu *vcpu,
						    struct virtkit_write *w)
{
	unsigned long hva[KVM_MAX_MMIO_FRAGMENTS];
	enum virtkit_spp_verdict v = VIRTKIT_SPP_NOT_OURS;
	int idx;

	idx = srcu_read_lock(&vm->kvm->srcu);
	if (virtkit_write_resolve(vcpu, w, hva)) {
		down_read(&vm->spp.lock);
		v = virtkit_write_check(vm, w);
		up_read(&vm->spp.lock);
	}
	srcu_read_unlock(&vm->kvm->srcu, idx);
	return virtkit_left_result(v);
}

/* Pin, then decide and store under kvm->srcu and spp->lock. */
static enum virtkit_fast_result virtkit_write_commit(struct virtkit_vm *vm, struct kvm_vcpu *vcpu,
						     struct virtkit_write *w)
{
	unsigned long hva[KVM_MAX_MMIO_FRAGMENTS];
	enum virtkit_spp_verdict v;
	int i, idx, tries;

	for (tries = 0; tries < VIRTKIT_PIN_RETRIES; tries++) {
		idx = srcu_read_lock(&vm->kvm->srcu);
		if (!virtkit_write_resolve(vcpu, w, hva)) {
			srcu_read_unlock(&vm->kvm->srcu, idx);
			return VIRTKIT_FAST_NOT_OURS;
		}
		srcu_read_unlock(&vm->kvm->srcu, idx);
		for (i = 0; i < w->nr; i++)
			w->frag[i].hva = hva[i];
		/* A read-only or missing VMM mapping: userspace decides. */
		if (!virtkit_write_pin(w))
			return virtkit_write_leave(vm, vcpu, w);

		idx = srcu_read_lock(&vm->kvm->srcu);
		if (!virtkit_write_resolve(vcpu, w, hva)) {
			srcu_read_unlock(&vm->kvm->srcu, idx);
			virtkit_write_unpin(w, false);
			return VIRTKIT_FAST_NOT_OURS;
		}
		for (i = 0; i < w->nr && hva[i] == w->frag[i].hva; i++)
			;
		if (i < w->nr) {
			/* The slot moved while pinning: pin again. */
			srcu_read_unlock(&vm->kvm->srcu, idx);
			virtkit_write_unpin(w, false);
			continue;
		}
		down_read(&vm->spp.lock);
		v = virtkit_write_check(vm, w);
		if (v == VIRTKIT_SPP_ALLOWED)
			for (i = 0; i < w->nr; i++)
				virtkit_store(w->frag[i].page, w->frag[i].hva, w->frag[i].bytes,
					      w->frag[i].len);
		up_read(&vm->spp.lock);
		srcu_read_unlock(&vm->kvm->srcu, idx);
		virtkit_write_unpin(w, v == VIRTKIT_SPP_ALLOWED);
		return v == VIRTKIT_SPP_ALLOWED ? VIRTKIT_FAST_STORED : virtkit_left_result(v);
	}
	return virtkit_write_leave(vm, vcpu, w);
}

/*
 * Decide on the write whose first piece KVM_RUN just returned and complete
 * it if allowed - unless that KVM_RUN emulated a locked read-modify-write,
 * which cannot be completed atomically here.
 */
static int virtkit_complete_write(struct virtkit_vm *vm, struct kvm_vcpu *vcpu,
				  const struct virtkit_rmw_watch *rmw, struct virtkit_write *w,
				  enum virtkit_fast_result *res)
{
	if (mutex_lock_killable(&vcpu->mutex))
		return -EINTR;
	*res = VIRTKIT_FAST_NOT_OURS;
	if (virtkit_write_snapshot(vcpu, w))
		*res = virtkit_rmw_watch_seen(rmw) ? virtkit_write_leave(vm, vcpu, w)
						   : virtkit_write_commit(vm, vcpu, w);
	mutex_unlock(&vcpu->mutex);
	return 0;
}

/*
 * Whether KVM_RUN would report another piece of the current MMIO write
 * instead of running the guest: then the exit it returns is not the start
 * of a write (its start went to userspace, which decided on the whole).
 */
static bool virtkit_mmio_write_continues(const struct kvm_vcpu *vcpu)
{
	int cur = READ_ONCE(vcpu->mmio_cur_fragment);
	int nr = READ_ONCE(vcpu->mmio_nr_fragments);

	if (!READ_ONCE(vcpu->mmio_needed) || !READ_ONCE(vcpu->mmio_is_write) ||
	    cur < 0 || cur >= nr || nr > KVM_MAX_MMIO_FRAGMENTS)
		return false;
	return cur + 1 < nr || READ_ONCE(vcpu->mmio_fragments[cur].len) > VIRTKIT_MMIO_PIECE;
}

static long virtkit_run_loop(struct virtkit_vm *vm, struct file *file, struct kvm_vcpu *vcpu,
			     struct virtkit_rmw_watch *rmw)
{
	long (*kvm_ioctl)(struct file *, unsigned int, unsigned long) =
		file->f_op->unlocked_ioctl;
	enum virtkit_fast_result res;
	struct virtkit_write w;
	bool continues;
	int k, pieces;
	long r;

	for (;;) {
		continues = virtkit_mmio_write_continues(vcpu);
		virtkit_rmw_watch_reset(rmw);
		r = kvm_ioctl(file, KVM_RUN, 0);
		if (r || continues || !READ_ONCE(vm->spp.enabled) ||
		    !virtkit_locked_rmw_available())
			return r;
		r = virtkit_complete_write(vm, vcpu, rmw, &w, &res);
		if (r)
			return r;
		if (res != VIRTKIT_FAST_STORED) {
			if (res == VIRTKIT_FAST_TO_USER)
				atomic64_inc(&vm->spp.user_exits);
			return 0;
		}
		atomic64_inc(&vm->spp.fast_writes);
		/*
		 * KVM still reports the remaining pieces of the write (already
		 * stored) one KVM_RUN each, without running the guest. Each
		 * must be the piece expected; anything else is returned.
		 */
		pieces = virtkit_write_pieces(&w);
		for (k = 1; k < pieces; k++) {
			r = kvm_ioctl(file, KVM_RUN, 0);
			if (r)
				return r;
			if (WARN_ON_ONCE(!virtkit_piece_matches(&w, k, vcpu->run)))
				return 0;
		}
		cond_resched();
	}
}

long virtkit_vcpu_run(struct virtkit_vm *vm, void __user *argp)
{
	struct virtkit_rmw_watch rmw;
	struct virtkit_vcpu_run arg;
	struct kvm_vcpu *vcpu;
	struct file *file;
	long r;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags || memchr_inv(arg.reserved, 0, sizeof(arg.reserved)))
		return -EINVAL;
	vcpu = virtkit_vcpu_fget(vm, arg.vcpu_fd, &file);
	if (IS_ERR(vcpu))
		return PTR_ERR(vcpu);
	r = virtkit_rmw_watch_start(&rmw);
	if (r)
		goto out;
	r = virtkit_run_loop(vm, file, vcpu, &rmw);
	virtkit_rmw_watch_stop();
out:
	fput(file);
	return r;
}
