// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * VIRTKIT_VCPU_GUEST_WRMSR: a WRMSR performed exactly as the guest's own.
 *
 * An introspection tool intercepts guest WRMSRs through KVM's MSR filter,
 * and KVM completes a write its filter denied without performing it: the
 * VMM performs it when the tool lets it through. KVM_SET_MSRS cannot do
 * that exactly, as it is a host-initiated write, which KVM checks less and
 * treats differently (IA32_TSC synchronizes the TSC instead of moving
 * TSC_ADJUST with it, kvm.ignore_msrs does not apply, ...). This ioctl goes
 * through KVM's own guest write (compat.h: kvm_set_msr()), which skips only
 * the MSR filter, the check that made the exit.
 *
 * Locking is KVM_SET_MSRS's: vcpu->mutex (killable, as kvm_vcpu_ioctl()
 * takes it: a vCPU in KVM_RUN on another thread is waited for), then the
 * vCPU loaded and kvm->srcu held around the write. The per-VM file holds
 * the VM's file and the ioctl the vCPU's file, so neither the VM nor the
 * vCPU can go away meanwhile.
 */
#include <linux/file.h>
#include <linux/kvm_host.h>
#include <linux/mutex.h>
#include <linux/string.h>
#include <linux/uaccess.h>

#include <linux/virtkit.h>

#include "compat.h"
#include "virtkit.h"

long virtkit_check_guest_wrmsr(void)
{
	return virtkit_guest_wrmsr_available();
}

long virtkit_vcpu_guest_wrmsr(struct virtkit_vm *vm, void __user *argp)
{
	struct virtkit_guest_wrmsr __user *uarg = argp;
	struct virtkit_guest_wrmsr arg;
	struct kvm_vcpu *vcpu;
	struct file *file;
	long r;

	if (!virtkit_guest_wrmsr_available())
		return -EOPNOTSUPP;
	if (copy_from_user(&arg, argp, sizeof(arg)))
		return -EFAULT;
	if (arg.flags || memchr_inv(arg.reserved, 0, sizeof(arg.reserved)))
		return -EINVAL;
	/*
	 * All or nothing: the result must be writable before the MSR is
	 * written (the value read is written back, nothing changes).
	 */
	if (put_user(arg.result, &uarg->result))
		return -EFAULT;
	vcpu = virtkit_vcpu_fget(vm, arg.vcpu_fd, &file);
	if (IS_ERR(vcpu))
		return PTR_ERR(vcpu);
	r = mutex_lock_killable(&vcpu->mutex);
	if (r)
		goto out;
	r = virtkit_guest_wrmsr(vcpu, arg.index, arg.data);
	mutex_unlock(&vcpu->mutex);
	if (r < 0)
		goto out;
	/* Only if another thread unmapped the argument meanwhile. */
	r = put_user(r ? VIRTKIT_GUEST_WRMSR_GP : VIRTKIT_GUEST_WRMSR_WRITTEN,
		     &uarg->result) ? -EFAULT : 0;
out:
	fput(file);
	return r;
}
