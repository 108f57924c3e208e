# SPDX-License-Identifier: MIT
# shellcheck shell=bash
#
# Building a busybox initramfs, shared by scripts/vmtest (the guest that runs
# the tests on nested KVM) and scripts/run-initramfs (the guest `virtkit run`
# boots). Sourced; the functions exit with a message on failure.

# The static busybox the initramfs runs on (busybox-static: scripts/install-deps).
initramfs_busybox=/bin/busybox

# initramfs_skeleton DIR PROG: DIR gets the usual directories and
# bin/busybox; PROG names the caller in messages.
initramfs_skeleton() {
	local dir=$1 prog=$2
	if [ ! -x "$initramfs_busybox" ] || ldd "$initramfs_busybox" >/dev/null 2>&1; then
		echo "$prog: $initramfs_busybox must be the static busybox: run scripts/install-deps" >&2
		exit 1
	fi
	mkdir -p "$dir"/{bin,dev,proc,sys,tmp}
	cp "$initramfs_busybox" "$dir/bin/busybox"
}

# initramfs_pack DIR OUT [gzip|none]: a newc cpio of DIR (what the kernel's
# initramfs unpacker takes), gzip-compressed unless told none, written
# atomically to OUT.
initramfs_pack() {
	local dir=$1 out=$2 compress=${3:-gzip} filter=(gzip -1)
	[ "$compress" = none ] && filter=(cat)
	(cd "$dir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | "${filter[@]}") >"$out.tmp"
	mv -f "$out.tmp" "$out"
}
