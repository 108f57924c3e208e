/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * The KVMI introspection wire protocol as virtkit serves it: the message
 * ids and layouts of the "kvmi-v7" protocol that Bitdefender's libkvmi
 * (master) speaks, and so LibVMI's KVM driver and HVMI. Written for
 * virtkit from the protocol's description; the layouts, ids and error
 * values are the protocol's, so existing tools work unmodified.
 * Documentation/introspection.rst describes every message.
 *
 * Framing: every message is a struct kvmi_msg_hdr followed by `size` bytes
 * of payload, header and payload sent together (one sendmsg()), host byte
 * order, at most KVMI_MSG_SIZE bytes of payload. Every padding field must
 * be zero. A command reply is a header with the command's id and seq,
 * struct kvmi_error_code and, when err is 0, the reply data. vCPU commands
 * start with struct kvmi_vcpu_hdr.
 */
#ifndef _UAPI_LINUX_VIRTKIT_KVMI_H
#define _UAPI_LINUX_VIRTKIT_KVMI_H

#include <linux/kvm.h>
#include <linux/types.h>

#define KVMI_VERSION		0x00000001

/* Message ids (kvmi_msg_hdr.id). */
enum {
	KVMI_EVENT_REPLY		= 0,
	KVMI_EVENT			= 1,

	KVMI_GET_VERSION		= 2,
	KVMI_CHECK_COMMAND		= 3,
	KVMI_CHECK_EVENT		= 4,
	KVMI_GET_GUEST_INFO		= 5,
	KVMI_GET_VCPU_INFO		= 6,
	KVMI_PAUSE_VCPU			= 7,
	KVMI_CONTROL_VM_EVENTS		= 8,
	KVMI_CONTROL_EVENTS		= 9,
	KVMI_CONTROL_CR			= 10,
	KVMI_CONTROL_MSR		= 11,
	KVMI_CONTROL_VE			= 12,
	KVMI_GET_REGISTERS		= 13,
	KVMI_SET_REGISTERS		= 14,
	KVMI_GET_CPUID			= 15,
	KVMI_GET_XSAVE			= 16,
	KVMI_READ_PHYSICAL		= 17,
	KVMI_WRITE_PHYSICAL		= 18,
	KVMI_INJECT_EXCEPTION		= 19,
	KVMI_GET_PAGE_ACCESS		= 20,
	KVMI_SET_PAGE_ACCESS		= 21,
	KVMI_GET_MAP_TOKEN		= 22,
	KVMI_GET_MTRR_TYPE		= 23,
	KVMI_CONTROL_SPP		= 24,
	KVMI_GET_PAGE_WRITE_BITMAP	= 25,
	KVMI_SET_PAGE_WRITE_BITMAP	= 26,
	KVMI_CONTROL_CMD_RESPONSE	= 27,
	KVMI_SET_VE_INFO_PAGE		= 28,
	KVMI_GET_MAX_GFN		= 29,
	KVMI_GET_NEXT_AVAILABLE_GFN	= 31,
	KVMI_SWITCH_EPT_VIEW		= 32,
	KVMI_DISABLE_VE			= 33,
	KVMI_GET_EPT_VIEW		= 34,
	KVMI_VCPU_TRANSLATE_GVA		= 35,
	KVMI_CONTROL_EPT_VIEW		= 36,
	KVMI_VCPU_GET_XCR		= 37,
	KVMI_VCPU_SET_XSAVE		= 38,
	KVMI_QUERY_PHYSICAL		= 39,
	KVMI_VCPU_ALLOC_GFN		= 41,
	KVMI_VCPU_FREE_GFN		= 42,
	KVMI_CREATE_EPT_VIEW		= 43,
	KVMI_DESTROY_EPT_VIEW		= 44,
	KVMI_VCPU_CHANGE_GFN		= 60,
	KVMI_VCPU_CONTROL_SINGLESTEP	= 63,

	KVMI_NUM_MESSAGES
};

/* Event ids (kvmi_event.event). */
enum {
	KVMI_EVENT_UNHOOK	= 0,
	KVMI_EVENT_CR		= 1,
	KVMI_EVENT_MSR		= 2,
	KVMI_EVENT_XSETBV	= 3,
	KVMI_EVENT_BREAKPOINT	= 4,
	KVMI_EVENT_HYPERCALL	= 5,
	KVMI_EVENT_PF		= 6,
	KVMI_EVENT_TRAP		= 7,
	KVMI_EVENT_DESCRIPTOR	= 8,
	KVMI_EVENT_CREATE_VCPU	= 9,
	KVMI_EVENT_PAUSE_VCPU	= 10,
	KVMI_EVENT_SINGLESTEP	= 11,
	KVMI_EVENT_CPUID	= 13,

	KVMI_NUM_EVENTS
};

/* kvmi_event_reply.action */
#define KVMI_EVENT_ACTION_CONTINUE	0
#define KVMI_EVENT_ACTION_RETRY		1
#define KVMI_EVENT_ACTION_CRASH		2

/* kvmi_page_access_entry.access, kvmi_event_pf.access */
#define KVMI_PAGE_ACCESS_R	(1 << 0)
#define KVMI_PAGE_ACCESS_W	(1 << 1)
#define KVMI_PAGE_ACCESS_X	(1 << 2)
#define KVMI_PAGE_ACCESS_SVE	(1 << 3)

/*
 * Error codes (kvmi_error_code.err is minus one of these). They are the
 * values of KVM's <linux/kvm_para.h> and of the host's errno, as libkvmi
 * decodes them.
 */
#define KVMI_EPERM		1
#define KVMI_ENOENT		2
#define KVMI_E2BIG		7
#define KVMI_EAGAIN		11
#define KVMI_ENOMEM		12
#define KVMI_EFAULT		14
#define KVMI_EBUSY		16
#define KVMI_EINVAL		22
#define KVMI_EOPNOTSUPP		95
#define KVMI_ENOSYS		1000

struct kvmi_msg_hdr {
	__u16 id;
	__u16 size;	/* payload bytes after this header */
	__u32 seq;	/* the sender's; a reply carries its request's */
};

/* Largest payload of one message. */
#define KVMI_MSG_SIZE		(4096 * 2 - sizeof(struct kvmi_msg_hdr))

struct kvmi_error_code {
	__s32 err;	/* 0 or -KVMI_E* */
	__u32 padding;
};

struct kvmi_vcpu_hdr {
	__u16 vcpu;
	__u16 padding1;
	__u32 padding2;
};

/* --- handshake (before any message; VMM -> tool, then tool -> VMM) --- */

struct kvmi_qemu2introspector {
	__u32 struct_size;	/* of the whole struct, this field included */
	__u8 uuid[16];
	__u32 padding;
	__s64 start_time;	/* milliseconds since the epoch (QEMU's vm_start_time) */
	char name[64];		/* NUL-terminated */
	/*
	 * virtkit's extension (struct_size 104; QEMU sends 96): the end of
	 * guest-physical memory. Tools that expect 96 bytes skip the rest,
	 * as the protocol asks them to.
	 */
	__u64 max_gpa;
};

struct kvmi_introspector2qemu {
	__u32 struct_size;
	__u8 cookie_hash[20];	/* SHA-1 of the shared secret */
};

/* --- commands --- */

struct kvmi_features {
	__u8 spp;
	__u8 vmfunc;
	__u8 eptp;
	__u8 ve;
	__u8 padding[4];
};

struct kvmi_get_version_reply {
	__u32 version;
	__u32 padding;
	struct kvmi_features features;
};

struct kvmi_check_command {
	__u16 id;
	__u16 padding1;
	__u32 padding2;
};

struct kvmi_check_event {
	__u16 id;
	__u16 padding1;
	__u32 padding2;
};

struct kvmi_get_guest_info_reply {
	__u32 vcpu_count;
	__u32 padding[3];
};

struct kvmi_get_vcpu_info_reply {
	__u64 tsc_speed;	/* Hz, 0 if unknown */
};

struct kvmi_pause_vcpu {
	__u8 wait;
	__u8 padding1;
	__u16 padding2;
	__u32 padding3;
};

struct kvmi_control_vm_events {
	__u16 event_id;
	__u8 enable;
	__u8 padding1;
	__u32 padding2;
};

struct kvmi_control_events {
	__u16 event_id;
	__u8 enable;
	__u8 padding1;
	__u32 padding2;
};

struct kvmi_control_cr {
	__u8 enable;
	__u8 padding1;
	__u16 padding2;
	__u32 cr;
};

struct kvmi_control_msr {
	__u8 enable;
	__u8 padding1;
	__u16 padding2;
	__u32 msr;
};

struct kvmi_get_registers {
	__u16 nmsrs;
	__u16 padding1;
	__u32 padding2;
	__u32 msrs_idx[];
};

struct kvmi_get_registers_reply {
	__u32 mode;		/* 2, 4 or 8 */
	__u32 padding;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_msrs msrs;	/* followed by msrs.nmsrs entries */
};

struct kvmi_get_cpuid {
	__u32 function;
	__u32 index;
};

struct kvmi_get_cpuid_reply {
	__u32 eax;
	__u32 ebx;
	__u32 ecx;
	__u32 edx;
};

struct kvmi_read_physical {
	__u64 gpa;
	__u64 size;
};

struct kvmi_write_physical {
	__u64 gpa;
	__u64 size;
	__u8 data[];
};

struct kvmi_inject_exception {
	__u8 nr;
	__u8 padding1;
	__u16 padding2;
	__u32 error_code;
	__u64 address;
};

struct kvmi_page_access_entry {
	__u64 gpa;
	__u8 access;
	__u8 padding1;
	__u16 padding2;
	__u32 padding3;
};

struct kvmi_set_page_access {
	__u16 view;
	__u16 count;
	__u32 padding;
	struct kvmi_page_access_entry entries[];
};

struct kvmi_get_mtrr_type {
	__u64 gpa;
};

struct kvmi_get_mtrr_type_reply {
	__u8 type;
	__u8 padding[7];
};

struct kvmi_control_spp {
	__u8 enable;
	__u8 padding1;
	__u16 padding2;
	__u32 padding3;
};

struct kvmi_page_write_bitmap_entry {
	__u64 gpa;
	__u32 bitmap;	/* bit i: sub-page i (128 bytes) writable */
	__u32 padding;
};

struct kvmi_set_page_write_bitmap {
	__u16 view;
	__u16 count;
	__u32 padding;
	struct kvmi_page_write_bitmap_entry entries[];
};

struct kvmi_control_cmd_response {
	__u8 enable;
	__u8 now;
	__u16 padding1;
	__u32 padding2;
};

struct kvmi_get_max_gfn_reply {
	__u64 gfn;
};

struct kvmi_vcpu_translate_gva {
	__u64 gva;
};

struct kvmi_vcpu_translate_gva_reply {
	__u64 gpa;
};

struct kvmi_vcpu_get_xcr {
	__u8 xcr;
	__u8 padding[7];
};

struct kvmi_vcpu_get_xcr_reply {
	__u64 value;
};

struct kvmi_query_physical {
	__u64 gfn;
};

struct kvmi_query_physical_reply {
	__u64 gfn;	/* first page of the RAM range holding gfn */
	__u64 size;	/* its size in bytes */
};

struct kvmi_vcpu_control_singlestep {
	__u8 enable;
	__u8 padding[7];
};

/* --- events (VMM -> tool: kvmi_msg_hdr{KVMI_EVENT}, kvmi_event, specific) --- */

struct kvmi_event_arch {
	__u8 mode;		/* 2, 4 or 8 */
	__u8 padding1;
	__u16 view;
	__u8 padding2[4];
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct {
		__u64 sysenter_cs;
		__u64 sysenter_esp;
		__u64 sysenter_eip;
		__u64 efer;
		__u64 star;
		__u64 lstar;
		__u64 cstar;
		__u64 pat;
		__u64 shadow_gs;
	} msrs;
};

struct kvmi_event {
	__u16 size;		/* of this struct */
	__u16 vcpu;
	__u8 event;
	__u8 padding[3];
	struct kvmi_event_arch arch;
};

struct kvmi_event_msr {
	__u32 msr;
	__u32 padding;
	__u64 old_value;
	__u64 new_value;
};

struct kvmi_event_pf {
	__u64 gva;
	__u64 gpa;
	__u8 access;
	__u8 padding1;
	__u16 view;
	__u32 padding2;
};

struct kvmi_event_breakpoint {
	__u64 gpa;
	__u8 insn_len;
	__u8 padding[7];
};

struct kvmi_event_trap {
	__u8 vector;
	__u8 padding1;
	__u16 padding2;
	__u32 error_code;
	__u64 cr2;
};

struct kvmi_event_singlestep {
	__u8 failed;
	__u8 padding[7];
};

/* --- event replies (tool -> VMM: kvmi_msg_hdr{KVMI_EVENT_REPLY, event's seq},
 *     kvmi_vcpu_hdr, kvmi_event_reply, specific) --- */

struct kvmi_event_reply {
	__u8 action;
	__u8 event;
	__u16 padding1;
	__u32 padding2;
};

struct kvmi_event_msr_reply {
	__u64 new_val;
};

struct kvmi_event_pf_reply {
	__u64 ctx_addr;
	__u32 ctx_size;
	__u8 singlestep;
	__u8 rep_complete;
	__u16 padding;
	__u8 ctx_data[256];
};

/* --- virtkit's own commands ---
 *
 * Ids from 0x8000 up: KVMI's ids stay below 0x100, so no KVMI version
 * collides with them; a VMM that does not know one answers -KVMI_ENOSYS
 * as for any unknown id (CHECK_COMMAND: -KVMI_EOPNOTSUPP).
 *
 * VIRTKIT_KVMI_SHARE_MEMORY {flags = 0}: guest RAM for the tool to map
 * read-only. The reply data is virtkit_kvmi_share_memory_reply{count} and
 * count virtkit_kvmi_memory_region, sorted by gpa, and the reply message
 * carries count file descriptors (one SCM_RIGHTS control message, with
 * its first byte), opened O_RDONLY, in the same order: region i is bytes
 * [offset, offset + size) of descriptor i, to be mapped PROT_READ,
 * MAP_SHARED. The mapping shows the guest's memory as it changes. Errors:
 * -KVMI_EPERM when the VMM did not opt in (virtkit:
 * IntrospectionOptions::share_memory), -KVMI_EOPNOTSUPP when the
 * connection cannot carry descriptors (not a unix socket), -KVMI_EINVAL
 * for flags or padding not zero, -KVMI_E2BIG for more than
 * VIRTKIT_KVMI_MAX_SHARED_REGIONS regions; no descriptors then.
 */
#define VIRTKIT_KVMI_SHARE_MEMORY	0x8000

/* SCM_MAX_FD: the descriptors one control message carries. */
#define VIRTKIT_KVMI_MAX_SHARED_REGIONS	253

struct virtkit_kvmi_share_memory {
	__u32 flags;
	__u32 padding;
};

struct virtkit_kvmi_share_memory_reply {
	__u32 count;
	__u32 padding;
};

struct virtkit_kvmi_memory_region {
	__u64 gpa;
	__u64 size;
	__u64 offset;	/* in the region's descriptor */
};

#endif /* _UAPI_LINUX_VIRTKIT_KVMI_H */
