// SPDX-License-Identifier: MIT
/*
 * vmtest-hold-vm - keep one KVM VM open until killed (scripts/vmtest).
 *
 * Under QEMU's TCG, SVM emulation, the guest kernel occasionally stalls
 * (RCU stall, soft lockup) when KVM enables or disables virtualization on
 * the CPUs, which 6.1 does each time the number of VMs goes from 0 to 1 or
 * back - at every selftest, as each runs in a forked child. Holding one VM
 * for the whole run makes that happen once. Real hosts do not need this.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0 || ioctl(kvm, KVM_CREATE_VM, 0) < 0) {
		perror("vmtest-hold-vm: /dev/kvm");
		return 1;
	}
	for (;;)
		pause();
}
