# Sanitizer builds, included by the top-level Makefile.
#
#   make check-asan   AddressSanitizer + UndefinedBehaviorSanitizer, in $(ASAN_BUILD)
#   make check-tsan   ThreadSanitizer, in $(TSAN_BUILD)
#
# Each re-runs make with BUILD set to its own tree and SANITIZE to the
# sanitizer list, builds the instrumented programs there and runs the unit
# tests and, on this host's /dev/kvm, the x86 and introspection selftest
# suites and what `make run` runs (virtkit info, virtkit demo,
# virtkit-introspect against a second demo). Without a usable /dev/kvm the
# selftests would have to run on nested KVM under QEMU TCG
# (scripts/run-selftests), which already takes most of make check's time
# for the plain build; the sanitizers' slowdown on top does not fit, so
# there only the unit tests are built and run (the rest is one skip).
#
# What is instrumented (SANITIZE set): every host-side object that can be
# built with the sanitizer without it reaching guest code -
#   libvirtkit and libvirtkit-introspect (libvirtkit/src/**, common/*.c),
#   the unit tests (selftests/unit), the selftest harness (selftests/lib),
#   the selftests without guest functions (x86/vm_lifecycle,
#   x86/page_walk_host), virtkit-introspect, and the virtkit tool except its
#   guest half (tools/virtkit/demo_guest.cpp).
# Not instrumented: the guest environment (guest/: it is guest code, or host
# code built with the guest-code flags alongside it), and the selftests' and
# benchmarks' own translation units, which hold host test code and guest
# functions side by side: ASan's shadow checks and TSan's calls into its
# runtime would run inside the guest, where neither the shadow memory nor the
# runtime exist. Their host code still runs on the instrumented libraries and
# under the sanitizer runtime (interceptors for malloc, free, memcpy,
# pthread_*, and leak detection at exit).

ASAN_BUILD ?= $(BUILD)/asan
TSAN_BUILD ?= $(BUILD)/tsan

SANITIZE ?=

ifneq ($(SANITIZE),)
SAN_FLAGS := -fsanitize=$(SANITIZE) -fno-omit-frame-pointer
# GCC 12's -Wmaybe-uninitialized sees the sanitizers' instrumentation and
# warns falsely (in <regex>, through catch.hpp); it stays on in the
# normal build.
SAN_CFLAGS := $(SAN_FLAGS) -Wno-maybe-uninitialized
# Appended to the library, common/ and plain host flags (the unit tests and
# virtkit-introspect use $(CXXFLAGS) at build time; GUEST_CXXFLAGS copied it
# before, so guest code is unaffected).
LIB_CXXFLAGS   += $(SAN_CFLAGS)
COMMON_CFLAGS  += $(SAN_CFLAGS)
CXXFLAGS       += $(SAN_CFLAGS)
# Host-only objects built with the guest-code flags: the harness, the tool
# but its guest half, and the selftests without guest functions
# (vm_lifecycle's real-mode guest is bytes it writes into guest memory,
# page_walk_host runs a separately built image).
SAN_HOST_ONLY_OBJS := $(ST_LIB_OBJS) $(filter-out %/demo_guest.o,$(TOOL_OBJS)) \
	$(BUILD)/selftests/x86/vm_lifecycle.o $(BUILD)/selftests/x86/page_walk_host.o
$(SAN_HOST_ONLY_OBJS): GUEST_CXXFLAGS += $(SAN_CFLAGS)
# Every link pulls in the sanitizer runtime.
GUEST_LINK     += $(SAN_FLAGS)
HARDEN_LDFLAGS += $(SAN_FLAGS)
SO_LDFLAGS     += $(SAN_FLAGS)
endif

# What a sanitizer run builds and runs (inside the recursive make).
SAN_UNIT_BINS := $(UNIT_BIN) $(TOOL_BIN) $(INTROSPECT_BIN)
SAN_ST_BINS   := $(ST_BINS) $(INTRO_ST_BINS)

# Runtime options: every report fails the process (UBSan would carry on),
# with a stack trace. LeakSanitizer runs at each process's exit (default).
SAN_NAME := $(if $(findstring thread,$(SANITIZE)),tsan,asan)
SAN_ENV_asan := \
	ASAN_OPTIONS=abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
SAN_ENV_tsan := \
	TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=$(abspath mk/tsan.supp)

KVM_USABLE = [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]

# The unit tests, with a summary line for make check's table (from Catch2's
# closing line; no count at all is one failure). Sets rc=1 on failure.
SAN_RUN_UNIT = out=$$(mktemp); \
	echo "$(SAN_ENV_$(SAN_NAME)) $(UNIT_BIN)"; \
	env $(SAN_ENV_$(SAN_NAME)) $(UNIT_BIN) >$$out 2>&1 || rc=1; \
	cat $$out; \
	awk '/^All tests passed \(/ { if (match($$0, /in [0-9]+ test case/)) p = substr($$0, RSTART + 3) + 0 } \
	     /^test cases: / { k = split($$0, a, "|"); \
		for (i = 2; i <= k; i++) \
			if (a[i] ~ /passed/) p = a[i] + 0; \
			else if (a[i] ~ /failed/) f = a[i] + 0; \
			else if (a[i] ~ /skipped/) s = a[i] + 0 } \
	     END { printf "\# summary: suite=unit-$(SAN_NAME) platform=no KVM pass=%d fail=%d skip=%d\n", \
		   p, f + (p + f == 0), s }' $$out; \
	rm -f $$out;

.PHONY: check-asan check-tsan check-sanitized check-sanitized-unit

check-asan:
	+@if $(KVM_USABLE); then t=check-sanitized; else t=check-sanitized-unit; fi; \
	echo "$(MAKE) BUILD=$(ASAN_BUILD) SANITIZE=address,undefined $$t"; \
	$(MAKE) --no-print-directory BUILD=$(ASAN_BUILD) SANITIZE=address,undefined $$t

check-tsan:
	+@if $(KVM_USABLE); then t=check-sanitized; else t=check-sanitized-unit; fi; \
	echo "$(MAKE) BUILD=$(TSAN_BUILD) SANITIZE=thread $$t"; \
	$(MAKE) --no-print-directory BUILD=$(TSAN_BUILD) SANITIZE=thread $$t

# The unit tests only: hosts without a usable /dev/kvm.
check-sanitized-unit: $(UNIT_BIN)
	@[ -n "$(SANITIZE)" ] || { echo "$@: run through make check-asan or check-tsan" >&2; exit 2; }
	@rc=0; \
	$(SAN_RUN_UNIT) \
	echo "TAP version 13"; echo "1..1"; \
	echo "ok 1 selftests ($(SANITIZE)) # SKIP requires a usable /dev/kvm (sanitized selftests are not run on nested KVM under QEMU TCG: too slow)"; \
	echo "# summary: suite=selftests-$(SAN_NAME) platform=none pass=0 fail=0 skip=1"; \
	exit $$rc

check-sanitized: $(SAN_UNIT_BINS) $(SAN_ST_BINS)
	@[ -n "$(SANITIZE)" ] || { echo "$@: run through make check-asan or check-tsan" >&2; exit 2; }
	@rc=0; \
	$(SAN_RUN_UNIT) \
	for s in x86 introspection; do \
		echo "scripts/run-selftests $(BUILD)/selftests/$$s"; \
		env $(SAN_ENV_$(SAN_NAME)) VIRTKIT_SELFTESTS_SUITE=$$s-$(SAN_NAME) \
			scripts/run-selftests $(BUILD)/selftests/$$s || rc=1; \
	done; \
	echo "what make run runs: virtkit info, virtkit demo, virtkit-introspect against a second demo"; \
	if env $(SAN_ENV_$(SAN_NAME)) PATH=$(abspath $(BUILD))/bin:$$PATH sh -c '$(RUN_DEMO)'; then \
		echo "ok 1 tools: virtkit info, demo, virtkit-introspect"; p=1 f=0; \
	else \
		echo "not ok 1 tools: virtkit info, demo, virtkit-introspect"; p=0 f=1; rc=1; \
	fi; \
	echo "# summary: suite=tools-$(SAN_NAME) platform=host /dev/kvm pass=$$p fail=$$f skip=0"; \
	exit $$rc
