# SPDX-License-Identifier: MIT
# shellcheck shell=bash
#
# debian-kernel.sh - which Debian kernel virtkit builds and tests against.
# Sourced (bash) by scripts/vmtest, scripts/kernel-headers,
# scripts/build-kmod and scripts/install-deps; defines functions only.
#
# A series (6.1, 6.12 or 7) names a Debian meta package that depends on the
# current kernel image of that series; the kernel version (kver) is read from
# that dependency, so it follows Debian's security updates and backports:
#   6.1   linux-image-amd64      -> linux-image-6.1.0-N-amd64
#   6.12  linux-image-6.12-amd64 -> linux-image-6.12.N+deb12-amd64
#   7     linux-image-amd64 of trixie-backports (Debian 13)
#                                -> linux-image-7.X.N+deb13-amd64: the newest
#         7.x kernel in Debian's archive. Its kbuild tools are built for
#         Debian 13, so everything about it - apt look-ups, downloads, the
#         headers, module builds - happens in the Debian 13 build root
#         (scripts/debian13-root, build/debian13-root), never on the host.

debian_kernel_scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# debian_kernel_meta SERIES: prints the meta package of SERIES.
debian_kernel_meta() {
	case $1 in
	6.1) echo linux-image-amd64 ;;
	6.12) echo linux-image-6.12-amd64 ;;
	7) echo linux-image-amd64 ;;
	*) echo "unsupported kernel series '$1' (6.1, 6.12 or 7)" >&2; return 2 ;;
	esac
}

# debian_kernel_in_root SERIES: true when SERIES is built and resolved in
# the Debian 13 build root.
debian_kernel_in_root() {
	[ "$1" = 7 ]
}

# debian_kernel_root: creates the Debian 13 build root if needed and prints
# its host path.
debian_kernel_root() {
	"$debian_kernel_scripts/debian13-root"
}

# debian_apt SERIES COMMAND [ARG...]: runs apt-cache or apt-get for SERIES:
# on the host, or in the Debian 13 root with trixie-backports preferred.
debian_apt() {
	local series=$1 cmd=$2; shift 2
	if debian_kernel_in_root "$series"; then
		"$debian_kernel_scripts/debian13-root" exec -- "$cmd" -t trixie-backports "$@"
	else
		"$cmd" "$@"
	fi
}

# debian_pkg_depends PKG PATTERN [SERIES]: prints the first package PKG
# depends on whose name matches the extended regular expression PATTERN
# (looked up where SERIES is resolved; default: the host).
debian_pkg_depends() {
	debian_apt "${3:-6.1}" apt-cache depends "$1" 2>/dev/null |
		awk -v re="^($2)\$" '{ sub(/^[|]/, "", $1) } $1 == "Depends:" && $2 ~ re { print $2; exit }'
}

# debian_kernel_version SERIES: prints the kernel version (6.1.0-56-amd64,
# 7.3.4+deb13-amd64) of the current image of SERIES. When no package list
# knows the meta package and we are root, runs apt-get update once (for 7:
# in the root, also when its lists are more than a day old). Fails with a
# message naming the package otherwise.
debian_kernel_version() {
	local series=$1 meta pkg rootdir
	meta=$(debian_kernel_meta "$series") || return
	if debian_kernel_in_root "$series"; then
		rootdir=$(debian_kernel_root) || return
		# Newer package lists once a day; on failure (no network) the
		# lists it has still resolve a version.
		if [ -z "$(find "$rootdir/.virtkit-apt-updated" -mmin -1440 2>/dev/null)" ]; then
			"$debian_kernel_scripts/debian13-root" --update >/dev/null ||
				echo "# apt-get update in $rootdir failed: using its older package lists" >&2
		fi
	fi
	pkg=$(debian_pkg_depends "$meta" 'linux-image-[0-9].*' "$series")
	if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
		echo "# apt-get update (no package list knows $meta)" >&2
		if debian_kernel_in_root "$series"; then
			"$debian_kernel_scripts/debian13-root" --update >/dev/null || return
		else
			apt-get update -q >/dev/null
		fi
		pkg=$(debian_pkg_depends "$meta" 'linux-image-[0-9].*' "$series")
	fi
	if [ -z "$pkg" ]; then
		echo "cannot resolve $meta with apt-cache (run apt-get update)" >&2
		return 1
	fi
	case $series in
	7)
		case $pkg in
		linux-image-7.*) ;;
		*) echo "trixie-backports' $meta now depends on $pkg, not a 7.x kernel: add a series" >&2
		   return 1 ;;
		esac
		;;
	esac
	echo "${pkg#linux-image-}"
}

# debian_kernel_image_packages SERIES KVER: prints the packages holding the
# kernel image (/boot/vmlinuz-KVER) and its modules (/lib/modules/KVER),
# one a line. Up to 6.x that is linux-image-KVER itself; from 7.x on,
# linux-image-KVER only depends on linux-binary-KVER (the image) and
# linux-modules-KVER (the modules).
debian_kernel_image_packages() {
	local img=linux-image-$2 re bin mods
	re=${2//./[.]}
	re=${re//+/[+]}
	bin=$(debian_pkg_depends "$img" "linux-binary-$re" "$1")
	mods=$(debian_pkg_depends "$img" "linux-modules-$re" "$1")
	if [ -n "$bin" ] && [ -n "$mods" ]; then
		printf '%s\n' "$bin" "$mods"
	else
		echo "$img"
	fi
}
