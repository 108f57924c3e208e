// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The per-VM virtkit file: VIRTKIT_ATTACH_VM creates it, its release is
 * the detach. It holds the KVM VM's file, so the VMM may close the VM fd,
 * the vCPU fds and this file in any order, or die: the VM is destroyed
 * when the last file goes, while KVM's modules are still loaded (since 6.7
 * only open KVM files pin the vendor module; a struct kvm reference alone
 * would let kvm-amd/kvm-intel unload under it).
 *
 * Like KVM's own VM and vCPU ioctls, every ioctl of this file fails with
 * EIO when called from a process other than the VM's (after fork()): the
 * run path stores guest writes into the VM's memory through the caller's
 * address space.
 */
#include <linux/anon_inodes.h>
#include <linux/file.h>
#include <linux/mutex.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include <linux/virtkit.h>

#include "virtkit.h"

/* Attached VMs, to refuse a second attachment of the same VM. */
static LIST_HEAD(virtkit_vms);
static DEFINE_MUTEX(virtkit_vms_lock);

static int virtkit_vm_release(struct inode *inode, struct file *filp)
{
	struct virtkit_vm *vm = filp->private_data;

	mutex_lock(&virtkit_vms_lock);
	list_del(&vm->node);
	mutex_unlock(&virtkit_vms_lock);

	virtkit_spp_destroy(&vm->spp);
	fput(vm->kvm_file);
	kfree(vm);
	return 0;
}

static long virtkit_vm_ioctl(struct file *filp, unsigned int ioctl, unsigned long arg)
{
	struct virtkit_vm *vm = filp->private_data;
	void __user *argp = (void __user *)arg;

	if (vm->kvm->mm != current->mm)
		return -EIO;
	switch (ioctl) {
	case VIRTKIT_GET_API_VERSION:
		return arg ? -EINVAL : VIRTKIT_API_VERSION;
	case VIRTKIT_CHECK_EXTENSION:
		return virtkit_check_extension(arg);
	case VIRTKIT_SPP_ENABLE:
	case VIRTKIT_SPP_SET_ACCESS:
	case VIRTKIT_SPP_GET_ACCESS:
	case VIRTKIT_SPP_GET_STATS:
		return virtkit_spp_ioctl(&vm->spp, ioctl, argp);
	case VIRTKIT_VCPU_RUN:
		return virtkit_vcpu_run(vm, argp);
	case VIRTKIT_VCPU_GUEST_WRMSR:
		return virtkit_vcpu_guest_wrmsr(vm, argp);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations virtkit_vm_fops = {
	.owner = THIS_MODULE,
	.release = virtkit_vm_release,
	.unlocked_ioctl = virtkit_vm_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

/*
 * kvm_file passed virtkit_is_kvm_vm_file(); returns the new fd or an
 * error. The VM must belong to the calling process, as for KVM's ioctls.
 */
int virtkit_attach_vm(struct file *kvm_file)
{
	struct kvm *kvm = kvm_file->private_data;
	struct virtkit_vm *vm, *other;
	int fd;

	if (kvm->mm != current->mm)
		return -EIO;
	vm = kzalloc(sizeof(*vm), GFP_KERNEL_ACCOUNT);
	if (!vm)
		return -ENOMEM;
	vm->kvm = kvm;
	virtkit_spp_init(&vm->spp);

	/*
	 * The list entry goes in before the fd exists: once installed, another
	 * thread may close it at once, and release takes it out again.
	 */
	mutex_lock(&virtkit_vms_lock);
	list_for_each_entry(other, &virtkit_vms, node) {
		if (other->kvm == kvm) {
			mutex_unlock(&virtkit_vms_lock);
			kfree(vm);
			return -EBUSY;
		}
	}
	vm->kvm_file = get_file(kvm_file);
	list_add(&vm->node, &virtkit_vms);
	fd = anon_inode_getfd("virtkit-vm", &virtkit_vm_fops, vm, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		list_del(&vm->node);
		mutex_unlock(&virtkit_vms_lock);
		fput(vm->kvm_file);
		kfree(vm);
		return fd;
	}
	mutex_unlock(&virtkit_vms_lock);
	return fd;
}
