// SPDX-License-Identifier: MIT
/*
 * The guest page-walk permission engine: see page_walk.h for what it
 * covers.
 *
 * Freestanding C11 that also builds in the kernel: no libc, no allocation,
 * no floating point, no recursion.
 *
 * The order of the checks, and so which fault an access that breaks several
 * rules gets, follows the SDM where it is explicit and QEMU's TCG
 * (target/i386/tcg/sysemu/excp_helper.c, mmu_translate(); the later oracle
 * runs `qemu-system-x86_64 -accel tcg -cpu max`) where it is not:
 *
 *  1. #GP for a non-canonical address (48 bits, 57 with CR4.LA57) before
 *     any entry is read (QEMU get_physical_address()).
 *  2. Top level down, per entry: not present -> #PF P=0; reserved bit set
 *     (address bits 51:MAXPHYADDR, XD with EFER.NXE=0, PS in a PML5E or
 *     PML4E, PS in a PDPTE without Page1GB) -> #PF RSVD. So a reserved bit at one level wins over a
 *     non-present entry below it, and the first bad level stops the walk.
 *  3. At the leaf, the large-page reserved bits (1G: 29:13, 2M: 20:13).
 *  4. A user-mode access to a supervisor-mode address -> #PF P, never PK
 *     (QEMU: checked before keys).
 *  5. Keys: if the key's AD/WD bits forbid the access type -> #PF P|PK,
 *     even when the ordinary rules (R/W with WP, SMAP) forbid it too (QEMU
 *     checks keys before the ordinary rights; the SDM does not say which
 *     cause an access with two reports).
 *  6. The ordinary rights (R/W with CR0.WP, SMAP, XD, SMEP) -> #PF P.
 *
 * Error codes: U is set for a user-mode access (explicit at CPL 3), W for a
 * write, I/D for a fetch only when EFER.NXE=1 or CR4.SMEP=1 (SDM 4.7; QEMU
 * the same), and for every kind of #PF, not-present and reserved-bit ones
 * included (QEMU). RSVD comes with P=1 (SDM 4.7, hardware); QEMU clears P
 * there, which VK_WALK_QUIRK_RSVD_NO_P reproduces.
 *
 * SMAP (CR4.SMAP=1) blocks supervisor-mode data accesses to user-mode
 * addresses, explicit ones unless EFLAGS.AC=1 and CPL < 3, implicit ones
 * always (SDM 4.6.1; KVM's permission_fault() with PFERR_IMPLICIT_ACCESS;
 * hardware, measured through kvm_pvm). QEMU's TCG lets AC=1 at CPL 0-2 lift
 * it for implicit accesses too (cpu_mmu_index_kernel()):
 * VK_WALK_QUIRK_IMPLICIT_SMAP_AC reproduces that. Fetches are not subject
 * to SMAP.
 *
 * Keys (only with EFER.LMA=1, which every supported mode has): the key is
 * bits 62:59 of the leaf; a user-mode address (U/S=1 at every level) is
 * checked against PKRU when CR4.PKE=1, a supervisor-mode address against
 * PKRS when CR4.PKS=1, for data accesses of either mode. AD forbids reads
 * and writes; WD forbids writes by user-mode accesses always and by
 * supervisor-mode accesses when CR0.WP=1. Fetches are never key-checked.
 * Bits 62:52 of an entry are ignored, never reserved (QEMU: its reserved
 * mask is within bits 51:12 apart from XD).
 *
 * Every rule that depends on the processor's features takes them from
 * vk_walk_state.features and .maxphyaddr (the vCPU's CPUID), never from
 * an assumption: PS in a PDPTE is reserved without Page1GB (SDM 4.5,
 * table 4-17; KVM's reset_guest_rsvds_bits_mask(), QEMU's mmu_translate()),
 * and a CR4 or EFER bit the CPU does not have (LA57, SMEP, SMAP, PKE, PKS,
 * NXE) makes the state one no such processor can be in: EINVAL.
 */
#include "page_walk.h"

#define PW_LEVEL_BITS		9
#define PW_INDEX_MASK		0x1ffull
#define PW_PAGE_SHIFT		12

static int pw_done(struct vk_walk *w, int result)
{
	w->result = result;
	return result;
}

static int pw_fault(struct vk_walk *w, __u32 error_code)
{
	w->error_code = error_code;
	return pw_done(w, VK_WALK_PF);
}

static void pw_reset(struct vk_walk *w)
{
	int l;

	w->result = VK_WALK_OK;
	w->error_code = 0;
	w->gpa = 0;
	w->page_size = 0;
	w->rights = 0;
	w->key = 0;
	w->allowed = 0;
	w->level = 0;
	for (l = 0; l < 6; l++) {
		w->entry[l] = 0;
		w->entry_gpa[l] = 0;
	}
	w->read_gpa = 0;
}

/* Whether la is canonical for a linear-address width of `bits`. */
static int pw_canonical(__u64 la, unsigned int bits)
{
	__u64 top = la >> (bits - 1);

	return top == 0 || top == (~0ull >> (bits - 1));
}

/* The rights a key leaves to an access of the given mode (VK_WALK_ALLOW_*). */
static __u32 pw_key_rights(__u32 pkr, __u32 key, int user, int wp)
{
	__u32 bits = (pkr >> (2 * key)) & 3;	/* bit 0 AD, bit 1 WD */
	__u32 allow = VK_WALK_ALLOW_READ | VK_WALK_ALLOW_WRITE |
		      VK_WALK_ALLOW_FETCH;

	if (bits & 1)
		allow &= ~(VK_WALK_ALLOW_READ | VK_WALK_ALLOW_WRITE);
	else if ((bits & 2) && (user || wp))
		allow &= ~VK_WALK_ALLOW_WRITE;
	return allow;
}

/* Whether every CR4 and EFER bit set has its feature in s->features. */
static int pw_state_possible(const struct vk_walk_state *s)
{
	static const struct {
		__u64 cr4;
		__u32 feature;
	} need[] = {
		{ VK_WALK_CR4_LA57, VK_WALK_FEAT_LA57 },
		{ VK_WALK_CR4_SMEP, VK_WALK_FEAT_SMEP },
		{ VK_WALK_CR4_SMAP, VK_WALK_FEAT_SMAP },
		{ VK_WALK_CR4_PKE, VK_WALK_FEAT_PKU },
		{ VK_WALK_CR4_PKS, VK_WALK_FEAT_PKS },
	};
	unsigned int i;

	for (i = 0; i < sizeof(need) / sizeof(need[0]); i++)
		if ((s->cr4 & need[i].cr4) && !(s->features & need[i].feature))
			return 0;
	return !(s->efer & VK_WALK_EFER_NXE) || (s->features & VK_WALK_FEAT_NX);
}

int vk_walk_translate(const struct vk_walk_state *s,
		      const struct vk_walk_mem *mem, __u64 la,
		      unsigned int access, struct vk_walk *w)
{
	unsigned int type = access & VK_WALK_TYPE_MASK;
	int implicit = !!(access & VK_WALK_IMPLICIT);
	int user, smap, wp, nxe, top, level;
	__u32 ec, rights, allowed, key_allow, pkr;
	__u64 rsvd, table, e = 0, acc, size;

	pw_reset(w);
	if ((access & ~(VK_WALK_TYPE_MASK | VK_WALK_IMPLICIT)) ||
	    type > VK_WALK_FETCH || (implicit && type == VK_WALK_FETCH) ||
	    s->cpl > 3)
		return pw_done(w, VK_WALK_EINVAL);

	if (!(s->cr0 & VK_WALK_CR0_PG)) {
		w->gpa = la;
		w->page_size = VK_WALK_PAGE_4K;
		w->rights = VK_WALK_RIGHT_W | VK_WALK_RIGHT_U | VK_WALK_RIGHT_X;
		w->allowed = VK_WALK_ALLOW_READ | VK_WALK_ALLOW_WRITE |
			     VK_WALK_ALLOW_FETCH;
		return pw_done(w, VK_WALK_OK);
	}
	if (!(s->efer & VK_WALK_EFER_LMA))
		return pw_done(w, VK_WALK_UNSUPPORTED);
	if (s->maxphyaddr < 32 || s->maxphyaddr > 52 || !pw_state_possible(s))
		return pw_done(w, VK_WALK_EINVAL);

	top = (s->cr4 & VK_WALK_CR4_LA57) ? VK_WALK_PML5 : VK_WALK_PML4;
	if (!pw_canonical(la, top == VK_WALK_PML5 ? 57 : 48))
		return pw_done(w, VK_WALK_GP);

	user = s->cpl == 3 && !implicit;
	wp = !!(s->cr0 & VK_WALK_CR0_WP);
	nxe = !!(s->efer & VK_WALK_EFER_NXE);
	ec = 0;
	if (user)
		ec |= VK_WALK_PFEC_U;
	if (type == VK_WALK_WRITE)
		ec |= VK_WALK_PFEC_W;
	if (type == VK_WALK_FETCH && (nxe || (s->cr4 & VK_WALK_CR4_SMEP)))
		ec |= VK_WALK_PFEC_ID;

	rsvd = VK_WALK_PTE_ADDR & ~((1ull << s->maxphyaddr) - 1);
	if (!nxe)
		rsvd |= VK_WALK_PTE_NX;

	/* U/S and R/W combine by AND over the levels, XD by OR. */
	acc = VK_WALK_PTE_W | VK_WALK_PTE_U;
	table = s->cr3 & VK_WALK_PTE_ADDR;
	for (level = top; level >= VK_WALK_PT; level--) {
		unsigned int shift = PW_PAGE_SHIFT + PW_LEVEL_BITS * (level - 1);
		__u64 gpa = table + (((la >> shift) & PW_INDEX_MASK) << 3);

		w->level = level;
		w->entry_gpa[level] = gpa;
		if (mem->read(mem->ctx, gpa, &e)) {
			w->read_gpa = gpa;
			return pw_done(w, VK_WALK_EREAD);
		}
		w->entry[level] = e;
		if (!(e & VK_WALK_PTE_P))
			return pw_fault(w, ec);
		if ((e & rsvd) ||
		    (level >= VK_WALK_PML4 && (e & VK_WALK_PTE_PS)) ||
		    (level == VK_WALK_PDPT && (e & VK_WALK_PTE_PS) &&
		     !(s->features & VK_WALK_FEAT_PAGE1GB)))
			goto fault_rsvd;
		acc = (acc & e & (VK_WALK_PTE_W | VK_WALK_PTE_U)) |
		      ((acc | e) & VK_WALK_PTE_NX);
		if (level == VK_WALK_PT ||
		    (level <= VK_WALK_PDPT && (e & VK_WALK_PTE_PS)))
			break;
		table = e & VK_WALK_PTE_ADDR;
	}

	/* e is the leaf at `level`. */
	size = 1ull << (PW_PAGE_SHIFT + PW_LEVEL_BITS * (level - 1));
	if (e & (size - 1) & VK_WALK_PTE_ADDR & ~VK_WALK_PTE_PAT_LARGE)
		goto fault_rsvd;

	rights = 0;
	if (acc & VK_WALK_PTE_W)
		rights |= VK_WALK_RIGHT_W;
	if (acc & VK_WALK_PTE_U)
		rights |= VK_WALK_RIGHT_U;
	if (!(acc & VK_WALK_PTE_NX))
		rights |= VK_WALK_RIGHT_X;
	w->gpa = (e & VK_WALK_PTE_ADDR & ~(size - 1)) | (la & (size - 1));
	w->page_size = size;
	w->rights = rights;
	w->key = (__u32)((e & VK_WALK_PTE_KEY) >> VK_WALK_PTE_KEY_SHIFT);

	/* A user-mode access to a supervisor-mode address: nothing, no key. */
	if (user && !(rights & VK_WALK_RIGHT_U))
		return pw_fault(w, ec | VK_WALK_PFEC_P);

	smap = (s->cr4 & VK_WALK_CR4_SMAP) && !user &&
	       (s->cpl == 3 || !(s->rflags & VK_WALK_RFLAGS_AC) ||
		(implicit && !(s->quirks & VK_WALK_QUIRK_IMPLICIT_SMAP_AC)));
	allowed = 0;
	if (!smap || !(rights & VK_WALK_RIGHT_U)) {
		allowed |= VK_WALK_ALLOW_READ;
		if ((rights & VK_WALK_RIGHT_W) || !(user || wp))
			allowed |= VK_WALK_ALLOW_WRITE;
	}
	if ((rights & VK_WALK_RIGHT_X) &&
	    (user || !((s->cr4 & VK_WALK_CR4_SMEP) && (rights & VK_WALK_RIGHT_U))))
		allowed |= VK_WALK_ALLOW_FETCH;

	if (rights & VK_WALK_RIGHT_U)
		pkr = (s->cr4 & VK_WALK_CR4_PKE) ? s->pkru : 0;
	else
		pkr = (s->cr4 & VK_WALK_CR4_PKS) ? s->pkrs : 0;
	key_allow = pw_key_rights(pkr, w->key, user, wp);
	w->allowed = allowed & key_allow;
	if (!(key_allow & (1u << type)))
		return pw_fault(w, ec | VK_WALK_PFEC_P | VK_WALK_PFEC_PK);
	if (!(allowed & (1u << type)))
		return pw_fault(w, ec | VK_WALK_PFEC_P);
	return pw_done(w, VK_WALK_OK);

fault_rsvd:
	ec |= VK_WALK_PFEC_RSVD;
	if (!(s->quirks & VK_WALK_QUIRK_RSVD_NO_P))
		ec |= VK_WALK_PFEC_P;
	return pw_fault(w, ec);
}
