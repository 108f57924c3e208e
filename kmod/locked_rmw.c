// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Telling locked read-modify-writes apart from plain writes.
 *
 * KVM's emulator performs a LOCK-prefixed read-modify-write, XCHG or
 * CMPXCHG8B/16B through emulator_cmpxchg_emulated(). When the destination
 * is in a read-only memslot - a page under sub-page protection - that
 * function cannot compare-and-exchange, logs "emulating exchange as write"
 * once and turns it into a plain write: the old value was read when the
 * instruction was emulated, the new one leaves as an ordinary MMIO exit,
 * indistinguishable from a MOV. Storing it from the fast path would make
 * the instruction non-atomic (lost `lock inc`s, broken spinlocks), so a
 * KVM_RUN that emulated one hands its write to userspace instead.
 *
 * A kprobe on emulator_cmpxchg_emulated() marks the running thread's
 * watch, if it has one (VIRTKIT_VCPU_RUN registers one for its KVM_RUNs).
 * It also fires for exchanges on ordinary RAM that KVM completes itself;
 * those only send the next write to userspace, which is slower, not wrong.
 * A missed probe hit (nmissed grew) counts as seen. Without the probe
 * (kernel without kprobes, or KVM renamed the function), the fast path is
 * off: VIRTKIT_CAP_SPP_FAST_WRITE reads 0 and VCPU_RUN completes nothing.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kprobes.h>
#include <linux/sched.h>
#include <linux/xarray.h>

#include "virtkit.h"

/* Threads in VIRTKIT_VCPU_RUN: pid -> their struct virtkit_rmw_watch. */
static DEFINE_XARRAY(virtkit_rmw_watches);
static bool virtkit_rmw_probed;

static int virtkit_rmw_hit(struct kprobe *p, struct pt_regs *regs)
{
	struct virtkit_rmw_watch *w = xa_load(&virtkit_rmw_watches, current->pid);

	/* Only the watch's own thread gets here with it: it is on its stack. */
	if (w)
		WRITE_ONCE(w->seen, true);
	return 0;
}

static struct kprobe virtkit_rmw_kprobe = {
	.symbol_name = "emulator_cmpxchg_emulated",
	.pre_handler = virtkit_rmw_hit,
};

/* Never fails the module's load: without the probe the fast path is off. */
void virtkit_locked_rmw_init(void)
{
	int r = register_kprobe(&virtkit_rmw_kprobe);

	if (r) {
		pr_warn("cannot probe KVM's emulator_cmpxchg_emulated (%d): the VCPU_RUN fast path is off\n",
			r);
		return;
	}
	virtkit_rmw_probed = true;
}

void virtkit_locked_rmw_exit(void)
{
	if (virtkit_rmw_probed)
		unregister_kprobe(&virtkit_rmw_kprobe);
	WARN_ON_ONCE(!xa_empty(&virtkit_rmw_watches));
}

bool virtkit_locked_rmw_available(void)
{
	return virtkit_rmw_probed;
}

int virtkit_rmw_watch_start(struct virtkit_rmw_watch *w)
{
	virtkit_rmw_watch_reset(w);
	return xa_err(xa_store(&virtkit_rmw_watches, current->pid, w, GFP_KERNEL_ACCOUNT));
}

void virtkit_rmw_watch_reset(struct virtkit_rmw_watch *w)
{
	WRITE_ONCE(w->seen, false);
	w->missed = READ_ONCE(virtkit_rmw_kprobe.nmissed);
}

bool virtkit_rmw_watch_seen(const struct virtkit_rmw_watch *w)
{
	return READ_ONCE(w->seen) || READ_ONCE(virtkit_rmw_kprobe.nmissed) != w->missed;
}

void virtkit_rmw_watch_stop(void)
{
	xa_erase(&virtkit_rmw_watches, current->pid);
}
