// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * virtkit.ko: KVM extensions for stock kernels - sub-page write
 * protection with an in-kernel fast path, and the guest's own WRMSR for
 * introspection (Documentation/kmod.rst).
 *
 * /dev/virtkit answers version and capability queries and turns a KVM VM
 * file descriptor into a per-VM virtkit file (vm.c). Holding the VM fd is
 * the only authority needed; there is no lookup by pid or name.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/file.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/uaccess.h>

#include <linux/virtkit.h>

#include "virtkit.h"

/* The largest npages of one SPP_SET_ACCESS/GET_ACCESS: 16 GiB of guest. */
#define VIRTKIT_SPP_MAX_PAGES	(1ul << 22)

unsigned long spp_max_table_pages = 65536;
module_param(spp_max_table_pages, ulong, 0644);
MODULE_PARM_DESC(spp_max_table_pages,
		 "SPP table pages (4 KiB) one VM may use; SET_ACCESS beyond it fails with ENOSPC (default 65536)");

long virtkit_check_extension(unsigned long cap)
{
	switch (cap) {
	case VIRTKIT_CAP_SPP:
		return 1;
	case VIRTKIT_CAP_SPP_FAST_WRITE:
		/* Only where locked read-modify-writes can be told apart. */
		return virtkit_locked_rmw_available();
	case VIRTKIT_CAP_SPP_MAX_PAGES:
		return VIRTKIT_SPP_MAX_PAGES;
	case VIRTKIT_CAP_PKS:
		/*
		 * Guest PKS needs KVM's own PKS virtualization: the PKS bit
		 * in the guest's CPUID, CR4.PKS passed through to the
		 * hardware, IA32_PKRS switched on VM entry and exit and
		 * saved with the vCPU state, PFEC.PK from its MMU. None of
		 * that is exported to modules, so the module cannot add it:
		 * always absent.
		 */
		return 0;
	case VIRTKIT_CAP_GUEST_WRMSR:
		/* Only where KVM's guest write is exported (compat.h). */
		return virtkit_check_guest_wrmsr();
	default:
		return 0;
	}
}

static long virtkit_dev_attach(void __user *argp)
{
	struct virtkit_attach_vm arg;
	struct file *file;
	long r;

	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags || memchr_inv(arg.reserved, 0, sizeof(arg.reserved)))
		return -EINVAL;
	file = fget(arg.vm_fd);
	if (!file)
		return -EBADF;
	r = virtkit_is_kvm_vm_file(file) ? virtkit_attach_vm(file) : -EINVAL;
	fput(file);
	return r;
}

static long virtkit_dev_ioctl(struct file *filp, unsigned int ioctl, unsigned long arg)
{
	switch (ioctl) {
	case VIRTKIT_GET_API_VERSION:
		return arg ? -EINVAL : VIRTKIT_API_VERSION;
	case VIRTKIT_CHECK_EXTENSION:
		return virtkit_check_extension(arg);
	case VIRTKIT_ATTACH_VM:
		return virtkit_dev_attach((void __user *)arg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations virtkit_dev_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = virtkit_dev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

/* As /dev/kvm: group and mode come from udev (kmod/60-virtkit.rules). */
static struct miscdevice virtkit_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = VIRTKIT_DEVICE_NAME,
	.fops = &virtkit_dev_fops,
	.mode = 0660,
};

static void __init virtkit_abi_checks(void)
{
	BUILD_BUG_ON(sizeof(struct virtkit_attach_vm) != 32);
	BUILD_BUG_ON(sizeof(struct virtkit_spp_enable) != 32);
	BUILD_BUG_ON(sizeof(struct virtkit_spp_access) != 64);
	BUILD_BUG_ON(offsetof(struct virtkit_spp_access, flags) != 24);
	BUILD_BUG_ON(offsetof(struct virtkit_spp_access, reserved) != 32);
	BUILD_BUG_ON(sizeof(struct virtkit_spp_stats) != 64);
	BUILD_BUG_ON(sizeof(struct virtkit_vcpu_run) != 32);
	BUILD_BUG_ON(sizeof(struct virtkit_guest_wrmsr) != 64);
	BUILD_BUG_ON(offsetof(struct virtkit_guest_wrmsr, data) != 8);
	BUILD_BUG_ON(offsetof(struct virtkit_guest_wrmsr, result) != 20);
	BUILD_BUG_ON(offsetof(struct virtkit_guest_wrmsr, reserved) != 24);
	BUILD_BUG_ON(VIRTKIT_SPP_ALL_WRITABLE != VK_SPP_ALL_WRITABLE);
	BUILD_BUG_ON(VIRTKIT_SPP_SUBPAGE_SIZE != VK_SPP_SUBPAGE_SIZE);
	BUILD_BUG_ON(VIRTKIT_SPP_GFN_LIMIT != VK_SPPT_GFN_LIMIT);
}

static int __init virtkit_init(void)
{
	int r;

	virtkit_abi_checks();
	virtkit_locked_rmw_init();
	r = misc_register(&virtkit_dev);
	if (r) {
		pr_err("cannot register /dev/%s: %d\n", VIRTKIT_DEVICE_NAME, r);
		virtkit_locked_rmw_exit();
		return r;
	}
	return 0;
}

static void __exit virtkit_exit(void)
{
	misc_deregister(&virtkit_dev);
	virtkit_locked_rmw_exit();
}

module_init(virtkit_init);
module_exit(virtkit_exit);

MODULE_DESCRIPTION("virtkit: sub-page write protection for KVM on stock kernels");
MODULE_AUTHOR("virtkit developers");
MODULE_LICENSE("Dual MIT/GPL");
MODULE_VERSION("0.1.0");
