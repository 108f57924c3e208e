# virtkit front door.
#
#   make            build everything userspace (library, tool, selftests, unit tests)
#   make run-initramfs  the busybox initramfs `virtkit run` boots (tests, docs)
#   make run        install missing Debian packages, build, run `virtkit info`,
#                   `virtkit demo` and the example introspection tool against a
#                   second demo (in a QEMU guest with virtkit.ko loaded when
#                   /dev/kvm is not usable), then boot Linux with virtkit run
#   make test       the offline tests: no network, root, KVM nor packages to
#                   install (the unit tests, as KTAP) - what a package build
#                   (dh_auto_test) can run
#   make check      install missing Debian packages, build, run every test suite
#                   (each one, also after one failed; one table at the end):
#                   unit tests, selftests (on this host's /dev/kvm where usable,
#                   and on nested KVM under a second, narrower CPU model), the
#                   page-walk oracle (QEMU TCG, two CPU models),
#                   virtkit.ko's build and tests in Debian's
#                   6.1, 6.12 and newest 7.x kernels (QEMU), its DKMS build,
#                   the install check, the Debian packages' check
#   make bench      build the benchmarks (bench/*.cpp; built by all, not run by check)
#   make run-bench  build and run them (in a QEMU guest when /dev/kvm is not usable)
#   make install    install headers, libraries, pkg-config and CMake files, the tools
#                   (PREFIX, DESTDIR)
#   make deb        the Debian packages (libvirtkit0.1, libvirtkit-dev, virtkit-tools,
#                   virtkit-dkms) with dpkg-buildpackage, lintian-checked, in $(BUILD)/deb
#   make check-deb  build them and test what they install (scripts/check-deb)
#   make kmod       build the kernel module virtkit.ko for Debian's 6.1, 6.12 and 7.x kernels
#   make check-kmod, check-dkms, dkms-install, dkms-uninstall: see mk/kmod.mk
#   make check-asan, check-tsan: sanitizer builds and runs, see mk/sanitize.mk
#
# Everything is built out of tree in $(BUILD).

BUILD      ?= build
PREFIX     ?= /usr/local
DESTDIR    ?=
VERSION    := 0.1.0
# The shared libraries' SONAME version. 0.x releases are compatible only
# within one minor release (the CMake version file says the same), so the
# SONAME is libvirtkit.so.0.MINOR and a new minor release gets a new one
# (and a new Debian runtime package, libvirtkit0.MINOR); from 1.0 on, the
# major version. Documentation/building.rst, "SONAME policy".
VERSION_MAJOR := $(word 1,$(subst ., ,$(VERSION)))
VERSION_MINOR := $(word 2,$(subst ., ,$(VERSION)))
SOVERSION  := $(if $(filter 0,$(VERSION_MAJOR)),0.$(VERSION_MINOR),$(VERSION_MAJOR))

CXX        ?= g++
CC         ?= gcc
CXXSTD     := -std=c++20
WARN       := -Wall -Wextra -Werror
OPT        ?= -O2 -g

# Build flags follow the audience (Documentation/architecture.rst).
#
# The shipped libraries (libvirtkit, libvirtkit-introspect) and the host-only
# tool get the hardening Debian's dpkg-buildflags gives packages: stack
# protector, stack-clash protection, CET (IBT and shadow-stack notes),
# _FORTIFY_SOURCE (needs optimisation), full RELRO. The libraries export
# only their public API: -fvisibility=hidden, and the public headers mark
# what they declare visible (#pragma GCC visibility).
FORTIFY    := $(if $(filter -O1 -O2 -O3 -Os,$(OPT)),-U_FORTIFY_SOURCE -D_FORTIFY_SOURCE=2)
HARDEN     := -fstack-protector-strong -fstack-clash-protection -fcf-protection=full \
              -Wformat -Werror=format-security $(FORTIFY)
HARDEN_LDFLAGS := -Wl,-z,relro -Wl,-z,now
# Shared libraries resolve every symbol they use at link time and carry the
# CET properties (IBT, SHSTK) their code has: every object is built with
# -fcf-protection=full, but Debian 12's crti.o/crtn.o (the legacy _init and
# _fini stubs, without ENDBR64 or a property note) would drop them. They are
# left out (-nostartfiles; constructors run from .init_array), keeping GCC's
# crtbeginS.o/crtendS.o, whose entry points have ENDBR64.
SO_LDFLAGS := $(HARDEN_LDFLAGS) -Wl,-z,defs -Wl,-z,ibt -Wl,-z,shstk -nostartfiles
SO_CRTBEGIN := $(shell $(CXX) -print-file-name=crtbeginS.o)
SO_CRTEND   := $(shell $(CXX) -print-file-name=crtendS.o)
VISIBILITY := -fvisibility=hidden
# Guest code runs from the executable's own pages at their host addresses:
# no stack protector (the guest has no %fs canary), no red zone (exceptions
# at CPL0 push their frame on the interrupted stack) and no CET notes. It is
# the guest environment (guest/), the selftests, the benchmarks and the
# demo's guest half, never the shipped libraries.
GUESTSAFE  := -fno-stack-protector -mno-red-zone -fcf-protection=none
# Guest code must not touch x87/SSE state: some hosts (PVM-based KVM, like
# our CI machines) cannot run guest FPU instructions and fail them with
# KVM_EXIT_INTERNAL_ERROR (emulation).
GUESTCODE  := -mgeneral-regs-only
# Code that runs in the guest, where there is no libc: keep the compiler
# from turning its loops into memset/memcpy calls.
FREESTANDING := -ffreestanding -fno-builtin -fno-tree-loop-distribute-patterns $(GUESTCODE)

# A distribution's flags (dpkg-buildflags: CPPFLAGS, CFLAGS, CXXFLAGS,
# LDFLAGS; debian/rules passes them) are added to what is built as host
# code only: the shared libraries and their objects, common/ in them, and
# virtkit-introspect. Never to guest code (the guest environment, the
# selftests, the benchmarks, the virtkit tool, which holds the demo's guest
# half), whose flags above are what makes it run in a guest.
EXTRA_CPPFLAGS ?=
EXTRA_CFLAGS   ?=
EXTRA_CXXFLAGS ?=
EXTRA_LDFLAGS  ?=

DEPFLAGS   := -MMD -MP
CPPFLAGS   := -Ilibvirtkit/include -Iuapi -Icommon
LIB_CPPFLAGS := $(CPPFLAGS) -Ilibvirtkit/src
GUEST_CPPFLAGS := $(CPPFLAGS) -Iguest/include
CXXFLAGS   := $(CXXSTD) $(WARN) $(OPT)
LIB_CXXFLAGS := $(CXXFLAGS) $(HARDEN) $(EXTRA_CXXFLAGS) $(VISIBILITY) -fvisibility-inlines-hidden -fPIC
GUEST_CXXFLAGS := $(CXXFLAGS) $(GUESTSAFE)
# Freestanding C shared with virtkit.ko (common/*.c), built into libvirtkit.
COMMON_CFLAGS := -std=gnu11 -ffreestanding -fno-builtin \
                 -fno-tree-loop-distribute-patterns $(WARN) $(OPT) $(HARDEN) $(EXTRA_CFLAGS) \
                 $(VISIBILITY) -fPIC

# libvirtkit: the VMM library (core, SPP, paging, the module client and the
# VMM end of KVMI) with the KVMI protocol module and common/.
LIB_DIRS   := core spp paging kmod kvmi/protocol kvmi/vmm
LIB_SRCS   := $(foreach d,$(LIB_DIRS),$(wildcard libvirtkit/src/$(d)/*.cpp))
COMMON_SRCS := $(wildcard common/*.c)
LIB_OBJS   := $(LIB_SRCS:%.cpp=$(BUILD)/%.o) $(COMMON_SRCS:%.c=$(BUILD)/%.o)
LIB_A      := $(BUILD)/lib/libvirtkit.a
LIB_SO     := $(BUILD)/lib/libvirtkit.so.$(VERSION)

# libvirtkit-introspect: the tool end of KVMI, the only library that uses
# liburing. The shared library links liburing.so (liburing's code is not
# built for CET, so it is not copied into ours); programs linked statically
# take liburing.a. The static archive leaves the protocol module to
# libvirtkit.a, which is linked after it; the shared one carries its own
# hidden copy.
INTROSPECT_LIB_SRCS := $(wildcard libvirtkit/src/kvmi/tool/*.cpp)
INTROSPECT_LIB_OBJS := $(INTROSPECT_LIB_SRCS:%.cpp=$(BUILD)/%.o)
KVMI_PROTOCOL_OBJS  := $(patsubst %.cpp,$(BUILD)/%.o,$(wildcard libvirtkit/src/kvmi/protocol/*.cpp))
INTROSPECT_A  := $(BUILD)/lib/libvirtkit-introspect.a
INTROSPECT_SO := $(BUILD)/lib/libvirtkit-introspect.so.$(VERSION)
URING_LIBS := -l:liburing.a

# The guest environment (x86::GuestVm, the guest runtime, page tables, the
# platform probes that run tiny guests): a static library built with the
# guest-code flags, for programs linked as non-PIE executables.
GUEST_SRCS := $(wildcard guest/src/*.cpp)
GUEST_ASM  := $(wildcard guest/src/*.S)
GUEST_OBJS := $(GUEST_SRCS:%.cpp=$(BUILD)/%.o) $(GUEST_ASM:%.S=$(BUILD)/%.o)
GUEST_A    := $(BUILD)/lib/libvirtkit-guest.a

ST_LIB_SRCS := $(wildcard selftests/lib/*.cpp)
ST_LIB_OBJS := $(ST_LIB_SRCS:%.cpp=$(BUILD)/%.o)
ST_SRCS    := $(wildcard selftests/x86/*.cpp)
ST_BINS    := $(ST_SRCS:selftests/x86/%.cpp=$(BUILD)/selftests/x86/%)
# Tests of virtkit.ko itself; they run where the module is loaded (vmtest).
KMOD_ST_SRCS := $(wildcard selftests/kmod/*.cpp)
KMOD_ST_BINS := $(KMOD_ST_SRCS:selftests/kmod/%.cpp=$(BUILD)/selftests/kmod/%)
# Introspection selftests: a guest and an in-process KVMI tool.
INTRO_ST_SRCS := $(wildcard selftests/introspection/*.cpp)
INTRO_ST_BINS := $(INTRO_ST_SRCS:selftests/introspection/%.cpp=$(BUILD)/selftests/introspection/%)

UNIT_SRCS  := $(wildcard selftests/unit/*.cpp)
UNIT_OBJS  := $(UNIT_SRCS:%.cpp=$(BUILD)/%.o)
UNIT_BIN   := $(BUILD)/selftests/unit/virtkit-unit

BENCH_SRCS := $(wildcard bench/*.cpp)
BENCH_BINS := $(BENCH_SRCS:bench/%.cpp=$(BUILD)/bench/%)

# tools/common: what both tools share (the kernel image reader).
TOOL_COMMON_SRCS := $(wildcard tools/common/*.cpp)
TOOL_COMMON_OBJS := $(TOOL_COMMON_SRCS:%.cpp=$(BUILD)/%.o)

TOOL_SRCS  := $(wildcard tools/virtkit/*.cpp tools/virtkit/run/*.cpp tools/virtkit/trace/*.cpp)
TOOL_OBJS  := $(TOOL_SRCS:%.cpp=$(BUILD)/%.o) $(TOOL_COMMON_OBJS)
TOOL_BIN   := $(BUILD)/bin/virtkit

INTROSPECT_SRCS := $(wildcard tools/virtkit-introspect/*.cpp)
INTROSPECT_OBJS := $(INTROSPECT_SRCS:%.cpp=$(BUILD)/%.o) $(TOOL_COMMON_OBJS)
INTROSPECT_BIN  := $(BUILD)/bin/virtkit-introspect

# Programs with guest code inside (selftests, benchmarks, the virtkit tool)
# link the guest environment, libvirtkit-introspect and libvirtkit
# statically, as non-PIE executables like the kernel's KVM selftests: guest
# code is loaded at the binary's own addresses.
GUEST_LINK := $(GUEST_A) $(INTROSPECT_A) $(LIB_A) $(URING_LIBS) -lpthread

.PHONY: all lib guest tool selftests unit run run-initramfs test check check-unit check-docs check-selftests \
        check-selftests-nested check-install check-deb deb deps install uninstall clean bench run-bench

all: lib guest tool selftests unit bench

lib: $(LIB_A) $(LIB_SO) $(INTROSPECT_A) $(INTROSPECT_SO)
guest: $(GUEST_A)
tool: $(TOOL_BIN) $(INTROSPECT_BIN)
selftests: $(ST_BINS) $(KMOD_ST_BINS) $(INTRO_ST_BINS)
unit: $(UNIT_BIN)
bench: $(BENCH_BINS)

# --- the shipped libraries: hardened, hidden visibility ---
$(BUILD)/libvirtkit/%.o: libvirtkit/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(LIB_CPPFLAGS) $(EXTRA_CPPFLAGS) $(DEPFLAGS) $(LIB_CXXFLAGS) -c $< -o $@

$(BUILD)/common/%.o: common/%.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(EXTRA_CPPFLAGS) $(DEPFLAGS) $(COMMON_CFLAGS) -c $< -o $@

$(LIB_A): $(LIB_OBJS)
	@mkdir -p $(@D)
	rm -f $@
	ar rcs $@ $^

$(LIB_SO): $(LIB_OBJS)
	@mkdir -p $(@D)
	$(CXX) -shared -Wl,-soname,libvirtkit.so.$(SOVERSION) $(SO_LDFLAGS) $(EXTRA_LDFLAGS) \
		-o $@ $(SO_CRTBEGIN) $^ -lpthread $(SO_CRTEND)
	ln -sf libvirtkit.so.$(VERSION) $(BUILD)/lib/libvirtkit.so.$(SOVERSION)
	ln -sf libvirtkit.so.$(SOVERSION) $(BUILD)/lib/libvirtkit.so

$(INTROSPECT_A): $(INTROSPECT_LIB_OBJS)
	@mkdir -p $(@D)
	rm -f $@
	ar rcs $@ $^

$(INTROSPECT_SO): $(INTROSPECT_LIB_OBJS) $(KVMI_PROTOCOL_OBJS) $(LIB_SO)
	@mkdir -p $(@D)
	$(CXX) -shared -Wl,-soname,libvirtkit-introspect.so.$(SOVERSION) $(SO_LDFLAGS) $(EXTRA_LDFLAGS) \
		-o $@ $(SO_CRTBEGIN) $(INTROSPECT_LIB_OBJS) $(KVMI_PROTOCOL_OBJS) \
		-L$(BUILD)/lib -lvirtkit -luring -lpthread $(SO_CRTEND)
	ln -sf libvirtkit-introspect.so.$(VERSION) $(BUILD)/lib/libvirtkit-introspect.so.$(SOVERSION)
	ln -sf libvirtkit-introspect.so.$(SOVERSION) $(BUILD)/lib/libvirtkit-introspect.so

# --- the guest environment: guest-code flags, static only ---
$(BUILD)/guest/%.o: guest/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_CPPFLAGS) -Ilibvirtkit/src $(DEPFLAGS) $(GUEST_CXXFLAGS) -fno-pie -c $< -o $@

$(BUILD)/guest/%.o: guest/%.S
	@mkdir -p $(@D)
	$(CXX) $(GUEST_CPPFLAGS) $(DEPFLAGS) -fno-pie -c $< -o $@

# The guest runtime and memcpy/memset run inside the guest.
$(BUILD)/guest/src/guest_runtime.o $(BUILD)/guest/src/string_override.o: GUEST_CXXFLAGS += $(FREESTANDING)

$(GUEST_A): $(GUEST_OBJS)
	@mkdir -p $(@D)
	rm -f $@
	ar rcs $@ $^

# --- programs with guest code: selftests, benchmarks ---
GUEST_PROG_FLAGS = $(GUEST_CPPFLAGS) -Iselftests/lib $(DEPFLAGS) $(GUEST_CXXFLAGS) $(GUESTCODE) -fno-pie

$(BUILD)/selftests/x86/%.o: selftests/x86/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_PROG_FLAGS) -c $< -o $@

$(BUILD)/selftests/kmod/%.o: selftests/kmod/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_PROG_FLAGS) -c $< -o $@

$(BUILD)/selftests/introspection/%.o: selftests/introspection/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_PROG_FLAGS) -Ilibvirtkit/src -c $< -o $@

$(BUILD)/selftests/lib/%.o: selftests/lib/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_CPPFLAGS) -Iselftests/lib $(DEPFLAGS) $(GUEST_CXXFLAGS) -fno-pie -c $< -o $@

$(BUILD)/selftests/x86/%: $(BUILD)/selftests/x86/%.o $(ST_LIB_OBJS) $(GUEST_A) $(INTROSPECT_A) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $< $(ST_LIB_OBJS) $(GUEST_LINK)

$(BUILD)/selftests/kmod/%: $(BUILD)/selftests/kmod/%.o $(ST_LIB_OBJS) $(GUEST_A) $(INTROSPECT_A) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $< $(ST_LIB_OBJS) $(GUEST_LINK)

$(BUILD)/selftests/introspection/%: $(BUILD)/selftests/introspection/%.o $(ST_LIB_OBJS) $(GUEST_A) $(INTROSPECT_A) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $< $(ST_LIB_OBJS) $(GUEST_LINK)

# Benchmarks are built like the selftests, without the test harness: each is
# a plain program printing figures.
$(BUILD)/bench/%.o: bench/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_CPPFLAGS) $(DEPFLAGS) $(GUEST_CXXFLAGS) $(GUESTCODE) -fno-pie -c $< -o $@

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(GUEST_A) $(INTROSPECT_A) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $< $(GUEST_LINK)

# Unit tests reach library internals (-Ilibvirtkit/src) and need no KVM.
$(BUILD)/selftests/unit/%.o: selftests/unit/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_CPPFLAGS) -Ilibvirtkit/src -Iguest/src $(DEPFLAGS) $(CXXFLAGS) -fno-pie -c $< -o $@

$(UNIT_BIN): $(UNIT_OBJS) $(GUEST_A) $(INTROSPECT_A) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $(UNIT_OBJS) $(GUEST_LINK)

# --- tools ---
# virtkit runs guests (the demo, the platform probes): linked like the
# selftests; only the demo's guest half is guest code.
$(BUILD)/tools/virtkit/%.o: tools/virtkit/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_CPPFLAGS) $(DEPFLAGS) $(GUEST_CXXFLAGS) -fno-pie -c $< -o $@

$(BUILD)/tools/virtkit/demo_guest.o: GUEST_CXXFLAGS += $(FREESTANDING)

# virtkit trace: the BPF programs (CO-RE, no vmlinux.h: trace.bpf.c
# declares the tracepoint records it reads) built by clang for the BPF
# target, embedded in the tool as a bpftool skeleton. The skeleton header
# is generated in $(BUILD); trace.cpp includes it.
BPF_CLANG  ?= clang
BPFTOOL    ?= bpftool
BPF_CFLAGS := -target bpf -g -O2 -Wall -Werror -D__bpf__ \
              -I/usr/include/$(shell $(CC) -dumpmachine)
TRACE_SKEL := $(BUILD)/tools/virtkit/trace/trace.skel.h

$(BUILD)/tools/virtkit/trace/trace.bpf.o: tools/virtkit/trace/trace.bpf.c tools/virtkit/trace/trace_abi.h
	@mkdir -p $(@D)
	$(BPF_CLANG) $(BPF_CFLAGS) -c $< -o $@

$(TRACE_SKEL): $(BUILD)/tools/virtkit/trace/trace.bpf.o
	$(BPFTOOL) gen skeleton $< name trace_bpf > $@.tmp
	mv $@.tmp $@

$(BUILD)/tools/virtkit/trace/trace.o: $(TRACE_SKEL)
$(BUILD)/tools/virtkit/trace/trace.o: GUEST_CPPFLAGS += -I$(BUILD)/tools/virtkit/trace

# virtkit run decompresses xz and zstd kernels with liblzma and libzstd,
# virtkit trace loads its BPF programs with libbpf (with libelf): all
# static, like liburing; zlib (libelf's) is the system's shared library,
# as Debian's policy asks of it (lintian: embedded-library). Full RELRO (BIND_NOW) changes nothing guest
# code sees: it never calls through the PLT, and the GOT was in the RELRO
# segment already; not EXTRA_LDFLAGS, which could ask for a PIE.
$(TOOL_BIN): $(TOOL_OBJS) $(GUEST_A) $(INTROSPECT_A) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie $(HARDEN_LDFLAGS) -o $@ $(TOOL_OBJS) $(GUEST_LINK) \
		-l:libbpf.a -l:libelf.a -l:liblzma.a -l:libzstd.a -lz

# virtkit-introspect runs no guest: a hardened PIE like any host program,
# and so is what the tools share. It reads kernel images (--processes):
# liblzma and libzstd for the kernel image, static like liburing.
HOST_TOOL_CXX = $(CXX) $(CPPFLAGS) $(EXTRA_CPPFLAGS) $(DEPFLAGS) $(CXXFLAGS) $(HARDEN) \
		$(EXTRA_CXXFLAGS) -fPIE -c $< -o $@
$(BUILD)/tools/virtkit-introspect/%.o: tools/virtkit-introspect/%.cpp
	@mkdir -p $(@D)
	$(HOST_TOOL_CXX)
$(BUILD)/tools/common/%.o: tools/common/%.cpp
	@mkdir -p $(@D)
	$(HOST_TOOL_CXX)

$(INTROSPECT_BIN): $(INTROSPECT_OBJS) $(INTROSPECT_A) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -pie $(HARDEN_LDFLAGS) $(EXTRA_LDFLAGS) -o $@ $(INTROSPECT_OBJS) $(INTROSPECT_A) $(LIB_A) \
		$(URING_LIBS) -l:liblzma.a -l:libzstd.a -lpthread

deps:
	scripts/install-deps

# The busybox initramfs `virtkit run` boots in its selftest and docs
# (Documentation/virtkit-run.rst).
RUN_INITRAMFS := $(BUILD)/virtkit-run/initramfs.cpio
run-initramfs: $(RUN_INITRAMFS)
$(RUN_INITRAMFS): scripts/run-initramfs scripts/lib/initramfs.sh scripts/lib/run-init
	scripts/run-initramfs $@

# What `make run` runs, with the tools in PATH: virtkit info and virtkit
# demo, then the example introspection tool against a second demo: the tool
# listens in the background (its output goes to a file, shown afterwards),
# the demo's VM connects to it with --introspect, both given the secret in a
# file only they can read (never on a command line, which every user sees in
# /proc). Fails if any of them fails.
RUN_DEMO = echo "virtkit info && virtkit demo"; virtkit info && virtkit demo || exit 1; \
	d=$$(mktemp -d) || exit 1; \
	(umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n" >$$d/secret) || exit 1; \
	echo; echo "virtkit-introspect --listen unix:$$d/tool.sock --secret-file $$d/secret --msr 0xc0000102 --count 100 --timeout 300 &"; \
	echo "virtkit demo --introspect unix:$$d/tool.sock --secret-file $$d/secret"; \
	virtkit-introspect --listen unix:$$d/tool.sock --secret-file $$d/secret --msr 0xc0000102 --count 100 --timeout 300 >$$d/tool.log 2>&1 & \
	tool=$$!; \
	virtkit demo --introspect unix:$$d/tool.sock --secret-file $$d/secret; demo=$$?; \
	wait $$tool; rc=$$?; \
	echo; echo "virtkit-introspect printed (exit status $$rc):"; cat $$d/tool.log; rm -rf $$d; \
	[ $$demo = 0 ] && [ $$rc = 0 ]

# `virtkit info` decides whether this host's /dev/kvm is usable (it opens and
# a VM can be created); without it, everything runs on nested KVM in a
# Debian kernel booted under QEMU TCG, in one boot.
#
# Then Linux on libvirtkit (scripts/run-linux-demo: virtkit run boots
# Debian's 6.1 kernel with --protect and --introspect, virtkit-introspect
# lists its processes): on this host's /dev/kvm when its KVM runs guest user
# space; else (no /dev/kvm, or kvm_pvm, which cannot) in a Debian 6.1 guest
# under QEMU -cpu $(NESTED_CPU) with virtkit.ko loaded, so that the
# protection uses the module's SPP backend. There a boot whose console is
# silent for 45 s (QEMU TCG's nested stall, about 1 boot in 6) is started
# again, at most twice, each retry reported.
run: deps
	$(MAKE) tool run-initramfs
	@if $(TOOL_BIN) info >/dev/null 2>&1; then \
		PATH=$(abspath $(BUILD))/bin:$$PATH sh -c '$(RUN_DEMO)' || exit 1; \
	else \
		echo "this host has no usable /dev/kvm: running the demo on nested KVM in a Debian guest under QEMU, with virtkit.ko loaded"; \
		ko=$$(scripts/build-kmod --kernel 6.1 --out $(KMOD_OUT)) || exit 1; \
		echo "scripts/vmtest --module $$ko --copy $(TOOL_BIN) --copy $(INTROSPECT_BIN) -- sh -c '...'"; \
		scripts/vmtest --module $$ko --copy $(TOOL_BIN) --copy $(INTROSPECT_BIN) -- sh -c '$(RUN_DEMO)' || exit 1; \
	fi; \
	echo; \
	if $(TOOL_BIN) info >/dev/null 2>&1 && [ ! -d /sys/module/kvm_pvm ]; then \
		echo "Linux on libvirtkit, on this host's /dev/kvm:"; \
		kernel=$$(scripts/vmtest --kernel 6.1 --print-kernel) || exit 1; \
		echo "scripts/run-linux-demo $(TOOL_BIN) $(INTROSPECT_BIN) $$kernel $(RUN_INITRAMFS)"; \
		scripts/run-linux-demo $(TOOL_BIN) $(INTROSPECT_BIN) $$kernel $(RUN_INITRAMFS); \
	else \
		echo "Linux on libvirtkit, on nested KVM in a Debian 6.1 guest under QEMU -cpu $(NESTED_CPU), with virtkit.ko loaded" \
		     "(this host has no /dev/kvm, or one whose KVM cannot run guest user space: kvm_pvm)"; \
		ko=$$(scripts/build-kmod --kernel 6.1 --out $(KMOD_OUT)) || exit 1; \
		set -- --kernel 6.1 --cpu $(NESTED_CPU) --module $$ko --copy-kernel --copy $(TOOL_BIN) \
			--copy $(INTROSPECT_BIN) --copy $(RUN_INITRAMFS) --copy scripts/run-linux-demo; \
		set -- "$$@" -- env VIRTKIT_RUN_STALL_RETRIES=3 VIRTKIT_RUN_STALL_SECONDS=45 \
			./run-linux-demo ./virtkit ./virtkit-introspect ./vmlinuz ./initramfs.cpio; \
		echo "scripts/vmtest $$*"; \
		scripts/vmtest "$$@"; \
	fi

# Without a usable /dev/kvm (the test scripts/run-selftests makes), each
# benchmark runs on nested KVM in a Debian guest under QEMU, one boot each.
# Each benchmark's output is kept in $(BUILD)/bench/<name>.out; its "goal:"
# lines (the goals of issue 19) end the run as one table.
# Where the host has /dev/kvm but no virtkit.ko, the kmod backend's figures
# (spp_bench sections g and h) come from nested KVM under QEMU, and their
# goal lines say so.
SPP_BENCH := $(BUILD)/bench/spp_bench
run-bench: $(BENCH_BINS)
	@rm -f $(SPP_BENCH).kmod.out; \
	if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then \
		for b in $(BENCH_BINS); do echo "$$b"; \
			{ $$b; echo $$? > $$b.rc; } | tee $$b.out; \
			[ "$$(cat $$b.rc)" = 0 ] || exit 1; \
		done; \
		if [ ! -e /dev/virtkit ]; then \
			echo "no /dev/virtkit here: the kmod backend on nested KVM in a Debian guest under QEMU, with virtkit.ko loaded"; \
			ko=$$(scripts/build-kmod --kernel 6.1 --out $(KMOD_OUT)) || exit 1; \
			echo "scripts/vmtest --module $$ko --copy $(SPP_BENCH) -- spp_bench gh"; \
			{ scripts/vmtest --module $$ko --copy $(SPP_BENCH) -- spp_bench gh; \
			  echo $$? > $(SPP_BENCH).rc; } | tee $(SPP_BENCH).kmod.out; \
			[ "$$(cat $(SPP_BENCH).rc)" = 0 ] || exit 1; \
		fi; \
	else \
		echo "this host has no usable /dev/kvm: running the benchmarks on nested KVM in a Debian guest under QEMU, with virtkit.ko loaded"; \
		ko=$$(scripts/build-kmod --kernel 6.1 --out $(KMOD_OUT)) || exit 1; \
		for b in $(BENCH_BINS); do \
			echo "scripts/vmtest --module $$ko --copy $$b -- $$(basename $$b)"; \
			{ scripts/vmtest --module $$ko --copy $$b -- $$(basename $$b); \
			  echo $$? > $$b.rc; } | tee $$b.out; \
			[ "$$(cat $$b.rc)" = 0 ] || exit 1; \
		done; \
	fi; \
	echo; echo "goals (issue 19): goal | measured | verdict"; \
	for b in $(BENCH_BINS); do \
		if [ -e $$b.kmod.out ]; then \
			grep -h '^goal: ' $$b.out | grep -v 'kmod backend' | sed 's/^goal: /  /'; \
			grep -h '^goal: .*kmod backend' $$b.kmod.out | \
				sed 's/^goal: /  /; s/$$/ (nested KVM under QEMU TCG)/'; \
		else \
			grep -h '^goal: ' $$b.out | sed 's/^goal: /  /'; \
		fi; \
	done

# Every suite runs, also after one failed; scripts/check-suites streams each
# one's output, then prints one table (target, suite, platform, pass, fail,
# skip) and every skip with its reason, and fails if anything failed.
CHECK_SUITES := check-unit check-docs check-selftests check-selftests-nested check-page-walk \
                check-kmod check-dkms check-install check-deb

# The build runs on every CPU (CHECK_JOBS, default nproc); the suites one
# after another (they share scripts/vmtest's directory and QEMU).
CHECK_JOBS ?= $(shell nproc)
check: deps
	$(MAKE) -j$(CHECK_JOBS) all
	MAKE="$(MAKE)" scripts/check-suites $(CHECK_SUITES)

check-unit: $(UNIT_BIN)
	$(UNIT_BIN)

# Every C and C++ code block of Documentation/ and README.md compiles (and
# links, with main()).
check-docs: lib
	scripts/check-doc-examples $(BUILD)

# Needs nothing check's `deps` installs beyond the build's own packages.
test: $(UNIT_BIN)
	$(UNIT_BIN) -r ktap

# The x86 and introspection suites on this host's /dev/kvm where it is
# usable, else on nested KVM under QEMU -cpu max (scripts/run-selftests
# decides); both run even when the first fails.
check-selftests: $(ST_BINS) $(KMOD_ST_BINS) $(INTRO_ST_BINS) $(TOOL_BIN) $(INTROSPECT_BIN) $(RUN_INITRAMFS)
	@rc=0; \
	echo "scripts/run-selftests $(BUILD)/selftests/x86"; \
	scripts/run-selftests $(BUILD)/selftests/x86 || rc=1; \
	echo "scripts/run-selftests $(BUILD)/selftests/introspection"; \
	scripts/run-selftests $(BUILD)/selftests/introspection || rc=1; \
	exit $$rc

# The same suites on nested KVM under a second, narrower CPU model, so every
# run sees two platforms even without a usable /dev/kvm: Opteron_G3 has no
# Page1GB, LA57, PKU, PKS, SMEP, SMAP nor NPT (nested KVM shadows the guest's
# page tables). NESTED_CPU picks another model (scripts/vmtest adds +svm).
# Then the Linux guest once more in a Debian 6.12 guest with virtkit.ko
# loaded: Debian's 6.12 kernel as L1 and L2 (zstd-compressed), and `virtkit
# run --protect` on the module's SPP backend (check-kmod's guests, under
# -cpu max, do not boot Linux).
NESTED_CPU ?= Opteron_G3
check-selftests-nested: $(ST_BINS) $(INTRO_ST_BINS) $(TOOL_BIN) $(INTROSPECT_BIN) $(RUN_INITRAMFS)
	@rc=0; \
	echo "scripts/run-selftests --nested $(BUILD)/selftests/x86 (VIRTKIT_VMTEST_CPU=$(NESTED_CPU))"; \
	VIRTKIT_VMTEST_CPU=$(NESTED_CPU) scripts/run-selftests --nested $(BUILD)/selftests/x86 || rc=1; \
	echo "scripts/run-selftests --nested $(BUILD)/selftests/introspection (VIRTKIT_VMTEST_CPU=$(NESTED_CPU))"; \
	VIRTKIT_VMTEST_CPU=$(NESTED_CPU) scripts/run-selftests --nested $(BUILD)/selftests/introspection || rc=1; \
	if ko=$$(scripts/build-kmod --kernel 6.12 --out $(KMOD_OUT)); then \
		echo "scripts/run-selftests --nested --module $$ko $(BUILD)/selftests/x86 linux_boot" \
		     "(VIRTKIT_VMTEST_KERNEL=6.12 VIRTKIT_VMTEST_CPU=$(NESTED_CPU) VIRTKIT_SPP_BACKEND=kmod" \
		     "VIRTKIT_SELFTESTS_SUITE=linux_boot-kmod)"; \
		VIRTKIT_VMTEST_KERNEL=6.12 VIRTKIT_VMTEST_CPU=$(NESTED_CPU) VIRTKIT_SPP_BACKEND=kmod \
			VIRTKIT_SELFTESTS_SUITE=linux_boot-kmod \
			scripts/run-selftests --nested --module $$ko $(BUILD)/selftests/x86 linux_boot || rc=1; \
	else rc=1; fi; \
	exit $$rc

check-install: lib $(RUN_INITRAMFS)
	scripts/check-install $(BUILD)

# The Debian packages, built in a copy of this tree (scripts/build-deb).
DEB_DIR := $(BUILD)/deb
deb:
	scripts/build-deb $(DEB_DIR)

# Build the packages (from the objects `make all` built, see
# Documentation/building.rst) and test what they install: unpacked into a
# scratch root with dpkg -x, the consumers built against it and run, the
# tools, the DKMS package's files, lintian.
check-deb: lib tool
	scripts/check-deb $(BUILD)

include mk/install.mk
include mk/kmod.mk
include mk/page_walk.mk
include mk/sanitize.mk

clean:
	rm -rf $(BUILD)

.SECONDARY:

# Dependency files of our objects only: build/ also caches unpacked kernels
# and the Debian 13 build root, whose trees have their own *.d names.
-include $(shell find $(addprefix $(BUILD)/,common libvirtkit guest selftests tools bench) \
	-name '*.d' -type f 2>/dev/null)
