// SPDX-License-Identifier: MIT
#include "access_matrix.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>
#include <tuple>

#include "page_walk.h"

namespace virtkit::page_walk_matrix {

namespace {

using u32 = __u32;
using u64 = __u64;

constexpr u64 page = 4096;
constexpr u64 P = VK_WALK_PTE_P, W = VK_WALK_PTE_W, U = VK_WALK_PTE_U, PS = VK_WALK_PTE_PS,
	      NX = VK_WALK_PTE_NX, ADDR = VK_WALK_PTE_ADDR;
/* Bits 62:59 of a non-leaf entry are ignored, not a key: a walk must not
 * read them as one. */
constexpr u64 nonleaf_noise = 0xaull << VK_WALK_PTE_KEY_SHIFT;
constexpr u64 reserved_bit51 = 1ull << 51;
/* The probe image's fixed control bits (probe/main.c): CR0.PE|ET, CR4.PAE,
 * EFER.LME. The engine does not read them; they make the state whole. */
constexpr u64 cr0_pe_et = 0x11, cr4_pae = 0x20, efer_lme = 0x100;

/* The probe image's own pages carry key infra_key[root]; cases on key k
 * use a root whose key is not k, and never restrict it. */
constexpr unsigned int infra_key[2] = {15, 14};

u64 key_bits(unsigned int key) { return static_cast<u64>(key) << VK_WALK_PTE_KEY_SHIFT; }

enum class Kind { user, sup_leaf, sup_nonleaf };	/* U/S */
enum class Rw { writable, ro_leaf, ro_nonleaf };	/* R/W */
enum class Nx { none, leaf, nonleaf };			/* XD */
enum class Size { k4 = 1, m2 = 2, g1 = 3 };		/* the leaf's level */
enum class Rsvd { none, leaf51, pd51, pdpt51, pml4_51, pml5_51, large13, top_ps };

const char *kind_name(Kind k)
{
	static const char *const n[] = {"user", "supervisor (U/S=0 at the leaf)",
					"supervisor (U/S=0 above the leaf)"};
	return n[static_cast<int>(k)];
}

const char *rw_name(Rw r)
{
	static const char *const n[] = {"writable", "read-only at the leaf",
					"read-only above the leaf"};
	return n[static_cast<int>(r)];
}

const char *nx_name(Nx x)
{
	static const char *const n[] = {"executable", "XD at the leaf", "XD at the top level"};
	return n[static_cast<int>(x)];
}

const char *size_name(Size s)
{
	return s == Size::k4 ? "4K" : s == Size::m2 ? "2M" : "1G";
}

const char *rsvd_name(Rsvd r)
{
	static const char *const n[] = {"",
					", bit 51 set in the PTE",
					", bit 51 set in the PDE",
					", bit 51 set in the PDPTE",
					", bit 51 set in the PML4E",
					", bit 51 set in the PML5E",
					", bit 13 set in the large leaf",
					", PS set in the top-level entry"};
	return n[static_cast<int>(r)];
}

struct ProbeSpec {
	Size size = Size::k4;
	unsigned int key = 0;
	Kind kind = Kind::user;
	Rw rw = Rw::writable;
	Nx nx = Nx::none;
	Rsvd rsvd = Rsvd::none;
};

/* One state and access; pw_case.ctl and the keyset. */
struct State {
	unsigned int access = PW_ACC_READ;
	bool cpl3 = false, wp = false, smep = false, smap = false, ac = false;
	bool pke = false, pks = false, nxe = true;
	u32 pkru = 0, pkrs = 0;
};

class Builder {
public:
	explicit Builder(bool la57) : la57_(la57), top_(la57 ? 5 : 4)
	{
		image_.resize(page); /* the header */
		for (int r = 0; r < 2; r++) {
			roots_[r] = alloc();
			/* The identity map's tables: its PD is filled by finish(). */
			u64 t = roots_[r];
			for (int level = top_; level > 2; level--) {
				u64 next = alloc();
				set(t, 0, next | P | W | U);
				t = next;
			}
			id_pd_[r] = t;
			id_pt_[r] = alloc();
			set(id_pd_[r], 0, id_pt_[r] | P | W | U);
			for (u64 i = 0; i < 512; i++) {
				u64 pa = i * page;
				bool user = pa == PW_USER_BASE || pa == PW_USER_STACK;
				set(id_pt_[r], i, pa | P | W | (user ? U : 0) | key_bits(infra_key[r]));
			}
		}
		keyset(0, 0);
	}

	/* A mapped probe: the address to access and its index in Matrix::probes. */
	struct Probe {
		u64 la;
		u32 index;
	};
	Probe probe(const ProbeSpec &p, std::string what);
	/* A probe that maps nothing: an address no walk reaches. */
	u32 unmapped(std::string what)
	{
		probes_.push_back(std::move(what));
		probe_key_.push_back(0);
		return probes_.size() - 1;
	}
	u32 keyset(u32 pkru, u32 pkrs);
	void add(Set set, u64 la, u32 probe, const State &s, const char *name = nullptr,
		 bool expect_fault = false);
	Matrix finish(std::vector<Set> sets);

	bool la57() const { return la57_; }

private:
	u64 alloc()
	{
		u64 gpa = PW_CASES_BASE + image_.size();
		image_.resize(image_.size() + page);
		return gpa;
	}
	u64 get(u64 table, u64 i) const
	{
		u64 v;
		std::memcpy(&v, &image_[table - PW_CASES_BASE + 8 * i], 8);
		return v;
	}
	void set(u64 table, u64 i, u64 v)
	{
		std::memcpy(&image_[table - PW_CASES_BASE + 8 * i], &v, 8);
	}

	struct Pending {
		pw_case c;
		CaseInfo info;
	};

	bool la57_;
	int top_;
	std::vector<std::byte> image_;
	u64 roots_[2];
	u64 id_pd_[2], id_pt_[2];
	/* Probe regions: one top-level entry per shape of the non-leaf entries. */
	std::map<std::vector<u64>, std::pair<u64, u64>> regions_; /* -> top index, next slot */
	u64 next_top_ = 1;
	std::vector<std::string> probes_;
	std::vector<unsigned int> probe_key_;
	std::vector<pw_keyset> keysets_;
	std::map<std::pair<u32, u32>, u32> keyset_index_;
	std::vector<Pending> pending_;
};

u32 Builder::keyset(u32 pkru, u32 pkrs)
{
	auto [it, added] = keyset_index_.try_emplace({pkru, pkrs}, keysets_.size());
	if (added) {
		if (keysets_.size() == PW_MAX_KEYSETS)
			throw std::logic_error("access matrix: too many PKRU/PKRS pairs");
		keysets_.push_back({pkru, pkrs});
	}
	return it->second;
}

/*
 * Map one probed page (all of them map PW_PROBE_PHYS) and return the
 * address to probe. The non-leaf entries above it are shared with every
 * probe whose non-leaf entries have the same flags.
 */
Builder::Probe Builder::probe(const ProbeSpec &p, std::string what)
{
	const int leaf = static_cast<int>(p.size);
	std::vector<u64> flags(top_ + 1, 0);
	for (int level = leaf + 1; level <= top_; level++)
		flags[level] = P | W | U | nonleaf_noise;
	/* Where the non-leaf variations go: U/S two levels up (capped at the
	 * top), R/W one level up, XD at the top. */
	const int u_level = std::min(leaf + 2, top_), w_level = leaf + 1;
	if (p.kind == Kind::sup_nonleaf)
		flags[u_level] &= ~U;
	if (p.rw == Rw::ro_nonleaf)
		flags[w_level] &= ~W;
	if (p.nx == Nx::nonleaf)
		flags[top_] |= NX;
	switch (p.rsvd) {
	case Rsvd::pd51: flags[2] |= reserved_bit51; break;
	case Rsvd::pdpt51: flags[3] |= reserved_bit51; break;
	case Rsvd::pml4_51: flags[4] |= reserved_bit51; break;
	case Rsvd::pml5_51: flags[5] |= reserved_bit51; break;
	case Rsvd::top_ps: flags[top_] |= PS; break;
	default: break;
	}
	u64 leaf_flags = P | key_bits(p.key) | (leaf > 1 ? PS : 0);
	if (p.kind != Kind::sup_leaf)
		leaf_flags |= U;
	if (p.rw != Rw::ro_leaf)
		leaf_flags |= W;
	if (p.nx == Nx::leaf)
		leaf_flags |= NX;
	if (p.rsvd == Rsvd::leaf51)
		leaf_flags |= reserved_bit51;
	if (p.rsvd == Rsvd::large13)
		leaf_flags |= 1ull << 13;
	/* The leaf's frame: every probe reaches PW_PROBE_PHYS. */
	const u64 leaf_size = 1ull << (12 + 9 * (leaf - 1));
	const u64 frame = PW_PROBE_PHYS & ~(leaf_size - 1);
	const u64 offset = PW_PROBE_PHYS - frame;

	std::vector<u64> shape(flags.begin() + leaf + 1, flags.end());
	shape.push_back(static_cast<u64>(leaf));
	auto [it, added] = regions_.try_emplace(shape, std::pair<u64, u64>{next_top_, 0});
	if (added && ++next_top_ >= 256)
		throw std::logic_error("access matrix: out of top-level entries");
	const int top_shift = 12 + 9 * (top_ - 1);
	u64 la = it->second.first << top_shift | it->second.second++ << (12 + 9 * (leaf - 1));
	if (it->second.second > (1ull << 9 * (top_ - leaf)))
		throw std::logic_error("access matrix: probe region full");

	/* Walk down from both roots' top tables; the probe tables are shared. */
	u64 table = roots_[0];
	for (int level = top_; level > leaf; level--) {
		u64 idx = la >> (12 + 9 * (level - 1)) & 511;
		u64 e = get(table, idx);
		if (e == 0) {
			u64 next = alloc();
			e = next | flags[level];
			set(table, idx, e);
			if (level == top_)
				set(roots_[1], idx, e);
		} else if ((e & ~ADDR) != flags[level]) {
			throw std::logic_error("access matrix: a shared entry's flags differ");
		}
		table = e & ADDR;
		/* A reserved bit in an address field position: keep the address. */
		if (flags[level] & reserved_bit51)
			table &= ~reserved_bit51;
	}
	u64 idx = la >> (12 + 9 * (leaf - 1)) & 511;
	if (get(table, idx) != 0)
		throw std::logic_error("access matrix: probe slot taken");
	set(table, idx, frame | leaf_flags);
	probes_.push_back(std::string(size_name(p.size)) + " page, key " + std::to_string(p.key) +
			  ", " + kind_name(p.kind) + ", " + rw_name(p.rw) + ", " + nx_name(p.nx) +
			  rsvd_name(p.rsvd) + (what.empty() ? "" : ", " + what));
	probe_key_.push_back(p.key);
	return {la + offset, static_cast<u32>(probes_.size() - 1)};
}

void Builder::add(Set set, u64 la, u32 probe, const State &s, const char *name, bool expect_fault)
{
	u32 ctl = s.access;
	ctl |= s.cpl3 ? PW_CTL_CPL3 : 0;
	ctl |= s.wp ? PW_CTL_WP : 0;
	ctl |= s.smep ? PW_CTL_SMEP : 0;
	ctl |= s.smap ? PW_CTL_SMAP : 0;
	ctl |= s.ac ? PW_CTL_AC : 0;
	ctl |= s.pke ? PW_CTL_PKE : 0;
	ctl |= s.pks ? PW_CTL_PKS : 0;
	ctl |= s.nxe ? PW_CTL_NXE : 0;
	ctl |= (probe_key_[probe] == infra_key[0] ? 1u : 0u) << PW_CTL_ROOT_SHIFT;
	ctl |= keyset(s.pkru, s.pkrs) << PW_CTL_KEYS_SHIFT;
	pending_.push_back({pw_case{la, ctl, static_cast<u32>(pending_.size())},
			    CaseInfo{set, probe, name, expect_fault}});
}

Matrix Builder::finish(std::vector<Set> sets)
{
	/* Group the cases by state: the image writes a register only when it
	 * changes, and under KVM each write is an exit. */
	auto state_of = [](const pw_case &c) {
		return std::make_tuple(c.ctl & (PW_CTL_NXE | PW_CTL_KEYS_MASK | PW_CTL_WP),
				       c.ctl & ~(PW_ACC_MASK | PW_CTL_CPL3 | PW_CTL_AC), c.la,
				       c.ctl);
	};
	std::stable_sort(pending_.begin(), pending_.end(), [&](const Pending &a, const Pending &b) {
		return state_of(a.c) < state_of(b.c);
	});

	const u64 n = pending_.size();
	u64 cases = PW_CASES_BASE + image_.size();
	image_.resize(image_.size() + (n * sizeof(pw_case) + page - 1) / page * page);
	u64 results = PW_CASES_BASE + image_.size();
	image_.resize(image_.size() + (n * sizeof(pw_result) + page - 1) / page * page);

	/* The identity map's 2 MiB pages, up to the end of the image. */
	const u64 end = PW_CASES_BASE + image_.size();
	if (end > 512 * (2ull << 20))
		throw std::logic_error("access matrix: image larger than 1 GiB");
	for (int r = 0; r < 2; r++)
		for (u64 i = 1; i * (2ull << 20) < end; i++)
			set(id_pd_[r], i, i * (2ull << 20) | P | W | PS | key_bits(infra_key[r]));

	Matrix m;
	m.la57 = la57_;
	m.sets = std::move(sets);
	m.probes = probes_;
	m.info.reserve(n);
	for (u64 i = 0; i < n; i++) {
		std::memcpy(&image_[cases - PW_CASES_BASE + i * sizeof(pw_case)], &pending_[i].c,
			    sizeof(pw_case));
		m.info.push_back(pending_[i].info);
	}
	pw_header h{};
	h.magic = PW_MAGIC;
	h.header_size = sizeof(h);
	h.la57 = la57_;
	h.roots[0] = roots_[0];
	h.roots[1] = roots_[1];
	h.cases = cases;
	h.results = results;
	h.ncases = n;
	std::copy(keysets_.begin(), keysets_.end(), h.keys);
	std::memcpy(image_.data(), &h, sizeof(h));
	m.image = std::move(image_);
	return m;
}

/* Key k's AD/WD bits in PKRU and the complement in PKRS (so that reading
 * the wrong register shows); every other key but the image's is denied
 * everything (so that reading the wrong key shows). */
std::pair<u32, u32> key_rights(unsigned int k, unsigned int adwd)
{
	const unsigned int infra = infra_key[k == infra_key[0] ? 1 : 0];
	u32 pkru = 0, pkrs = 0;
	for (unsigned int j = 0; j < 16; j++) {
		if (j == infra)
			continue;
		u32 u = j == k ? adwd : 3, s = j == k ? adwd ^ 3 : 3;
		pkru |= u << 2 * j;
		pkrs |= s << 2 * j;
	}
	return {pkru, pkrs};
}

constexpr unsigned int all_access[] = {PW_ACC_READ, PW_ACC_WRITE, PW_ACC_FETCH,
				       PW_ACC_IMPLICIT_READ, PW_ACC_IMPLICIT_WRITE};

/* SMAP off; SMAP with AC clear; SMAP with AC set. */
void for_smap(State s, auto fn)
{
	for (int v = 0; v < 3; v++) {
		s.smap = v > 0;
		s.ac = v == 2;
		fn(s);
	}
}

/*
 * Every key state for probed key k: AD/WD (in PKRU, the complement in PKRS)
 * x CR0.WP x access x CPL x CR4.PKE/PKS (PKE only without PKS).
 */
void for_key_states(unsigned int k, bool pks, auto fn)
{
	for (unsigned int adwd = 0; adwd < 4; adwd++) {
		State s;
		std::tie(s.pkru, s.pkrs) = key_rights(k, adwd);
		for (int wp = 0; wp < 2; wp++)
		for (unsigned int acc : all_access)
		for (int cpl3 = 0; cpl3 < 2; cpl3++)
		for (int pk = 0; pk < (pks ? 4 : 2); pk++) {
			s.wp = wp;
			s.access = acc;
			s.cpl3 = cpl3;
			s.pke = pk & 1;
			s.pks = pk & 2;
			fn(s);
		}
	}
}

void add_keys(Builder &b, bool pks)
{
	for (unsigned int k = 0; k < 16; k++)
		for (Kind kind : {Kind::user, Kind::sup_leaf, Kind::sup_nonleaf})
			for (Rw rw : {Rw::writable, Rw::ro_leaf}) {
				const auto [la, probe] =
					b.probe({Size::k4, k, kind, rw, Nx::none, Rsvd::none}, "");
				for_key_states(k, pks, [&](const State &s) {
					for_smap(s, [&](const State &t) {
						b.add(Set::keys, la, probe, t);
					});
				});
			}
}

void add_keys_large(Builder &b, bool pks)
{
	for (Size size : {Size::m2, Size::g1})
		for (unsigned int k = 0; k < 16; k++)
			for (Kind kind : {Kind::user, Kind::sup_leaf}) {
				const auto [la, probe] =
					b.probe({size, k, kind, Rw::writable, Nx::none, Rsvd::none}, "");
				for_key_states(k, pks, [&](const State &s) {
					b.add(Set::keys_large, la, probe, s);
				});
			}
}

void add_paging(Builder &b)
{
	for (Size size : {Size::k4, Size::m2, Size::g1})
	for (Kind kind : {Kind::user, Kind::sup_leaf, Kind::sup_nonleaf})
	for (Rw rw : {Rw::writable, Rw::ro_leaf, Rw::ro_nonleaf})
	for (Nx nx : {Nx::none, Nx::leaf, Nx::nonleaf}) {
		const auto [la, probe] = b.probe({size, 0, kind, rw, nx, Rsvd::none}, "");
		State s;
		for (int wp = 0; wp < 2; wp++)
		for (unsigned int acc : all_access)
		for (int cpl3 = 0; cpl3 < 2; cpl3++)
		for (int smep = 0; smep < 2; smep++)
		for (int nxe = 0; nxe < 2; nxe++) {
			s.wp = wp;
			s.access = acc;
			s.cpl3 = cpl3;
			s.smep = smep;
			s.nxe = nxe;
			for_smap(s, [&](const State &t) { b.add(Set::paging, la, probe, t); });
		}
	}
}

void add_reserved(Builder &b)
{
	std::vector<ProbeSpec> specs = {
		{Size::k4, 0, Kind::user, Rw::writable, Nx::none, Rsvd::leaf51},
		{Size::k4, 0, Kind::user, Rw::writable, Nx::none, Rsvd::pd51},
		{Size::k4, 0, Kind::user, Rw::writable, Nx::none, Rsvd::pdpt51},
		{Size::k4, 0, Kind::user, Rw::writable, Nx::none, Rsvd::pml4_51},
		{Size::m2, 0, Kind::user, Rw::writable, Nx::none, Rsvd::large13},
		{Size::g1, 0, Kind::user, Rw::writable, Nx::none, Rsvd::large13},
		{Size::k4, 0, Kind::user, Rw::writable, Nx::none, Rsvd::top_ps},
	};
	if (b.la57())
		specs.push_back({Size::k4, 0, Kind::user, Rw::writable, Nx::none, Rsvd::pml5_51});
	for (const ProbeSpec &p : specs) {
		const auto [la, probe] = b.probe(p, "");
		State s;
		for (unsigned int acc : all_access)
		for (int cpl3 = 0; cpl3 < 2; cpl3++)
		for (int nxe = 0; nxe < 2; nxe++) {
			s.access = acc;
			s.cpl3 = cpl3;
			s.nxe = nxe;
			s.wp = true;
			b.add(Set::reserved, la, probe, s);
		}
	}
}

void add_noncanonical(Builder &b)
{
	/* Canonical means bits 63:47 (63:56 with 5-level paging) all equal. */
	std::vector<u64> las = b.la57()
		? std::vector<u64>{0x0100000000000000ull, 0xfeffffffffffe000ull}
		: std::vector<u64>{0x0000800000000000ull, 0xffff7fffffffe000ull,
				   0x0001000000000000ull};
	for (u64 la : las) {
		/* A #GP comes before any walk. */
		u32 probe = b.unmapped("a non-canonical address");
		State s;
		/* The implicit accesses need an LDT based there: LLDT refuses it. */
		for (unsigned int acc : {PW_ACC_READ, PW_ACC_WRITE, PW_ACC_FETCH})
			for (int cpl3 = 0; cpl3 < 2; cpl3++) {
				s.access = acc;
				s.cpl3 = cpl3;
				b.add(Set::noncanonical, la, probe, s);
			}
	}
}

/* kvm-unit-tests x86/pks.c, in its order: key 2, PKRS AD = 0x10, WD = 0x20, CPL 0. */
struct PksScenario {
	const char *name;
	bool supervisor;
	unsigned int access;
	u32 pkrs;
	bool wp;
	bool fault;
};
constexpr PksScenario pks_scenarios[] = {
	{"write to supervisor page when pkrs is ad and wp == 1", true, PW_ACC_WRITE, 0x10, true, true},
	{"write to supervisor page when pkrs is ad and wp == 0", true, PW_ACC_WRITE, 0x10, false, true},
	{"write to supervisor page when pkrs is wd and wp == 1", true, PW_ACC_WRITE, 0x20, true, true},
	{"write to supervisor page when pkrs is wd and wp == 0", true, PW_ACC_WRITE, 0x20, false, false},
	{"write to user page when pkrs is wd and wp == 0", false, PW_ACC_WRITE, 0x20, false, false},
	{"write to user page when pkrs is wd and wp == 1", false, PW_ACC_WRITE, 0x20, true, false},
	{"read from user page when pkrs is ad", false, PW_ACC_READ, 0x10, false, false},
};

void add_pks_c(Builder &b)
{
	const auto sup = b.probe({Size::k4, 2, Kind::sup_leaf, Rw::writable, Nx::none, Rsvd::none},
				 "x86/pks.c's supervisor alias");
	const auto user = b.probe({Size::k4, 2, Kind::user, Rw::writable, Nx::none, Rsvd::none},
				  "x86/pks.c's user page");
	for (const PksScenario &sc : pks_scenarios) {
		State s;
		s.access = sc.access;
		s.pks = true;
		s.pkrs = sc.pkrs;
		s.wp = sc.wp;
		const auto &at = sc.supervisor ? sup : user;
		b.add(Set::pks_c, at.la, at.index, s, sc.name, sc.fault);
	}
}

const char *access_name(unsigned int a)
{
	static const char *const n[] = {"read", "write", "fetch", "implicit read",
					"implicit write"};
	return a <= PW_ACC_IMPLICIT_WRITE ? n[a] : "?";
}

/* The engine's features (VK_WALK_FEAT_*) for the CPUID the image saw (PW_FEAT_*). */
u32 engine_features(u32 pw)
{
	static const struct {
		u32 pw, engine;
	} map[] = {
		{PW_FEAT_NX, VK_WALK_FEAT_NX},	     {PW_FEAT_PAGE1GB, VK_WALK_FEAT_PAGE1GB},
		{PW_FEAT_SMEP, VK_WALK_FEAT_SMEP},   {PW_FEAT_SMAP, VK_WALK_FEAT_SMAP},
		{PW_FEAT_PKU, VK_WALK_FEAT_PKU},     {PW_FEAT_PKS, VK_WALK_FEAT_PKS},
		{PW_FEAT_LA57, VK_WALK_FEAT_LA57},
	};
	u32 f = 0;
	for (const auto &m : map)
		if (pw & m.pw)
			f |= m.engine;
	return f;
}

/* What the engine predicts for case c on a CPU with features (PW_FEAT_*). */
Outcome predict(const pw_header &h, const pw_case &c, u32 maxphyaddr, u32 features,
		unsigned int quirks, const vk_walk_mem &mem)
{
	const u32 ctl = c.ctl;
	const pw_keyset &k = h.keys[(ctl & PW_CTL_KEYS_MASK) >> PW_CTL_KEYS_SHIFT];
	vk_walk_state s{};
	s.cr0 = VK_WALK_CR0_PG | cr0_pe_et | (ctl & PW_CTL_WP ? VK_WALK_CR0_WP : 0);
	s.cr3 = h.roots[(ctl & PW_CTL_ROOT_MASK) >> PW_CTL_ROOT_SHIFT];
	s.cr4 = cr4_pae | (h.la57 ? VK_WALK_CR4_LA57 : 0) | (ctl & PW_CTL_SMEP ? VK_WALK_CR4_SMEP : 0) |
		(ctl & PW_CTL_SMAP ? VK_WALK_CR4_SMAP : 0) | (ctl & PW_CTL_PKE ? VK_WALK_CR4_PKE : 0) |
		(ctl & PW_CTL_PKS ? VK_WALK_CR4_PKS : 0);
	s.efer = efer_lme | VK_WALK_EFER_LMA | (ctl & PW_CTL_NXE ? VK_WALK_EFER_NXE : 0);
	s.rflags = 2 | (ctl & PW_CTL_AC ? VK_WALK_RFLAGS_AC : 0);
	s.pkru = k.pkru;
	s.pkrs = k.pkrs;
	s.cpl = ctl & PW_CTL_CPL3 ? 3 : 0;
	s.maxphyaddr = maxphyaddr;
	s.quirks = quirks;
	s.features = engine_features(features);

	auto walk = [&](u64 la, unsigned int access) {
		vk_walk w;
		int r = vk_walk_translate(&s, &mem, la, access, &w);
		if (r == VK_WALK_OK)
			return Outcome{};
		if (r == VK_WALK_PF)
			return Outcome{14, w.error_code};
		if (r == VK_WALK_GP)
			return Outcome{13, 0};
		throw std::logic_error("access matrix: the engine failed a walk (result " +
				       std::to_string(r) + ")");
	};
	const u64 desc = c.la + PW_PROBE_DESC;
	switch (ctl & PW_ACC_MASK) {
	case PW_ACC_READ: return walk(c.la, VK_WALK_READ);
	case PW_ACC_WRITE: return walk(c.la, VK_WALK_WRITE);
	case PW_ACC_FETCH: return walk(c.la, VK_WALK_FETCH);
	case PW_ACC_IMPLICIT_READ: return walk(desc, VK_WALK_READ | VK_WALK_IMPLICIT);
	default: {
		/* The descriptor is read, then its accessed bit written. */
		Outcome o = walk(desc, VK_WALK_READ | VK_WALK_IMPLICIT);
		return o.vector != PW_NO_FAULT ? o : walk(desc, VK_WALK_WRITE | VK_WALK_IMPLICIT);
	}
	}
}

struct ImageMem {
	std::span<const std::byte> image;
	static int read(void *ctx, u64 gpa, u64 *val)
	{
		auto *m = static_cast<const ImageMem *>(ctx);
		if (gpa < PW_CASES_BASE || gpa - PW_CASES_BASE > m->image.size() - 8)
			return -1;
		std::memcpy(val, &m->image[gpa - PW_CASES_BASE], 8);
		return 0;
	}
};

} // namespace

const char *set_name(Set s)
{
	switch (s) {
	case Set::keys: return "protection keys, 4K pages";
	case Set::keys_large: return "protection keys, 2M and 1G pages";
	case Set::paging: return "U/S, R/W, XD, WP, SMEP, SMAP, NXE (no keys)";
	case Set::reserved: return "reserved bits";
	case Set::noncanonical: return "non-canonical addresses";
	case Set::pks_c: return "kvm-unit-tests x86/pks.c";
	}
	return "?";
}

std::string describe(const Outcome &o)
{
	char buf[64];
	if (o.vector == PW_NO_FAULT)
		return "no fault";
	if (o.vector == 14)
		std::snprintf(buf, sizeof(buf), "#PF error code 0x%x", o.error_code);
	else if (o.vector == 13)
		std::snprintf(buf, sizeof(buf), "#GP(0x%x)", o.error_code);
	else
		std::snprintf(buf, sizeof(buf), "vector %u error code 0x%x", o.vector, o.error_code);
	return buf;
}

Matrix build_matrix(const Options &opts)
{
	Builder b(opts.la57);
	for (Set s : opts.sets) {
		switch (s) {
		case Set::keys: add_keys(b, opts.pks); break;
		case Set::keys_large: add_keys_large(b, opts.pks); break;
		case Set::paging: add_paging(b); break;
		case Set::reserved: add_reserved(b); break;
		case Set::noncanonical: add_noncanonical(b); break;
		case Set::pks_c:
			if (!opts.pks)
				throw std::logic_error("access matrix: x86/pks.c needs PKS");
			add_pks_c(b);
			break;
		}
	}
	return b.finish(opts.sets);
}

std::string Matrix::describe_case(std::size_t i) const
{
	pw_header h;
	pw_case c;
	std::memcpy(&h, image.data(), sizeof(h));
	std::memcpy(&c, &image[h.cases - PW_CASES_BASE + i * sizeof(pw_case)], sizeof(c));
	const pw_keyset &k = h.keys[(c.ctl & PW_CTL_KEYS_MASK) >> PW_CTL_KEYS_SHIFT];
	char buf[320];
	std::snprintf(buf, sizeof(buf),
		      "%s of %#llx at CPL%d; CR0.WP=%d CR4.SMEP=%d CR4.SMAP=%d EFLAGS.AC=%d "
		      "CR4.PKE=%d CR4.PKS=%d EFER.NXE=%d PKRU=%#x PKRS=%#x %s-level",
		      access_name(c.ctl & PW_ACC_MASK), static_cast<unsigned long long>(c.la),
		      c.ctl & PW_CTL_CPL3 ? 3 : 0, !!(c.ctl & PW_CTL_WP), !!(c.ctl & PW_CTL_SMEP),
		      !!(c.ctl & PW_CTL_SMAP), !!(c.ctl & PW_CTL_AC), !!(c.ctl & PW_CTL_PKE),
		      !!(c.ctl & PW_CTL_PKS), !!(c.ctl & PW_CTL_NXE), k.pkru, k.pkrs,
		      la57 ? "5" : "4");
	return probes[info[i].probe] + ": " + buf;
}

std::vector<std::string> outcome_summary(const Report &r)
{
	std::vector<std::pair<std::size_t, std::string>> v;
	for (const auto &[what, n] : r.outcomes)
		v.emplace_back(n, what);
	std::sort(v.begin(), v.end(), [](const auto &a, const auto &b) { return a.first > b.first; });
	std::vector<std::string> lines;
	for (const auto &[n, what] : v)
		lines.push_back(what + ": " + std::to_string(n));
	return lines;
}

Report compare(const Matrix &m, std::span<const std::byte> after, unsigned int quirks,
	       std::uint32_t implemented)
{
	pw_header h, out;
	std::memcpy(&h, m.image.data(), sizeof(h));
	if (after.size() < m.image.size())
		throw std::runtime_error("page-walk oracle: the image came back truncated");
	std::memcpy(&out, after.data(), sizeof(out));
	if (out.out.status == PW_EXIT_UNEXPECTED)
		throw std::runtime_error("page-walk oracle: the probe image took exception " +
					 std::to_string(out.out.vector) + " outside a probe, after " +
					 std::to_string(out.out.done) + " cases");
	if (out.out.status != PW_EXIT_OK || out.out.done != h.ncases)
		throw std::runtime_error("page-walk oracle: the probe image stopped with status " +
					 std::to_string(out.out.status) + " after " +
					 std::to_string(out.out.done) + " of " +
					 std::to_string(h.ncases) + " cases");
	Report rep;
	rep.features = out.out.features;
	rep.maxphyaddr = out.out.maxphyaddr;
	for (Set s : m.sets)
		rep.sets.push_back({s, 0, 0, 0});
	auto set_report = [&](Set s) -> SetReport & {
		for (auto &r : rep.sets)
			if (r.set == s)
				return r;
		throw std::logic_error("access matrix: case of an unknown set");
	};

	ImageMem im{m.image};
	vk_walk_mem mem{ImageMem::read, &im};
	for (std::size_t i = 0; i < h.ncases; i++) {
		pw_case c;
		pw_result r;
		std::memcpy(&c, &m.image[h.cases - PW_CASES_BASE + i * sizeof(c)], sizeof(c));
		std::memcpy(&r, &after[h.results - PW_CASES_BASE + i * sizeof(r)], sizeof(r));
		SetReport &sr = set_report(m.info[i].set);
		sr.cases++;
		rep.cases++;
		if (!(r.flags & PW_RES_RAN) || (r.flags & PW_RES_UNSUPPORTED)) {
			sr.not_run++;
			rep.not_run++;
			continue;
		}
		const Outcome want = predict(h, c, rep.maxphyaddr, rep.features | implemented, quirks, mem);
		const Outcome got{r.vector, r.vector == PW_NO_FAULT ? 0 : r.error_code};
		rep.outcomes[describe(got)]++;
		/* A #PF must be the probe's: CR2 in the probed page. */
		const bool ok = want == got && (got.vector != 14 || (r.flags & PW_RES_CR2_IN_PAGE));
		if (!ok) {
			sr.mismatches++;
			rep.mismatches++;
			if (rep.first_mismatches.size() < 20)
				rep.first_mismatches.push_back(
					m.describe_case(i) + ": engine " + describe(want) + ", CPU " +
					describe(got) +
					(got.vector == 14 && !(r.flags & PW_RES_CR2_IN_PAGE)
						 ? " (CR2 outside the probed page)"
						 : ""));
		}
		if (m.info[i].name)
			rep.named.push_back({m.info[i].name,
					     (want.vector != PW_NO_FAULT) == m.info[i].expect_fault,
					     (got.vector != PW_NO_FAULT) == m.info[i].expect_fault});
	}
	/* In x86/pks.c's order. */
	auto order = [](const NamedReport &n) {
		for (std::size_t i = 0; i < std::size(pks_scenarios); i++)
			if (n.name == pks_scenarios[i].name)
				return i;
		return std::size(pks_scenarios);
	};
	std::stable_sort(rep.named.begin(), rep.named.end(),
			 [&](const NamedReport &a, const NamedReport &b) { return order(a) < order(b); });
	return rep;
}

} // namespace virtkit::page_walk_matrix
