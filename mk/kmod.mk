# virtkit.ko rules, included by the top-level Makefile.
#
#   make kmod            build virtkit.ko for Debian's 6.1 and 6.12 kernels and
#                        the newest 7.x kernel in Debian's archive (series 7:
#                        trixie-backports, built in the Debian 13 build root
#                        that scripts/debian13-root creates under $(BUILD))
#                        with W=1 C=1, warnings fail (scripts/build-kmod), in
#                        $(BUILD)/kmod/<kver>/
#   make check-kmod      for each kernel: build it, boot the kernel under QEMU
#                        with the module loaded (scripts/vmtest --module) and
#                        run, in that one boot, the x86 and introspection
#                        selftests against the kmod SPP backend and then the
#                        module's own tests
#                        (selftests/kmod); the module must unload cleanly
#   make check-dkms      `dkms build` of the DKMS package for each kernel's headers,
#                        in a private DKMS tree under $(BUILD)/dkms (the system's
#                        /var/lib/dkms and /usr/src are not touched); for the
#                        series of KMOD_ROOT_SERIES with the dkms of the Debian 13
#                        build root, inside it ($(BUILD)/dkms bind-mounted there)
#   make dkms-install    as root: install the DKMS package (/usr/src/virtkit-$(VERSION)),
#                        build and install the module for the running kernel
#                        (DKMS_KVER=<version> for another), the udev rule
#                        for /dev/virtkit (group kvm, mode 0660, like /dev/kvm)
#                        and the modules-load.d file that loads it at boot;
#                        both into /etc (a local administrator's install,
#                        outside the package manager; the virtkit-dkms
#                        package puts them into /usr/lib instead)
#   make install-dkms-files DESTDIR=<dir> [UDEVRULESDIR=] [MODULESLOADDIR=]
#                        the DKMS source tree, the udev rule and the
#                        modules-load.d file, unbuilt (debian/rules: virtkit-dkms)
#   make dkms-uninstall  as root: remove all of it again
#
# Documentation/kmod.rst describes them.

KMOD_SERIES   := 6.1 6.12 7
# The series whose kbuild tools need Debian 13: built in its build root
# (scripts/debian13-root; scripts/build-kmod and scripts/vmtest do that
# themselves, check-dkms below runs dkms there).
KMOD_ROOT_SERIES := 7
KMOD_OUT       = $(abspath $(BUILD))/kmod
# Each kernel's boot runs both suites; TCG is slow, give it time.
KMOD_TIMEOUT  ?= 2400
KMOD_PAYLOAD   = $(KMOD_OUT)/payload
# In the guest of series $(1): run-selftests per suite; both run, either
# failing fails. The x86 suite's trace test runs the virtkit tool (virtkit
# trace) copied into /payload. Each suite's KTAP follows a line naming it (.ci/run labels
# the suite's "# Totals" with it).
KMOD_GUEST_CMD = f=0; \
	echo scripts/run-selftests x86: Debian $(1) guest, virtkit.ko, VIRTKIT_SPP_BACKEND=kmod; \
	VIRTKIT_SPP_BACKEND=kmod VIRTKIT_TRACE_TOOL=/payload/virtkit run-selftests x86 || f=1; \
	echo scripts/run-selftests introspection: Debian $(1) guest, virtkit.ko, VIRTKIT_SPP_BACKEND=kmod; \
	VIRTKIT_SPP_BACKEND=kmod run-selftests introspection || f=1; \
	echo scripts/run-selftests kmod: Debian $(1) guest, virtkit.ko; \
	run-selftests kmod || f=1; \
	exit $$f

DKMS_SRC      := /usr/src/virtkit-$(VERSION)
DKMS_KVER     ?= $(shell uname -r)
UDEVRULESDIR   ?= /etc/udev/rules.d
MODULESLOADDIR ?= /etc/modules-load.d
UDEV_RULE      = $(UDEVRULESDIR)/60-virtkit.rules
MODULES_LOAD   = $(MODULESLOADDIR)/virtkit.conf
DKMS_CHECK     = $(abspath $(BUILD))/dkms
# dkms runs make (Kbuild) in turn: not with this make's variables (CC=, O=).
DKMS_ENV      := env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL
DKMS          := $(DKMS_ENV) dkms
# A DKMS of our own for check-dkms: its trees, and its module signing key
# (dkms 3 reads mok_signing_key/mok_certificate from its environment when
# /etc/dkms/framework.conf does not set them; left alone, it would create a
# key in /var/lib/dkms).
DKMS_PRIVATE   = $(DKMS_ENV) mok_signing_key=$(DKMS_CHECK)/mok.key \
		 mok_certificate=$(DKMS_CHECK)/mok.pub \
		 dkms --dkmstree $(DKMS_CHECK)/var --sourcetree $(DKMS_CHECK)/src \
		 --installtree $(DKMS_CHECK)/install
# The same inside the Debian 13 build root, with a DKMS tree of its own (the
# root's dkms is 3.2, the host's 3.0: each keeps its own state).
DKMS_ROOT      = scripts/debian13-root exec --bind $(DKMS_CHECK) -- \
		 env mok_signing_key=$(DKMS_CHECK)/mok.key \
		 mok_certificate=$(DKMS_CHECK)/mok.pub \
		 dkms --dkmstree $(DKMS_CHECK)/var-debian13 --sourcetree $(DKMS_CHECK)/src \
		 --installtree $(DKMS_CHECK)/install

# The DKMS source tree in $(1): the module's sources (`make -C kmod tree`)
# and dkms.conf at its root, with this Makefile's VERSION.
define dkms_tree
	rm -rf $(1)
	$(MAKE) -s -C kmod tree DEST=$(1)
	sed 's/^PACKAGE_VERSION=.*/PACKAGE_VERSION="$(VERSION)"/' kmod/dkms.conf >$(1)/dkms.conf
endef

.PHONY: kmod check-kmod check-dkms dkms-install dkms-uninstall install-dkms-files

kmod:
	@for s in $(KMOD_SERIES); do \
		scripts/build-kmod --kernel $$s --out $(KMOD_OUT) || exit 1; \
	done

check-kmod: $(ST_BINS) $(INTRO_ST_BINS) $(KMOD_ST_BINS) $(TOOL_BIN)
	rm -rf $(KMOD_PAYLOAD)
	mkdir -p $(KMOD_PAYLOAD)/x86 $(KMOD_PAYLOAD)/introspection $(KMOD_PAYLOAD)/kmod
	cp $(ST_BINS) $(KMOD_PAYLOAD)/x86/
	cp $(INTRO_ST_BINS) $(KMOD_PAYLOAD)/introspection/
	$(if $(KMOD_ST_BINS),cp $(KMOD_ST_BINS) $(KMOD_PAYLOAD)/kmod/)
	@rc=0; for s in $(KMOD_SERIES); do \
		ko=$$(scripts/build-kmod --kernel $$s --out $(KMOD_OUT)) || { rc=1; continue; }; \
		echo "scripts/vmtest --kernel $$s --timeout $(KMOD_TIMEOUT) --module $$ko" \
		     "--copy scripts/run-selftests --copy $(TOOL_BIN) --copy $(KMOD_PAYLOAD)/x86" \
		     "--copy $(KMOD_PAYLOAD)/introspection --copy $(KMOD_PAYLOAD)/kmod" \
		     "-- sh -c '$(subst @S@,$$s,$(subst $$,\$$,$(call KMOD_GUEST_CMD,@S@)))'"; \
		scripts/vmtest --kernel $$s --timeout $(KMOD_TIMEOUT) --module $$ko \
			--copy scripts/run-selftests --copy $(TOOL_BIN) --copy $(KMOD_PAYLOAD)/x86 \
			--copy $(KMOD_PAYLOAD)/introspection \
			--copy $(KMOD_PAYLOAD)/kmod -- sh -c '$(call KMOD_GUEST_CMD,'$$s')' || rc=1; \
	done; exit $$rc

check-dkms:
	@command -v dkms >/dev/null || { echo "check-dkms: dkms not found: run scripts/install-deps" >&2; exit 1; }
	rm -rf $(DKMS_CHECK)
	$(call dkms_tree,$(DKMS_CHECK)/src/virtkit-$(VERSION))
	mkdir -p $(DKMS_CHECK)/var $(DKMS_CHECK)/var-debian13 $(DKMS_CHECK)/install
	$(DKMS_PRIVATE) add virtkit/$(VERSION)
	@admit=$$(sed -n 's/^BUILD_EXCLUSIVE_KERNEL="\(.*\)"$$/\1/p' kmod/dkms.conf); \
	for s in $(KMOD_SERIES); do \
		kver=$$(scripts/kernel-headers --version $$s) && \
		kdir=$$(scripts/kernel-headers $$s) || exit 1; \
		echo "$$kver" | grep -q -E "$$admit" || { \
			echo "check-dkms: kmod/dkms.conf's BUILD_EXCLUSIVE_KERNEL=\"$$admit\" does not" \
			     "admit $$kver, the current kernel of tested series $$s: add the series" \
			     "once make check-kmod passes on it (Documentation/kmod.rst)" >&2; exit 1; }; \
		case " $(KMOD_ROOT_SERIES) " in \
		*" $$s "*) \
			root=$$(scripts/debian13-root) || exit 1; \
			kdir=$${kdir#"$$root"}; \
			var=$(DKMS_CHECK)/var-debian13; \
			if [ ! -e $$var/virtkit/$(VERSION)/source ]; then \
				echo "dkms add virtkit/$(VERSION) (in the Debian 13 build root)"; \
				$(DKMS_ROOT) add virtkit/$(VERSION) || exit 1; \
			fi; \
			echo "dkms build virtkit/$(VERSION) -k $$kver --kernelsourcedir $$kdir (in the Debian 13 build root)"; \
			$(DKMS_ROOT) build virtkit/$(VERSION) -k $$kver --kernelsourcedir $$kdir || { \
				cat $$var/virtkit/$(VERSION)/build/make.log 2>/dev/null; exit 1; } ;; \
		*) \
			var=$(DKMS_CHECK)/var; \
			echo "dkms build virtkit/$(VERSION) -k $$kver --kernelsourcedir $$kdir"; \
			$(DKMS_PRIVATE) build virtkit/$(VERSION) -k $$kver --kernelsourcedir $$kdir || { \
				cat $$var/virtkit/$(VERSION)/build/make.log 2>/dev/null; exit 1; } ;; \
		esac; \
		ls $$var/virtkit/$(VERSION)/$$kver/*/module/virtkit.ko* || exit 1; \
	done

dkms-install:
	@test "$$(id -u)" -eq 0 || { echo "dkms-install: run as root" >&2; exit 1; }
	@command -v dkms >/dev/null || { echo "dkms-install: dkms not found: apt-get install dkms" >&2; exit 1; }
	@if $(DKMS) status virtkit/$(VERSION) | grep -q .; then \
		echo "dkms remove virtkit/$(VERSION) --all"; $(DKMS) remove virtkit/$(VERSION) --all; fi
	$(call dkms_tree,$(DKMS_SRC))
	$(DKMS) add virtkit/$(VERSION)
	$(DKMS) build virtkit/$(VERSION) -k $(DKMS_KVER)
	$(DKMS) install virtkit/$(VERSION) -k $(DKMS_KVER)
	install -D -m 0644 kmod/60-virtkit.rules $(UDEV_RULE)
	install -D -m 0644 kmod/virtkit.conf $(MODULES_LOAD)
	@udevadm control --reload 2>/dev/null || \
		echo "dkms-install: udevd is not running: $(UDEV_RULE) applies from its next start"
	@echo "dkms-install: installed virtkit $(VERSION) for $(DKMS_KVER); it loads at boot" \
	      "($(MODULES_LOAD)); load it now with: modprobe virtkit"

dkms-uninstall:
	@test "$$(id -u)" -eq 0 || { echo "dkms-uninstall: run as root" >&2; exit 1; }
	@if command -v dkms >/dev/null && $(DKMS) status virtkit/$(VERSION) | grep -q .; then \
		echo "dkms remove virtkit/$(VERSION) --all"; $(DKMS) remove virtkit/$(VERSION) --all; fi
	rm -rf $(DKMS_SRC) $(UDEV_RULE) $(MODULES_LOAD)
	@udevadm control --reload 2>/dev/null || true

# What the virtkit-dkms package holds, under DESTDIR; dh_dkms adds the
# maintainer scripts that run dkms add/build/install.
install-dkms-files:
	@case "$(DESTDIR)" in /*) ;; *) echo "install-dkms-files: DESTDIR must be" \
		"an absolute directory" >&2; exit 1 ;; esac
	$(call dkms_tree,$(DESTDIR)$(DKMS_SRC))
	install -D -m 0644 kmod/60-virtkit.rules $(DESTDIR)$(UDEV_RULE)
	install -D -m 0644 kmod/virtkit.conf $(DESTDIR)$(MODULES_LOAD)
