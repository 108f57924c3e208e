// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Recognising KVM's VM and vCPU files among arbitrary file descriptors.
 *
 * A file descriptor from userspace can be any file. Nothing of it is
 * dereferenced as KVM's until it is known to be KVM's: the vCPU check
 * compares private_data with the VM's vCPU pointers before anything else,
 * and names are read only from anonymous-inode files, whose dentries are
 * never renamed (the held file pins its dentry).
 */
#include <linux/err.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/kvm_host.h>
#include <linux/magic.h>
#include <linux/module.h>
#include <linux/string.h>

#include "compat.h"
#include "virtkit.h"

static bool virtkit_is_anon_file(const struct file *file)
{
	return file_inode(file)->i_sb->s_magic == ANON_INODE_FS_MAGIC;
}

#ifdef VIRTKIT_HAVE_FILE_IS_KVM
bool virtkit_is_kvm_vm_file(struct file *file)
{
	return file_is_kvm(file);
}
#else
/* The modules whose file operations KVM's VM files have (7.x: the vendor's). */
static bool virtkit_is_kvm_module(const struct module *mod)
{
	return mod && (!strcmp(mod->name, "kvm_amd") || !strcmp(mod->name, "kvm_intel") ||
		       !strcmp(mod->name, "kvm"));
}

/*
 * KVM_CREATE_VM makes anon_inode_getfile("kvm-vm", &kvm_vm_fops, kvm, ...),
 * and kvm_init() sets kvm_vm_fops.owner to the vendor module.
 */
bool virtkit_is_kvm_vm_file(struct file *file)
{
	return virtkit_is_anon_file(file) && file->f_op->unlocked_ioctl &&
	       virtkit_is_kvm_module(file->f_op->owner) &&
	       !strcmp(file->f_path.dentry->d_name.name, "kvm-vm");
}
#endif

/*
 * A vCPU file of vm's VM: its private_data is one of the VM's vCPUs, it
 * comes from the module that made the VM file, and is named kvm-vcpu:N
 * (KVM's vCPU statistics file also points at the vCPU, as kvm-vcpu-stats:N).
 */
static struct kvm_vcpu *virtkit_vcpu_of(struct virtkit_vm *vm, struct file *file)
{
	const struct file_operations *vm_fops = vm->kvm_file->f_op;
	struct kvm_vcpu *vcpu, *found = NULL;
	unsigned long i;

	kvm_for_each_vcpu(i, vcpu, vm->kvm) {
		if (vcpu == file->private_data) {
			found = vcpu;
			break;
		}
	}
	if (!found || file->f_op == vm_fops || file->f_op->owner != vm_fops->owner ||
	    !file->f_op->unlocked_ioctl || !virtkit_is_anon_file(file) ||
	    strncmp(file->f_path.dentry->d_name.name, "kvm-vcpu:", 9))
		return NULL;
	return found;
}

/*
 * The vCPU behind a per-vCPU ioctl's vcpu_fd: the vCPU, with *filep holding
 * a reference to its file (the caller fput()s it, which keeps the vCPU
 * alive meanwhile); ERR_PTR(-EBADF) for no file, ERR_PTR(-EINVAL) for a
 * file that is not a vCPU of vm's VM.
 */
struct kvm_vcpu *virtkit_vcpu_fget(struct virtkit_vm *vm, int fd, struct file **filep)
{
	struct file *file = fget(fd);
	struct kvm_vcpu *vcpu;

	if (!file)
		return ERR_PTR(-EBADF);
	vcpu = virtkit_vcpu_of(vm, file);
	if (!vcpu) {
		fput(file);
		return ERR_PTR(-EINVAL);
	}
	*filep = file;
	return vcpu;
}
