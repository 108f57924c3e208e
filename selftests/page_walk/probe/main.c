// SPDX-License-Identifier: MIT
/*
 * The access-probe image: runs every case of the case image (probe_abi.h)
 * in the state the case describes and records the exception it raised.
 *
 * No case restricts the image's own accesses: its pages are supervisor
 * pages (but the user stub and stack), writable, executable, and carry a
 * protection key the host keeps unrestricted in every case (it picks the
 * root whose pages have such a key). So the image stays in a case's state
 * until the next case, and writes only the registers that change: under
 * KVM each CR and MSR write is a VM exit, and the host sorts the cases by
 * state. CR3 is written for every case: each access comes from a fresh
 * walk, never from a translation cached by an earlier case.
 */
#include "../probe_abi.h"

#define CR0_PE		(1ull << 0)
#define CR0_ET		(1ull << 4)
#define CR0_WP		(1ull << 16)
#define CR0_PG		(1ull << 31)
#define CR4_PAE		(1ull << 5)
#define CR4_LA57	(1ull << 12)
#define CR4_SMEP	(1ull << 20)
#define CR4_SMAP	(1ull << 21)
#define CR4_PKE		(1ull << 22)
#define CR4_PKS		(1ull << 24)
#define MSR_EFER	0xc0000080
#define MSR_IA32_PKRS	0x6e1
#define EFER_NXE	(1ull << 11)
#define RFLAGS_AC	(1ull << 18)

_Static_assert(__builtin_offsetof(struct pw_header, la57) == PW_HDR_LA57, "pw_header");
_Static_assert(__builtin_offsetof(struct pw_header, roots) == PW_HDR_ROOT0, "pw_header");
_Static_assert(__builtin_offsetof(struct pw_header, out.status) == PW_HDR_STATUS, "pw_header");
_Static_assert(__builtin_offsetof(struct pw_header, out.vector) == PW_HDR_VECTOR, "pw_header");

struct tss64 {
	__u32 reserved0;
	__u64 rsp[3];
	__u64 reserved1;
	__u64 ist[7];
	__u64 reserved2;
	__u16 reserved3;
	__u16 iomap_base;
} __attribute__((packed));

struct idt_gate {
	__u16 offset0;
	__u16 selector;
	__u8 ist;
	__u8 type_attr;
	__u16 offset1;
	__u32 offset2;
	__u32 reserved;
};

struct table_ptr {
	__u16 limit;
	__u64 base;
} __attribute__((packed));

extern __u64 pw_gdt[];
extern char pw_vectors[];
extern __u32 pw_last_vector, pw_last_error;
extern __u64 pw_last_cr2;
unsigned int pw_probe(__u64 la, unsigned int access, unsigned int cpl3, __u64 rflags);
void pw_main(void);

static struct tss64 tss;
static struct idt_gate idt[256];
static __u8 trap_stack[16384] __attribute__((aligned(16)));
static __u8 double_fault_stack[4096] __attribute__((aligned(16)));

static inline void cpuid(__u32 leaf, __u32 sub, __u32 r[4])
{
	asm volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
			     : "a"(leaf), "c"(sub));
}

static inline __u64 rdmsr(__u32 msr)
{
	__u32 lo, hi;

	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return (__u64)hi << 32 | lo;
}

static inline void wrmsr(__u32 msr, __u64 val)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((__u32)val), "d"((__u32)(val >> 32))
		     : "memory");
}

static inline void write_cr0(__u64 v)
{
	asm volatile("mov %0, %%cr0" : : "r"(v) : "memory");
}

static inline void write_cr3(__u64 v)
{
	asm volatile("mov %0, %%cr3" : : "r"(v) : "memory");
}

static inline void write_cr4(__u64 v)
{
	asm volatile("mov %0, %%cr4" : : "r"(v) : "memory");
}

static inline void wrpkru(__u32 v)
{
	asm volatile(".byte 0x0f, 0x01, 0xef" : : "a"(v), "c"(0), "d"(0) : "memory");
}

static inline void outl(__u16 port, __u32 v)
{
	asm volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

/* A 16-byte system descriptor (TSS, LDT) at GDT selector sel. */
static void set_system_descriptor(__u16 sel, __u64 base, __u32 limit, __u8 type)
{
	__u64 *d = &pw_gdt[sel / 8];

	d[0] = (limit & 0xffff) | (base & 0xffffff) << 16 | (__u64)type << 40 |
	       1ull << 47 | (__u64)(limit >> 16 & 0xf) << 48 |
	       (base >> 24 & 0xff) << 56;
	d[1] = base >> 32;
}

static void set_gate(unsigned int vector, __u64 handler, unsigned int dpl, unsigned int ist)
{
	struct idt_gate *g = &idt[vector];

	g->offset0 = handler & 0xffff;
	g->selector = PW_SEL_KERNEL_CS;
	g->ist = ist;
	g->type_attr = 0x8e | dpl << 5;	/* present 64-bit interrupt gate */
	g->offset1 = handler >> 16 & 0xffff;
	g->offset2 = handler >> 32;
	g->reserved = 0;
}

static void setup_cpu(void)
{
	struct table_ptr p;
	unsigned int v;

	tss.rsp[0] = (__u64)(trap_stack + sizeof(trap_stack));
	tss.ist[0] = (__u64)(double_fault_stack + sizeof(double_fault_stack));
	tss.iomap_base = sizeof(tss);
	set_system_descriptor(PW_SEL_TSS, (__u64)&tss, sizeof(tss) - 1, 0x9);
	asm volatile("ltr %w0" : : "r"(PW_SEL_TSS));

	for (v = 0; v < 32; v++)
		set_gate(v, (__u64)pw_vectors + 16 * v, 0, v == 8 ? 1 : 0);
	p.limit = sizeof(idt) - 1;
	p.base = (__u64)idt;
	asm volatile("lidt %0" : : "m"(p));
}

static __u32 cpu_features(__u32 *maxphyaddr)
{
	__u32 r[4], f = 0, max_ext;

	cpuid(0x80000000, 0, r);
	max_ext = r[0];
	cpuid(0x80000001, 0, r);
	if (r[3] & 1u << 20)
		f |= PW_FEAT_NX;
	if (r[3] & 1u << 26)
		f |= PW_FEAT_PAGE1GB;
	*maxphyaddr = 36;
	if (max_ext >= 0x80000008) {
		cpuid(0x80000008, 0, r);
		*maxphyaddr = r[0] & 0xff;
	}
	cpuid(7, 0, r);
	if (r[1] & 1u << 7)
		f |= PW_FEAT_SMEP;
	if (r[1] & 1u << 20)
		f |= PW_FEAT_SMAP;
	if (r[2] & 1u << 3)
		f |= PW_FEAT_PKU;
	if (r[2] & 1u << 16)
		f |= PW_FEAT_LA57;
	if (r[2] & 1u << 31)
		f |= PW_FEAT_PKS;
	return f;
}

/* The features a case needs. */
static __u32 case_needs(__u32 ctl)
{
	__u32 f = 0;

	if (ctl & PW_CTL_NXE)
		f |= PW_FEAT_NX;
	if (ctl & PW_CTL_SMEP)
		f |= PW_FEAT_SMEP;
	if (ctl & PW_CTL_SMAP)
		f |= PW_FEAT_SMAP;
	if (ctl & PW_CTL_PKE)
		f |= PW_FEAT_PKU;
	if (ctl & PW_CTL_PKS)
		f |= PW_FEAT_PKS;
	return f;
}

/* The probe frame's descriptor: a DPL3 read/write data segment. */
static void reset_probe_descriptor(int accessed)
{
	volatile __u64 *d = (volatile __u64 *)(PW_PROBE_PHYS + PW_PROBE_DESC);

	*d = 0x00cff2000000ffffull | (accessed ? 1ull << 40 : 0);
}

void pw_main(void)
{
	struct pw_header *h = (struct pw_header *)PW_CASES_BASE;
	const struct pw_case *cases = (const struct pw_case *)h->cases;
	struct pw_result *results = (struct pw_result *)h->results;
	const __u64 cr0_base = CR0_PG | CR0_ET | CR0_PE;
	const __u64 cr4_base = CR4_PAE | (h->la57 ? CR4_LA57 : 0);
	__u64 efer = rdmsr(MSR_EFER), cr0 = cr0_base, cr4 = cr4_base;
	__u32 features, maxphyaddr, pkru = 0, pkrs = 0, cur_root = 0;
	__u64 i;

	setup_cpu();
	features = cpu_features(&maxphyaddr);
	h->out.features = features;
	h->out.maxphyaddr = maxphyaddr;
	write_cr0(cr0);
	write_cr4(cr4);
	if (features & PW_FEAT_PKS)
		wrmsr(MSR_IA32_PKRS, 0);
	*(volatile __u8 *)PW_PROBE_PHYS = 0xc3;

	for (i = 0; i < h->ncases; i++) {
		const struct pw_case *c = &cases[i];
		struct pw_result *r = &results[i];
		__u32 ctl = c->ctl, acc = ctl & PW_ACC_MASK;
		const struct pw_keyset *k = &h->keys[(ctl & PW_CTL_KEYS_MASK) >> PW_CTL_KEYS_SHIFT];
		__u32 root = (ctl & PW_CTL_ROOT_MASK) >> PW_CTL_ROOT_SHIFT;
		__u64 want_efer, want_cr0, want_cr4 = cr4_base;
		unsigned int vector;

		h->out.done = i;
		r->flags = PW_RES_RAN;
		if ((case_needs(ctl) & features) != case_needs(ctl) ||
		    (ctl & ~PW_CTL_KNOWN) || acc > PW_ACC_IMPLICIT_WRITE) {
			r->flags |= PW_RES_UNSUPPORTED;
			continue;
		}
		if (acc == PW_ACC_IMPLICIT_READ || acc == PW_ACC_IMPLICIT_WRITE) {
			reset_probe_descriptor(acc == PW_ACC_IMPLICIT_READ);
			set_system_descriptor(PW_SEL_LDT, c->la, 0xfff, 0x2);
			asm volatile("lldt %w0" : : "r"(PW_SEL_LDT) : "memory");
		}
		/*
		 * A new root gives the image's pages another key, which the
		 * current PKRS may deny: lift it, then switch, before the new
		 * PKRS denies the old key. (PKRU applies to user pages, which
		 * the image touches only at CPL3, after WRPKRU.)
		 */
		if (root != cur_root) {
			if ((features & PW_FEAT_PKS) && pkrs) {
				wrmsr(MSR_IA32_PKRS, 0);
				pkrs = 0;
			}
			write_cr3(h->roots[root]);
			cur_root = root;
		}
		want_efer = (efer & ~EFER_NXE) | (ctl & PW_CTL_NXE ? EFER_NXE : 0);
		if (want_efer != efer) {
			wrmsr(MSR_EFER, want_efer);
			efer = want_efer;
		}
		if ((features & PW_FEAT_PKS) && k->pkrs != pkrs) {
			wrmsr(MSR_IA32_PKRS, k->pkrs);
			pkrs = k->pkrs;
		}
		want_cr0 = cr0_base | (ctl & PW_CTL_WP ? CR0_WP : 0);
		if (want_cr0 != cr0) {
			write_cr0(want_cr0);
			cr0 = want_cr0;
		}
		if (ctl & PW_CTL_SMEP)
			want_cr4 |= CR4_SMEP;
		if (ctl & PW_CTL_SMAP)
			want_cr4 |= CR4_SMAP;
		if (ctl & PW_CTL_PKE)
			want_cr4 |= CR4_PKE;
		if (ctl & PW_CTL_PKS)
			want_cr4 |= CR4_PKS;
		if (want_cr4 != cr4) {
			write_cr4(want_cr4);
			cr4 = want_cr4;
		}
		/* WRPKRU needs CR4.PKE; without it PKRU is not used. */
		if ((ctl & PW_CTL_PKE) && k->pkru != pkru) {
			wrpkru(k->pkru);
			pkru = k->pkru;
		}
		write_cr3(h->roots[root]);

		vector = pw_probe(c->la, acc, !!(ctl & PW_CTL_CPL3),
				  2 | (ctl & PW_CTL_AC ? RFLAGS_AC : 0));

		r->vector = vector;
		if (vector != PW_NO_FAULT)
			r->error_code = pw_last_error;
		if (vector == 14 &&
		    pw_last_cr2 >> 12 == (c->la + (acc >= PW_ACC_IMPLICIT_READ ? PW_PROBE_DESC : 0)) >> 12)
			r->flags |= PW_RES_CR2_IN_PAGE;
	}
	h->out.done = h->ncases;
	h->out.status = PW_EXIT_OK;
	outl(PW_EXIT_PORT, PW_EXIT_OK);
}
