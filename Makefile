# virtkit front door.
#
#   make            build everything userspace (library, tool, selftests, unit tests)
#   make run        install missing Debian packages, build, run `virtkit info`,
#                   `virtkit demo` and the example introspection tool against a
#                   second demo (in a QEMU guest with virtkit.ko loaded when
#                   /dev/kvm is not usable)
#   make check      install missing Debian packages, build, run every test suite
#                   (each one, also after one failed; one table at the end):
#                   unit tests, selftests (on this host's /dev/kvm where usable,
#                   and on nested KVM under a second, narrower CPU model), the
#                   page-walk oracle (QEMU TCG, two CPU models),
#                   virtkit.ko's build and tests in Debian's
#                   6.1, 6.12 and newest 7.x kernels (QEMU), its DKMS build,
#                   the install check
#   make bench      build the benchmarks (bench/*.cpp; built by all, not run by check)
#   make run-bench  build and run them (in a QEMU guest when /dev/kvm is not usable)
#   make install    install headers, libraries, pkg-config and CMake files (PREFIX, DESTDIR)
#   make kmod       build the kernel module virtkit.ko for Debian's 6.1, 6.12 and 7.x kernels
#   make check-kmod, check-dkms, dkms-install, dkms-uninstall: see mk/kmod.mk
#
# Everything is built out of tree in $(BUILD).

BUILD      ?= build
PREFIX     ?= /usr/local
DESTDIR    ?=
VERSION    := 0.1.0
SOVERSION  := 0

CXX        ?= g++
CXXSTD     := -std=c++20
WARN       := -Wall -Wextra -Werror
OPT        ?= -O2 -g
# Guest code runs from the executable's own pages at their host addresses:
# no stack protector (the guest has no %fs canary), no red zone (exceptions
# at CPL0 push their frame on the interrupted stack) and no CET notes.
GUESTSAFE  := -fno-stack-protector -mno-red-zone -fcf-protection=none
CPPFLAGS   := -Ilibvirtkit/include -Iuapi -Icommon -MMD -MP
CXXFLAGS   := $(CXXSTD) $(WARN) $(OPT) $(GUESTSAFE)

LIB_SRCS   := $(wildcard libvirtkit/src/*.cpp libvirtkit/src/x86/*.cpp libvirtkit/src/introspection/*.cpp libvirtkit/src/introspect/*.cpp)
LIB_ASM    := $(wildcard libvirtkit/src/x86/*.S)
# Freestanding C shared with virtkit.ko (common/*.c), built into the library.
COMMON_SRCS := $(wildcard common/*.c)
COMMON_CFLAGS := -std=gnu11 -ffreestanding -fno-builtin \
                 -fno-tree-loop-distribute-patterns $(WARN) $(OPT)
LIB_OBJS   := $(LIB_SRCS:%.cpp=$(BUILD)/%.o) $(LIB_ASM:%.S=$(BUILD)/%.o) \
              $(COMMON_SRCS:%.c=$(BUILD)/%.o)
LIB_A      := $(BUILD)/lib/libvirtkit.a
LIB_SO     := $(BUILD)/lib/libvirtkit.so.$(VERSION)

ST_LIB_SRCS := $(wildcard selftests/lib/*.cpp)
ST_LIB_OBJS := $(ST_LIB_SRCS:%.cpp=$(BUILD)/%.o)
ST_SRCS    := $(wildcard selftests/x86/*.cpp)
ST_BINS    := $(ST_SRCS:selftests/x86/%.cpp=$(BUILD)/selftests/x86/%)
# Tests of virtkit.ko itself; they run where the module is loaded (vmtest).
KMOD_ST_SRCS := $(wildcard selftests/kmod/*.cpp)
KMOD_ST_BINS := $(KMOD_ST_SRCS:selftests/kmod/%.cpp=$(BUILD)/selftests/kmod/%)
# --- introspection selftests (issue 5): guest + in-process KVMI tool ---
INTRO_ST_SRCS := $(wildcard selftests/introspection/*.cpp)
INTRO_ST_BINS := $(INTRO_ST_SRCS:selftests/introspection/%.cpp=$(BUILD)/selftests/introspection/%)
# --- end introspection selftests ---

UNIT_SRCS  := $(wildcard selftests/unit/*.cpp)
UNIT_OBJS  := $(UNIT_SRCS:%.cpp=$(BUILD)/%.o)
UNIT_BIN   := $(BUILD)/selftests/unit/virtkit-unit

BENCH_SRCS := $(wildcard bench/*.cpp)
BENCH_BINS := $(BENCH_SRCS:bench/%.cpp=$(BUILD)/bench/%)

TOOL_SRCS  := $(wildcard tools/virtkit/*.cpp)
TOOL_OBJS  := $(TOOL_SRCS:%.cpp=$(BUILD)/%.o)
TOOL_BIN   := $(BUILD)/bin/virtkit

# --- example introspection tool (issue 5, virtkit::introspect) ---
INTROSPECT_SRCS := $(wildcard tools/virtkit-introspect/*.cpp)
INTROSPECT_OBJS := $(INTROSPECT_SRCS:%.cpp=$(BUILD)/%.o)
INTROSPECT_BIN  := $(BUILD)/bin/virtkit-introspect

# liburing (virtkit::introspect's EventLoop) is linked in statically: neither
# the library nor its programs need liburing at run time, and the shared
# library keeps liburing's symbols to itself (--exclude-libs).
URING_LIBS := -l:liburing.a
LDLIBS     := $(URING_LIBS) -lpthread

.PHONY: all lib tool selftests unit run check check-unit check-selftests check-selftests-nested \
        check-install deps install uninstall clean bench run-bench

all: lib tool selftests unit bench

lib: $(LIB_A) $(LIB_SO)
tool: $(TOOL_BIN) $(INTROSPECT_BIN)
selftests: $(ST_BINS) $(KMOD_ST_BINS) $(INTRO_ST_BINS)
unit: $(UNIT_BIN)
bench: $(BENCH_BINS)

$(BUILD)/%.o: %.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) $(CXXFLAGS) -fPIC -c $< -o $@

$(BUILD)/%.o: %.S
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) -fPIC -c $< -o $@

$(BUILD)/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(COMMON_CFLAGS) -fPIC -c $< -o $@

# The guest runtime runs inside the guest, where there is no libc: keep the
# compiler from turning its loops into memset/memcpy calls.
$(BUILD)/libvirtkit/src/x86/guest_runtime.o: CXXFLAGS += -ffreestanding -fno-builtin -fno-tree-loop-distribute-patterns -mgeneral-regs-only

$(BUILD)/selftests/lib/string_override.o: CXXFLAGS += -ffreestanding -fno-builtin -fno-tree-loop-distribute-patterns -mgeneral-regs-only

$(LIB_A): $(LIB_OBJS)
	@mkdir -p $(@D)
	rm -f $@
	ar rcs $@ $^

$(LIB_SO): $(LIB_OBJS)
	@mkdir -p $(@D)
	$(CXX) -shared -Wl,-soname,libvirtkit.so.$(SOVERSION) -Wl,--exclude-libs,liburing.a \
		-o $@ $^ $(LDLIBS)
	ln -sf libvirtkit.so.$(VERSION) $(BUILD)/lib/libvirtkit.so.$(SOVERSION)
	ln -sf libvirtkit.so.$(SOVERSION) $(BUILD)/lib/libvirtkit.so

# Selftests link the library statically and as non-PIE executables, like the
# kernel's KVM selftests: guest code is loaded at the binary's own addresses.
$(BUILD)/selftests/x86/%: $(BUILD)/selftests/x86/%.o $(ST_LIB_OBJS) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $< $(ST_LIB_OBJS) $(LIB_A) $(LDLIBS)

$(BUILD)/selftests/kmod/%: $(BUILD)/selftests/kmod/%.o $(ST_LIB_OBJS) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $< $(ST_LIB_OBJS) $(LIB_A) $(LDLIBS)

# --- introspection selftests: linked like the x86 ones (LDLIBS has liburing for the tool side) ---
$(BUILD)/selftests/introspection/%: $(BUILD)/selftests/introspection/%.o $(ST_LIB_OBJS) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $< $(ST_LIB_OBJS) $(LIB_A) $(LDLIBS)

# Test sources hold guest code, which must not touch x87/SSE state: some
# hosts (PVM-based KVM, like our CI machines) cannot run guest FPU
# instructions and fail them with KVM_EXIT_INTERNAL_ERROR (emulation).
GUESTCODE := -mgeneral-regs-only

$(BUILD)/selftests/x86/%.o: selftests/x86/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) -Iselftests/lib $(CXXFLAGS) $(GUESTCODE) -fno-pie -c $< -o $@

$(BUILD)/selftests/kmod/%.o: selftests/kmod/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) -Iselftests/lib $(CXXFLAGS) $(GUESTCODE) -fno-pie -c $< -o $@

# --- introspection selftests: guest code inside, built like the x86 ones ---
$(BUILD)/selftests/introspection/%.o: selftests/introspection/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) -Iselftests/lib $(CXXFLAGS) $(GUESTCODE) -fno-pie -c $< -o $@

$(BUILD)/selftests/lib/%.o: selftests/lib/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) -Iselftests/lib $(CXXFLAGS) -fno-pie -c $< -o $@

# Benchmarks are built like the selftests (guest code inside, static non-PIE
# link), without the test harness: each is a plain program printing figures.
$(BUILD)/bench/%: $(BUILD)/bench/%.o $(BUILD)/selftests/lib/string_override.o $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $< $(BUILD)/selftests/lib/string_override.o $(LIB_A) $(LDLIBS)

$(BUILD)/bench/%.o: bench/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) $(CXXFLAGS) $(GUESTCODE) -fno-pie -c $< -o $@

$(BUILD)/selftests/unit/%.o: selftests/unit/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) -Ilibvirtkit/src $(CXXFLAGS) -c $< -o $@

$(UNIT_BIN): $(UNIT_OBJS) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -o $@ $(UNIT_OBJS) $(LIB_A) $(LDLIBS)

$(TOOL_BIN): $(TOOL_OBJS) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $(TOOL_OBJS) $(LIB_A) $(LDLIBS)

$(INTROSPECT_BIN): $(INTROSPECT_OBJS) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $(INTROSPECT_OBJS) $(LIB_A) $(LDLIBS)

$(BUILD)/tools/%.o: tools/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(CPPFLAGS) $(CXXFLAGS) -fno-pie -c $< -o $@

# The demo's guest code runs in the guest, where there is no libc and (on some
# hosts) no usable FPU; the host side of the tool uses both, so only this file
# is guest code.
$(BUILD)/tools/virtkit/demo_guest.o: CXXFLAGS += -ffreestanding -fno-builtin -fno-tree-loop-distribute-patterns $(GUESTCODE)

deps:
	scripts/install-deps

# What `make run` runs, with the tools in PATH: virtkit info and virtkit
# demo, then the example introspection tool against a second demo: the tool
# listens in the background (its output goes to a file, shown afterwards),
# the demo's VM connects to it with --introspect. Fails if any of them fails.
RUN_DEMO = echo "virtkit info && virtkit demo"; virtkit info && virtkit demo || exit 1; \
	d=$$(mktemp -d) || exit 1; \
	s=$$(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"); \
	echo; echo "virtkit-introspect --listen unix:$$d/tool.sock --secret $$s --msr 0xc0000102 --count 10 --timeout 60 &"; \
	echo "virtkit demo --introspect unix:$$d/tool.sock --secret $$s"; \
	virtkit-introspect --listen unix:$$d/tool.sock --secret $$s --msr 0xc0000102 --count 10 --timeout 60 >$$d/tool.log 2>&1 & \
	tool=$$!; \
	virtkit demo --introspect unix:$$d/tool.sock --secret $$s; demo=$$?; \
	wait $$tool; rc=$$?; \
	echo; echo "virtkit-introspect printed (exit status $$rc):"; cat $$d/tool.log; rm -rf $$d; \
	[ $$demo = 0 ] && [ $$rc = 0 ]

# `virtkit info` decides whether this host's /dev/kvm is usable (it opens and
# a VM can be created); without it, everything runs on nested KVM in a
# Debian kernel booted under QEMU TCG, in one boot.
run: deps
	$(MAKE) tool
	@if $(TOOL_BIN) info >/dev/null 2>&1; then \
		PATH=$(abspath $(BUILD))/bin:$$PATH sh -c '$(RUN_DEMO)'; \
	else \
		echo "this host has no usable /dev/kvm: running the demo on nested KVM in a Debian guest under QEMU, with virtkit.ko loaded"; \
		ko=$$(scripts/build-kmod --kernel 6.1 --out $(KMOD_OUT)) || exit 1; \
		echo "scripts/vmtest --module $$ko --copy $(TOOL_BIN) --copy $(INTROSPECT_BIN) -- sh -c '...'"; \
		scripts/vmtest --module $$ko --copy $(TOOL_BIN) --copy $(INTROSPECT_BIN) -- sh -c '$(RUN_DEMO)'; \
	fi

# Without a usable /dev/kvm (the test scripts/run-selftests makes), each
# benchmark runs on nested KVM in a Debian guest under QEMU, one boot each.
run-bench: $(BENCH_BINS)
	@if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then \
		for b in $(BENCH_BINS); do echo "$$b"; $$b || exit 1; done; \
	else \
		echo "this host has no usable /dev/kvm: running the benchmarks on nested KVM in a Debian guest under QEMU, with virtkit.ko loaded"; \
		ko=$$(scripts/build-kmod --kernel 6.1 --out $(KMOD_OUT)) || exit 1; \
		for b in $(BENCH_BINS); do \
			echo "scripts/vmtest --module $$ko --copy $$b -- $$(basename $$b)"; \
			scripts/vmtest --module $$ko --copy $$b -- $$(basename $$b) || exit 1; \
		done; \
	fi

# Every suite runs, also after one failed; scripts/check-suites streams each
# one's output, then prints one table (target, suite, platform, pass, fail,
# skip) and every skip with its reason, and fails if anything failed.
CHECK_SUITES := check-unit check-selftests check-selftests-nested check-page-walk \
                check-kmod check-dkms check-install

check: deps
	$(MAKE) all
	MAKE="$(MAKE)" scripts/check-suites $(CHECK_SUITES)

check-unit: $(UNIT_BIN)
	$(UNIT_BIN)

# The x86 and introspection suites on this host's /dev/kvm where it is
# usable, else on nested KVM under QEMU -cpu max (scripts/run-selftests
# decides); both run even when the first fails.
check-selftests: $(ST_BINS) $(KMOD_ST_BINS) $(INTRO_ST_BINS)
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
NESTED_CPU ?= Opteron_G3
check-selftests-nested: $(ST_BINS) $(INTRO_ST_BINS)
	@rc=0; \
	echo "scripts/run-selftests --nested $(BUILD)/selftests/x86 (VIRTKIT_VMTEST_CPU=$(NESTED_CPU))"; \
	VIRTKIT_VMTEST_CPU=$(NESTED_CPU) scripts/run-selftests --nested $(BUILD)/selftests/x86 || rc=1; \
	echo "scripts/run-selftests --nested $(BUILD)/selftests/introspection (VIRTKIT_VMTEST_CPU=$(NESTED_CPU))"; \
	VIRTKIT_VMTEST_CPU=$(NESTED_CPU) scripts/run-selftests --nested $(BUILD)/selftests/introspection || rc=1; \
	exit $$rc

check-install: lib
	scripts/check-install $(BUILD)

include mk/install.mk
include mk/kmod.mk
include mk/page_walk.mk

clean:
	rm -rf $(BUILD)

.SECONDARY:

# Dependency files of our objects only: build/ also caches unpacked kernels
# and the Debian 13 build root, whose trees have their own *.d names.
-include $(shell find $(addprefix $(BUILD)/,common libvirtkit selftests tools bench) \
	-name '*.d' -type f 2>/dev/null)
