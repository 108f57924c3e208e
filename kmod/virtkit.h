/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * virtkit.ko internals: the per-VM attachment and its features.
 *
 * Lifetime: a struct virtkit_vm lives exactly as long as the per-VM file
 * that VIRTKIT_ATTACH_VM returned, and holds a reference on the KVM VM's
 * file for that time. The file keeps the VM alive and, since 6.7 (where a
 * struct kvm reference no longer does), KVM's vendor module loaded, so the
 * VMM may close its files in any order, or die. One attachment per VM
 * (virtkit_vms).
 */
#ifndef VIRTKIT_KMOD_H
#define VIRTKIT_KMOD_H

#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/kvm_host.h>
#include <linux/list.h>
#include <linux/rwsem.h>

#include "spp_table.h"

struct virtkit_spp {
	/*
	 * Guards everything below: updates write-lock it, the VCPU_RUN fast
	 * path read-locks it from its decision until the write is done, so
	 * no write allowed by an old map lands after SET_ACCESS returns.
	 * Nothing that can fault or wait for userspace runs under it.
	 */
	struct rw_semaphore lock;
	bool enabled;
	struct vk_sppt table;
	bool over_budget;	/* the last allocation hit spp_max_table_pages */
	u64 protected_pages;
	atomic64_t fast_writes;
	atomic64_t user_exits;
};

struct virtkit_vm {
	struct kvm *kvm;
	/* The VM's file, held (get_file()) for the attachment's lifetime. */
	struct file *kvm_file;
	struct list_head node;	/* in virtkit_vms, under virtkit_vms_lock */
	struct virtkit_spp spp;
};

/* main.c */
extern unsigned long spp_max_table_pages;
long virtkit_check_extension(unsigned long cap);

/* vm.c */
int virtkit_attach_vm(struct file *kvm_file);

/* kvm_files.c: recognising KVM's files without trusting their contents. */
bool virtkit_is_kvm_vm_file(struct file *file);
struct kvm_vcpu *virtkit_vcpu_fget(struct virtkit_vm *vm, int fd, struct file **filep);

/* spp.c */
void virtkit_spp_init(struct virtkit_spp *spp);
void virtkit_spp_destroy(struct virtkit_spp *spp);
long virtkit_spp_ioctl(struct virtkit_spp *spp, unsigned int ioctl, void __user *argp);

enum virtkit_spp_verdict {
	VIRTKIT_SPP_NOT_OURS,	/* not a protected-page write: userspace's */
	VIRTKIT_SPP_DENIED,	/* touches a write-protected sub-page */
	VIRTKIT_SPP_ALLOWED,
};

enum virtkit_spp_verdict virtkit_spp_check(struct virtkit_spp *spp, gpa_t gpa,
					   unsigned int len);

/* locked_rmw.c: which KVM_RUNs emulated a locked read-modify-write. */
void virtkit_locked_rmw_init(void);
void virtkit_locked_rmw_exit(void);
bool virtkit_locked_rmw_available(void);
struct virtkit_rmw_watch {
	bool seen;		/* set when this thread's KVM emulated one */
	unsigned long missed;	/* the probe's nmissed at the last reset */
};

int virtkit_rmw_watch_start(struct virtkit_rmw_watch *w);
void virtkit_rmw_watch_reset(struct virtkit_rmw_watch *w);
bool virtkit_rmw_watch_seen(const struct virtkit_rmw_watch *w);
void virtkit_rmw_watch_stop(void);

/* run.c */
long virtkit_vcpu_run(struct virtkit_vm *vm, void __user *argp);

/* msr.c */
long virtkit_check_guest_wrmsr(void);
long virtkit_vcpu_guest_wrmsr(struct virtkit_vm *vm, void __user *argp);

#endif /* VIRTKIT_KMOD_H */
