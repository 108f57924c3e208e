# The page-walk engine's oracles (issue 6, Documentation/pks.rst):
#
#   the access-probe image   selftests/page_walk/probe/ -> $(PW_PROBE_BIN), a
#                            freestanding x86-64 multiboot binary
#   page_walk_oracle         boots it under qemu-system-x86_64 -accel tcg
#                            -cpu max (PKS, PKU, LA57) and compares every
#                            case with the engine: `make check-page-walk`
#   page_walk_host           a selftest in selftests/x86 that runs the same
#                            image in a KVM guest (run with that suite)

PW_DIR         := selftests/page_walk
PW_PROBE_BIN   := $(BUILD)/$(PW_DIR)/probe.bin
PW_PROBE_ELF   := $(BUILD)/$(PW_DIR)/probe.elf
PW_PROBE_OBJS  := $(BUILD)/$(PW_DIR)/probe/entry.o $(BUILD)/$(PW_DIR)/probe/main.o
PW_MATRIX_OBJ  := $(BUILD)/$(PW_DIR)/access_matrix.o
PW_ORACLE      := $(BUILD)/$(PW_DIR)/page_walk_oracle
PW_HOST_TEST   := $(BUILD)/selftests/x86/page_walk_host

# The image runs without libc, SSE, red zone or stack protector, at its
# link addresses (probe/probe.lds).
PW_PROBE_CFLAGS := -std=gnu11 -m64 -O2 -g -ffreestanding -fno-builtin -fno-pic -fno-pie \
                   -mno-red-zone -mgeneral-regs-only -fno-stack-protector \
                   -fcf-protection=none -fno-asynchronous-unwind-tables $(WARN) \
                   -Iuapi -MMD -MP

.PHONY: check-page-walk

selftests: $(PW_ORACLE) $(PW_PROBE_BIN)

$(BUILD)/$(PW_DIR)/probe/%.o: $(PW_DIR)/probe/%.c
	@mkdir -p $(@D)
	$(CC) $(PW_PROBE_CFLAGS) -c $< -o $@

$(BUILD)/$(PW_DIR)/probe/%.o: $(PW_DIR)/probe/%.S
	@mkdir -p $(@D)
	$(CC) $(PW_PROBE_CFLAGS) -c $< -o $@

$(PW_PROBE_ELF): $(PW_PROBE_OBJS) $(PW_DIR)/probe/probe.lds
	$(CC) -nostdlib -static -no-pie -Wl,--build-id=none -Wl,--no-warn-rwx-segments \
		-Wl,-T,$(PW_DIR)/probe/probe.lds -o $@ $(PW_PROBE_OBJS)

$(PW_PROBE_BIN): $(PW_PROBE_ELF)
	objcopy -O binary $< $@

$(BUILD)/$(PW_DIR)/probe_blob.o: $(PW_DIR)/probe_blob.S $(PW_PROBE_BIN)
	$(CC) -DPW_PROBE_BIN='"$(PW_PROBE_BIN)"' -c $< -o $@

# The oracle and the access matrix are host code; the matrix is also linked
# into page_walk_host, a program with guest code, so both get the
# guest-environment flags (no -mgeneral-regs-only: they run on the host).
$(BUILD)/$(PW_DIR)/%.o: $(PW_DIR)/%.cpp
	@mkdir -p $(@D)
	$(CXX) $(GUEST_CPPFLAGS) -Iselftests/lib $(DEPFLAGS) $(GUEST_CXXFLAGS) -fno-pie -c $< -o $@

$(PW_ORACLE): $(BUILD)/$(PW_DIR)/qemu_oracle.o $(PW_MATRIX_OBJ) $(LIB_A)
	$(CXX) -no-pie -o $@ $(BUILD)/$(PW_DIR)/qemu_oracle.o $(PW_MATRIX_OBJ) $(LIB_A) -lpthread

# Linked like the other x86 selftests, plus the matrix and the image.
$(PW_HOST_TEST): $(BUILD)/selftests/x86/page_walk_host.o $(PW_MATRIX_OBJ) \
		 $(BUILD)/$(PW_DIR)/probe_blob.o $(ST_LIB_OBJS) $(GUEST_A) $(INTROSPECT_A) $(LIB_A)
	@mkdir -p $(@D)
	$(CXX) -no-pie -o $@ $(BUILD)/selftests/x86/page_walk_host.o $(PW_MATRIX_OBJ) \
		$(BUILD)/$(PW_DIR)/probe_blob.o $(ST_LIB_OBJS) $(GUEST_LINK)

check-page-walk: $(PW_ORACLE) $(PW_PROBE_BIN)
	$(PW_ORACLE) --probe $(PW_PROBE_BIN)
