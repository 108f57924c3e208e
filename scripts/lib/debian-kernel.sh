# SPDX-License-Identifier: MIT
# shellcheck shell=bash
#
# debian-kernel.sh - which Debian kernel virtkit builds and tests against.
# Sourced (bash) by scripts/vmtest, scripts/kernel-headers and
# scripts/install-deps; defines functions only.
#
# A series (6.1 or 6.12) names a Debian meta package that depends on the
# current kernel image of that series; the kernel version (kver) is read from
# that dependency, so it follows Debian's security updates:
#   6.1   linux-image-amd64      -> linux-image-6.1.0-N-amd64
#   6.12  linux-image-6.12-amd64 -> linux-image-6.12.N+deb12-amd64

# debian_kernel_meta SERIES: prints the meta package of SERIES.
debian_kernel_meta() {
	case $1 in
	6.1) echo linux-image-amd64 ;;
	6.12) echo linux-image-6.12-amd64 ;;
	*) echo "unsupported kernel series '$1' (6.1 or 6.12)" >&2; return 2 ;;
	esac
}

# debian_pkg_depends PKG PATTERN: prints the first package PKG depends on
# whose name matches the extended regular expression PATTERN.
debian_pkg_depends() {
	apt-cache depends "$1" 2>/dev/null |
		awk -v re="^($2)\$" '{ sub(/^[|]/, "", $1) } $1 == "Depends:" && $2 ~ re { print $2; exit }'
}

# debian_kernel_version SERIES: prints the kernel version (6.1.0-56-amd64)
# of the current image of SERIES. When no package list knows the meta
# package and we are root, runs apt-get update once. Fails with a message
# naming the package otherwise.
debian_kernel_version() {
	local meta pkg
	meta=$(debian_kernel_meta "$1") || return
	pkg=$(debian_pkg_depends "$meta" 'linux-image-[0-9].*')
	if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
		echo "# apt-get update (no package list knows $meta)" >&2
		apt-get update -q >/dev/null
		pkg=$(debian_pkg_depends "$meta" 'linux-image-[0-9].*')
	fi
	if [ -z "$pkg" ]; then
		echo "cannot resolve $meta with apt-cache (run apt-get update)" >&2
		return 1
	fi
	echo "${pkg#linux-image-}"
}
