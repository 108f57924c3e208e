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
 * in writable sub-pages, it is written to the VMM's mapping of the slot and
 * the vCPU re-enters the guest without going back to userspace. Anything
 * else - a write touching a write-protected sub-page, a guard page, device
 * MMIO, a page under dirty logging, every other exit, signals and
 * immediate_exit - returns to userspace untouched, exactly as KVM_RUN
 * would have returned it. So this path never performs a denied write: the
 * decision and the store happen under spp->lock, before KVM sees the MMIO
 * completed.
 */
#include <linux/file.h>
#include <linux/kvm_host.h>
#include <linux/sched.h>
#include <linux/uaccess.h>

#include <linux/virtkit.h>

#include "virtkit.h"

/*
 * A vCPU file of vm's KVM VM: created by the same KVM module as the VM
 * file, named kvm-vcpu:N, and its private data is one of the VM's vCPUs
 * (only compared, never dereferenced before the match).
 */
static struct kvm_vcpu *virtkit_vcpu_of(struct virtkit_vm *vm, struct file *file)
{
	struct kvm_vcpu *vcpu;
	unsigned long i;

	if (file->f_op == vm->kvm_fops || file->f_op->owner != vm->kvm_fops->owner ||
	    !file->f_op->unlocked_ioctl ||
	    strncmp(file->f_path.dentry->d_name.name, "kvm-vcpu:", 9))
		return NULL;
	kvm_for_each_vcpu(i, vcpu, vm->kvm)
		if (vcpu == file->private_data)
			return vcpu;
	return NULL;
}

/* A store of a guest write: aligned 1/2/4/8 bytes as one access, like the guest's. */
static int virtkit_store(unsigned long hva, const void *data, unsigned int len)
{
	void __user *p = (void __user *)hva;
	union {
		u8 b;
		u16 w;
		u32 l;
		u64 q;
	} v;

	if (IS_ALIGNED(hva, len) && len <= sizeof(v)) {
		memcpy(&v, data, len);
		switch (len) {
		case 1:
			return put_user(v.b, (u8 __user *)p);
		case 2:
			return put_user(v.w, (u16 __user *)p);
		case 4:
			return put_user(v.l, (u32 __user *)p);
		case 8:
			return put_user(v.q, (u64 __user *)p);
		}
	}
	return copy_to_user(p, data, len) ? -EFAULT : 0;
}

/*
 * Fragments longer than this go to userspace, like libvirtkit's own limit
 * on one write (SppViolation::max_write): the bytes are copied to the
 * stack, as hardened usercopy forbids storing from the vCPU's slab object.
 */
#define VIRTKIT_FAST_WRITE_MAX	64

/* One guest write as decided on: read once, under vcpu->mutex. */
struct virtkit_write {
	struct {
		unsigned long hva;
		unsigned int len;
		u8 bytes[VIRTKIT_FAST_WRITE_MAX];
	} frag[KVM_MAX_MMIO_FRAGMENTS];
	int nr;
	unsigned int pieces;	/* MMIO exits KVM reports for the write */
};

/*
 * The MMIO exit just returned is the first piece of an emulated guest
 * write: decide on all of its fragments and copy them into w. Under
 * vcpu->mutex (the fragments are stable) and spp->lock (read).
 */
static enum virtkit_spp_verdict virtkit_plan_write(struct virtkit_vm *vm, struct kvm_vcpu *vcpu,
						   struct virtkit_write *w)
{
	enum virtkit_spp_verdict v = VIRTKIT_SPP_ALLOWED;
	int i, idx;

	w->nr = vcpu->mmio_nr_fragments;
	if (READ_ONCE(vcpu->run->exit_reason) != KVM_EXIT_MMIO || !vcpu->mmio_needed ||
	    !vcpu->mmio_is_write || vcpu->mmio_cur_fragment ||
	    w->nr < 1 || w->nr > KVM_MAX_MMIO_FRAGMENTS)
		return VIRTKIT_SPP_NOT_OURS;

	w->pieces = 0;
	idx = srcu_read_lock(&vm->kvm->srcu);
	for (i = 0; i < w->nr && v == VIRTKIT_SPP_ALLOWED; i++) {
		const struct kvm_mmio_fragment *f = &vcpu->mmio_fragments[i];
		gpa_t gpa = f->gpa;
		unsigned int len = f->len;
		gfn_t gfn = gpa_to_gfn(gpa);
		struct kvm_memory_slot *slot = gfn_to_memslot(vm->kvm, gfn);

		/*
		 * Only RAM that traps because it is read-only for SPP; with
		 * dirty logging on, userspace completes the write and logs it.
		 */
		if (!slot || !(slot->flags & KVM_MEM_READONLY) ||
		    (slot->flags & KVM_MEM_LOG_DIRTY_PAGES) || len > VIRTKIT_FAST_WRITE_MAX) {
			v = VIRTKIT_SPP_NOT_OURS;
			break;
		}
		/* Also checks that [gpa, gpa + len) stays inside the page. */
		v = virtkit_spp_check(&vm->spp, gpa, len);
		w->frag[i].hva = __gfn_to_hva_memslot(slot, gfn) + offset_in_page(gpa);
		w->frag[i].len = len;
		memcpy(w->frag[i].bytes, f->data, len);
		w->pieces += DIV_ROUND_UP(len, 8);
	}
	srcu_read_unlock(&vm->kvm->srcu, idx);
	return v;
}

/*
 * Complete an allowed write whole. Returns the MMIO exits KVM will still
 * report for it (its remaining pieces), 0 with *verdict saying why when it
 * is not completed here, or an error.
 */
static int virtkit_complete_write(struct virtkit_vm *vm, struct kvm_vcpu *vcpu,
				  enum virtkit_spp_verdict *verdict)
{
	struct virtkit_write w;
	int i, r = 0;

	if (mutex_lock_killable(&vcpu->mutex))
		return -EINTR;
	down_read(&vm->spp.lock);
	*verdict = virtkit_plan_write(vm, vcpu, &w);
	mutex_unlock(&vcpu->mutex);
	if (*verdict == VIRTKIT_SPP_ALLOWED) {
		for (i = 0; i < w.nr && !r; i++)
			r = virtkit_store(w.frag[i].hva, w.frag[i].bytes, w.frag[i].len);
	}
	up_read(&vm->spp.lock);
	if (*verdict != VIRTKIT_SPP_ALLOWED)
		return 0;
	if (r)
		return r;
	atomic64_inc(&vm->spp.fast_writes);
	return w.pieces - 1;
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
	return cur + 1 < nr || READ_ONCE(vcpu->mmio_fragments[cur].len) > 8;
}

static long virtkit_run_loop(struct virtkit_vm *vm, struct file *file, struct kvm_vcpu *vcpu)
{
	long (*kvm_ioctl)(struct file *, unsigned int, unsigned long) =
		file->f_op->unlocked_ioctl;
	enum virtkit_spp_verdict verdict;
	bool continues;
	long r;
	int skip;

	for (;;) {
		continues = virtkit_mmio_write_continues(vcpu);
		r = kvm_ioctl(file, KVM_RUN, 0);
		if (r || continues || !READ_ONCE(vm->spp.enabled))
			return r;
		skip = virtkit_complete_write(vm, vcpu, &verdict);
		if (skip < 0)
			return skip;
		if (verdict != VIRTKIT_SPP_ALLOWED) {
			if (verdict == VIRTKIT_SPP_DENIED)
				atomic64_inc(&vm->spp.user_exits);
			return 0;
		}
		/*
		 * KVM still reports the remaining 8-byte pieces of the write
		 * (already stored) one KVM_RUN each, without running the guest.
		 */
		while (skip--) {
			r = kvm_ioctl(file, KVM_RUN, 0);
			if (r)
				return r;
			if (vcpu->run->exit_reason != KVM_EXIT_MMIO || !vcpu->run->mmio.is_write)
				return 0;
		}
		cond_resched();
	}
}

long virtkit_vcpu_run(struct virtkit_vm *vm, void __user *argp)
{
	struct virtkit_vcpu_run arg;
	struct kvm_vcpu *vcpu;
	struct file *file;
	long r;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags || memchr_inv(arg.reserved, 0, sizeof(arg.reserved)))
		return -EINVAL;
	file = fget(arg.vcpu_fd);
	if (!file)
		return -EBADF;
	vcpu = virtkit_vcpu_of(vm, file);
	r = vcpu ? virtkit_run_loop(vm, file, vcpu) : -EINVAL;
	fput(file);
	return r;
}
