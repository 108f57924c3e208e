# Install rules, included by the top-level Makefile.
#
#   make install   [PREFIX=/usr/local] [DESTDIR=]
#   make uninstall [PREFIX=/usr/local] [DESTDIR=]
#
# Layout under $(DESTDIR)$(PREFIX):
#   include/virtkit/*.hpp, *.h                         library headers
#   include/virtkit/uapi/virtkit*.h                     module and KVMI ABI
#                                                       (uapi/linux/*.h; not in
#                                                       include/linux/, which is
#                                                       the kernel's, linux-libc-dev)
#   lib/libvirtkit.a, lib/libvirtkit.so{,.0.1,.0.1.0}    the VMM library (SONAME
#                                                       libvirtkit.so.$(SOVERSION))
#   lib/libvirtkit-introspect.a, .so{,.0.1,.0.1.0}      the tool end of KVMI
#   lib/pkgconfig/virtkit.pc, virtkit-introspect.pc     pkg-config
#   lib/cmake/virtkit/virtkitConfig{,Version}.cmake     find_package(virtkit):
#                                                       virtkit::virtkit{,_static},
#                                                       virtkit::introspect{,_static}
#   bin/virtkit, bin/virtkit-introspect                 the tools
#   share/bash-completion/completions/virtkit{,-introspect}  their completion
#   share/man/man1/virtkit{,-introspect}.1              man pages (make install-man:
#                                                       help2man, scripts/make-manpages)
#
# The pkg-config files record PREFIX; the CMake package locates itself and
# is relocatable.
#
# The guest environment (guest/: libvirtkit-guest.a, <virtkit/x86/*.h*>) is
# not installed. A program using it must build its guest code with the
# guest-code flags, link statically as a non-PIE executable (its pages are
# loaded into the guest at their own addresses), and link libvirtkit.a, not
# libvirtkit.so: GuestVm uses libvirtkit internals (virtkit::detail::hex)
# that the shared library does not export. It is part of this tree's
# selftests, benchmarks and tool, with no tested outside consumer.
# `make uninstall` still removes the x86 headers earlier versions installed.

BINDIR       ?= $(PREFIX)/bin
LIBDIR       ?= $(PREFIX)/lib
INCLUDEDIR   ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
CMAKEDIR     ?= $(LIBDIR)/cmake/virtkit
BASHCOMPDIR  ?= $(PREFIX)/share/bash-completion/completions
MANDIR       ?= $(PREFIX)/share/man

INSTALL      ?= install

INST_HDRS     := $(wildcard libvirtkit/include/virtkit/*.hpp libvirtkit/include/virtkit/*.h)
# Installed by virtkit 0.1.0 before the guest environment moved to guest/.
OLD_X86_HDRS  := guest.h guest_probes.hpp guest_vm.hpp page_tables.hpp
INST_UAPI     := $(wildcard uapi/linux/*.h)
UAPIDIR       := $(INCLUDEDIR)/virtkit/uapi
# Where make install put the UAPI headers before 0.1.0's release.
OLD_UAPIDIR   := $(INCLUDEDIR)/linux

# pkg-config: keep ${prefix} symbolic where the directory lies under PREFIX.
pc_dir = $(patsubst $(PREFIX)/%,$${prefix}/%,$(1))
# CMake: paths relative to the installed config file's directory.
cmake_rel = $(shell realpath -m --relative-to='$(CMAKEDIR)' '$(1)')

$(BUILD)/virtkit.pc: libvirtkit/virtkit.pc.in FORCE
	@mkdir -p $(@D)
	sed -e 's|@PREFIX@|$(PREFIX)|g' \
	    -e 's|@LIBDIR@|$(call pc_dir,$(LIBDIR))|g' \
	    -e 's|@INCLUDEDIR@|$(call pc_dir,$(INCLUDEDIR))|g' \
	    -e 's|@VERSION@|$(VERSION)|g' $< > $@

$(BUILD)/virtkit-introspect.pc: libvirtkit/virtkit-introspect.pc.in FORCE
	@mkdir -p $(@D)
	sed -e 's|@PREFIX@|$(PREFIX)|g' \
	    -e 's|@LIBDIR@|$(call pc_dir,$(LIBDIR))|g' \
	    -e 's|@INCLUDEDIR@|$(call pc_dir,$(INCLUDEDIR))|g' \
	    -e 's|@VERSION@|$(VERSION)|g' $< > $@

$(BUILD)/cmake/virtkitConfig.cmake: libvirtkit/cmake/virtkitConfig.cmake.in FORCE
	@mkdir -p $(@D)
	sed -e 's|@VERSION@|$(VERSION)|g' \
	    -e 's|@SOVERSION@|$(SOVERSION)|g' \
	    -e 's|@CMAKE_TO_LIBDIR@|$(call cmake_rel,$(LIBDIR))|g' \
	    -e 's|@CMAKE_TO_INCLUDEDIR@|$(call cmake_rel,$(INCLUDEDIR))|g' $< > $@

$(BUILD)/cmake/virtkitConfigVersion.cmake: libvirtkit/cmake/virtkitConfigVersion.cmake.in FORCE
	@mkdir -p $(@D)
	sed -e 's|@VERSION@|$(VERSION)|g' $< > $@

INST_GENERATED := $(BUILD)/virtkit.pc $(BUILD)/virtkit-introspect.pc \
                  $(BUILD)/cmake/virtkitConfig.cmake \
                  $(BUILD)/cmake/virtkitConfigVersion.cmake

# install-lib: the libraries, headers, pkg-config and CMake files (what
# libvirtkit0.1 and libvirtkit-dev hold); install-tools: both tools
# (virtkit-tools); install: both.
install: install-lib install-tools

install-lib: lib $(INST_GENERATED)
	$(INSTALL) -d $(DESTDIR)$(INCLUDEDIR)/virtkit $(DESTDIR)$(UAPIDIR) $(DESTDIR)$(LIBDIR) \
		$(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(CMAKEDIR)
	$(INSTALL) -m 644 $(INST_HDRS) $(DESTDIR)$(INCLUDEDIR)/virtkit/
	$(INSTALL) -m 644 $(INST_UAPI) $(DESTDIR)$(UAPIDIR)/
	$(INSTALL) -m 644 $(LIB_A) $(DESTDIR)$(LIBDIR)/
	$(INSTALL) -m 755 $(LIB_SO) $(DESTDIR)$(LIBDIR)/
	ln -sf libvirtkit.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libvirtkit.so.$(SOVERSION)
	ln -sf libvirtkit.so.$(SOVERSION) $(DESTDIR)$(LIBDIR)/libvirtkit.so
	$(INSTALL) -m 644 $(INTROSPECT_A) $(DESTDIR)$(LIBDIR)/
	$(INSTALL) -m 755 $(INTROSPECT_SO) $(DESTDIR)$(LIBDIR)/
	ln -sf libvirtkit-introspect.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libvirtkit-introspect.so.$(SOVERSION)
	ln -sf libvirtkit-introspect.so.$(SOVERSION) $(DESTDIR)$(LIBDIR)/libvirtkit-introspect.so
	$(INSTALL) -m 644 $(BUILD)/virtkit.pc $(BUILD)/virtkit-introspect.pc $(DESTDIR)$(PKGCONFIGDIR)/
	$(INSTALL) -m 644 $(BUILD)/cmake/virtkitConfig.cmake \
		$(BUILD)/cmake/virtkitConfigVersion.cmake $(DESTDIR)$(CMAKEDIR)/

install-tools: tool
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(BASHCOMPDIR)
	$(INSTALL) -m 755 $(TOOL_BIN) $(INTROSPECT_BIN) $(DESTDIR)$(BINDIR)/
	$(INSTALL) -m 644 tools/completion/virtkit tools/completion/virtkit-introspect \
		$(DESTDIR)$(BASHCOMPDIR)/

# The tools' man pages, from their --help (help2man).
MAN_PAGES := $(BUILD)/man/virtkit.1 $(BUILD)/man/virtkit-introspect.1
man: $(MAN_PAGES)
$(MAN_PAGES) &: $(TOOL_BIN) $(INTROSPECT_BIN) scripts/make-manpages
	scripts/make-manpages $(BUILD)/bin $(BUILD)/man

install-man: man
	$(INSTALL) -d $(DESTDIR)$(MANDIR)/man1
	$(INSTALL) -m 644 $(MAN_PAGES) $(DESTDIR)$(MANDIR)/man1/

uninstall:
	rm -f $(addprefix $(DESTDIR)$(INCLUDEDIR)/virtkit/,$(notdir $(INST_HDRS)))
	rm -f $(addprefix $(DESTDIR)$(INCLUDEDIR)/virtkit/x86/,$(OLD_X86_HDRS))
	rm -f $(addprefix $(DESTDIR)$(UAPIDIR)/,$(notdir $(INST_UAPI)))
	rm -f $(addprefix $(DESTDIR)$(OLD_UAPIDIR)/,$(notdir $(INST_UAPI)))
	rmdir $(DESTDIR)$(UAPIDIR) $(DESTDIR)$(INCLUDEDIR)/virtkit/x86 \
		$(DESTDIR)$(INCLUDEDIR)/virtkit 2>/dev/null || true
	rm -f $(DESTDIR)$(LIBDIR)/libvirtkit.a $(DESTDIR)$(LIBDIR)/libvirtkit.so \
		$(DESTDIR)$(LIBDIR)/libvirtkit.so.$(SOVERSION) \
		$(DESTDIR)$(LIBDIR)/libvirtkit.so.$(VERSION)
	rm -f $(DESTDIR)$(LIBDIR)/libvirtkit-introspect.a $(DESTDIR)$(LIBDIR)/libvirtkit-introspect.so \
		$(DESTDIR)$(LIBDIR)/libvirtkit-introspect.so.$(SOVERSION) \
		$(DESTDIR)$(LIBDIR)/libvirtkit-introspect.so.$(VERSION)
	@# The SONAME link of 0.1.0's first installs (.so.0), when it is this version's.
	@for l in libvirtkit libvirtkit-introspect; do \
		if [ "$$(readlink $(DESTDIR)$(LIBDIR)/$$l.so.0 2>/dev/null)" = "$$l.so.$(VERSION)" ]; then \
			echo "rm -f $(DESTDIR)$(LIBDIR)/$$l.so.0"; rm -f $(DESTDIR)$(LIBDIR)/$$l.so.0; \
		fi; \
	done
	rm -f $(DESTDIR)$(PKGCONFIGDIR)/virtkit.pc $(DESTDIR)$(PKGCONFIGDIR)/virtkit-introspect.pc
	rm -f $(DESTDIR)$(CMAKEDIR)/virtkitConfig.cmake \
		$(DESTDIR)$(CMAKEDIR)/virtkitConfigVersion.cmake
	rmdir $(DESTDIR)$(CMAKEDIR) 2>/dev/null || true
	rm -f $(DESTDIR)$(BINDIR)/virtkit $(DESTDIR)$(BINDIR)/virtkit-introspect
	rm -f $(DESTDIR)$(BASHCOMPDIR)/virtkit $(DESTDIR)$(BASHCOMPDIR)/virtkit-introspect
	rm -f $(DESTDIR)$(MANDIR)/man1/virtkit.1 $(DESTDIR)$(MANDIR)/man1/virtkit-introspect.1

.PHONY: install-lib install-tools man install-man

.PHONY: FORCE
FORCE:
