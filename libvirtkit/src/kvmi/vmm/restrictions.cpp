// SPDX-License-Identifier: MIT
/*
 * Page restrictions: SET_PAGE_ACCESS without W and SET_PAGE_WRITE_BITMAP
 * (SPP on by CONTROL_SPP or by the first bitmap) become sub-page
 * protection maps (virtkit/spp.hpp):
 * a page without W gets map 0, a page with a write bitmap gets the bitmap.
 * A guest write the maps block reaches on_spp_violation() on the vCPU's
 * thread, which raises the PF event and performs the write once
 * (CONTINUE), re-checks the rights (RETRY) or crashes the vCPU (CRASH).
 *
 * A page without R (and so without W) is also hidden: the memory map takes
 * it out of every memslot, so that every guest access to it exits as MMIO.
 * Reads come to on_mmio_read() (the SPP engine passes reads on), which
 * raises the PF event with access R and completes the read from guest
 * memory; writes are MMIO writes on RAM with map 0, which the SPP engine
 * decides as for any write-protected page - also with virtkit.ko, which
 * leaves writes to pages without a memslot to userspace.
 *
 * A command is validated whole before anything changes, and applied all
 * or nothing: SubpageProtection::set_access and the hiding are all or
 * nothing per call, and if a later step fails the earlier ones are put
 * back.
 */
#include "kvmi/vmm/server.hpp"

#include <algorithm>

#include <virtkit/error.hpp>
#include <virtkit/memory.hpp>

namespace virtkit::detail {

namespace {

constexpr std::uint8_t access_rwx =
	KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_W | KVMI_PAGE_ACCESS_X;

} // namespace

/*
 * Access bits: R, W, X and SVE (#VE suppression; there is no #VE here, so it
 * is accepted and means nothing). Execute restrictions (no X) are not
 * possible on stock KVM: -KVMI_EOPNOTSUPP. W without R is not a valid EPT
 * combination: -KVMI_EINVAL.
 */
int IntrospectionServer::set_page_access(std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_set_page_access>(p);
	if (!VK_KVMI_ZERO(c.padding))
		return -KVMI_EINVAL;
	if (c.view != 0)
		return -KVMI_EOPNOTSUPP; /* EPT views */
	std::map<std::uint64_t, std::uint8_t> want;
	for (std::size_t i = 0; i < c.count; i++) {
		auto e = kvmi::load<kvmi_page_access_entry>(
			p, sizeof(c) + i * sizeof(kvmi_page_access_entry));
		if (!VK_KVMI_ZERO(e.padding1) || !VK_KVMI_ZERO(e.padding2) ||
		    !VK_KVMI_ZERO(e.padding3) || (e.access & ~(access_rwx | KVMI_PAGE_ACCESS_SVE)))
			return -KVMI_EINVAL;
		const std::uint8_t a = e.access & access_rwx;
		if ((a & KVMI_PAGE_ACCESS_W) && !(a & KVMI_PAGE_ACCESS_R))
			return -KVMI_EINVAL;
		if (!(a & KVMI_PAGE_ACCESS_X))
			return -KVMI_EOPNOTSUPP;
		const std::uint64_t gfn = e.gpa / kvmi::page_size;
		if (!vm_.memory().contains(gfn * kvmi::page_size, kvmi::page_size))
			return -KVMI_EINVAL;
		want[gfn] = a; /* a later entry for the same page wins */
	}
	std::lock_guard lock(restr_mu_);
	std::map<std::uint64_t, KvmiPage> changes;
	for (auto [gfn, a] : want) {
		auto it = pages_.find(gfn);
		KvmiPage pg = it == pages_.end() ? KvmiPage{} : it->second;
		pg.access = a;
		/*
		 * In KVMI, W and the write bitmap are one permission: W set
		 * makes every sub-page writable (a bitmap set earlier goes),
		 * W clear none of them.
		 */
		pg.bitmap = (a & KVMI_PAGE_ACCESS_W) ? SubpageProtection::all_writable : 0;
		changes[gfn] = pg;
	}
	return apply_pages_locked(changes);
}

int IntrospectionServer::control_spp(std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_control_spp>(p);
	if (c.enable > 1 || !VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2) ||
	    !VK_KVMI_ZERO(c.padding3))
		return -KVMI_EINVAL;
	std::lock_guard lock(restr_mu_);
	if (c.enable)
		return enable_spp_locked();
	/* Disabling drops every write bitmap; W restrictions stay. */
	std::map<std::uint64_t, KvmiPage> changes;
	for (auto &[gfn, pg] : pages_) {
		KvmiPage n = pg;
		n.bitmap = SubpageProtection::all_writable;
		changes[gfn] = n;
	}
	if (int err = apply_pages_locked(changes))
		return err;
	spp_control_ = SppControl::disabled;
	return 0;
}

int IntrospectionServer::enable_spp_locked()
{
	try {
		SubpageProtection::enable(vm_); /* fails here, not at the first bitmap */
	} catch (const Error &) {
		return -KVMI_EOPNOTSUPP;
	}
	spp_control_ = SppControl::enabled;
	return 0;
}

int IntrospectionServer::set_page_write_bitmap(std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_set_page_write_bitmap>(p);
	if (!VK_KVMI_ZERO(c.padding))
		return -KVMI_EINVAL;
	if (c.view != 0)
		return -KVMI_EOPNOTSUPP;
	std::map<std::uint64_t, std::uint32_t> want;
	for (std::size_t i = 0; i < c.count; i++) {
		auto e = kvmi::load<kvmi_page_write_bitmap_entry>(
			p, sizeof(c) + i * sizeof(kvmi_page_write_bitmap_entry));
		if (!VK_KVMI_ZERO(e.padding))
			return -KVMI_EINVAL;
		const std::uint64_t gfn = e.gpa / kvmi::page_size;
		if (!vm_.memory().contains(gfn * kvmi::page_size, kvmi::page_size))
			return -KVMI_EINVAL;
		want[gfn] = e.bitmap;
	}
	std::lock_guard lock(restr_mu_);
	if (spp_control_ == SppControl::disabled)
		return -KVMI_EOPNOTSUPP; /* the tool turned it off: CONTROL_SPP{enable=1} first */
	if (spp_control_ == SppControl::unset)
		if (int err = enable_spp_locked())
			return err;
	std::map<std::uint64_t, KvmiPage> changes;
	for (auto [gfn, bitmap] : want) {
		auto it = pages_.find(gfn);
		KvmiPage pg = it == pages_.end() ? KvmiPage{} : it->second;
		pg.bitmap = bitmap;
		/*
		 * And the other way round: a bitmap with writable sub-pages
		 * gives back W (the map honours the bitmap only with W), an
		 * empty one takes it. A page without R keeps no W: W without
		 * R is no valid permission, the page stays write-protected.
		 */
		if (pg.access & KVMI_PAGE_ACCESS_R) {
			if (bitmap)
				pg.access |= KVMI_PAGE_ACCESS_W;
			else
				pg.access &= ~KVMI_PAGE_ACCESS_W;
		}
		changes[gfn] = pg;
	}
	return apply_pages_locked(changes);
}

int IntrospectionServer::apply_pages_locked(const std::map<std::uint64_t, KvmiPage> &changes)
{
	/* The pages whose SPP map changes, in runs of consecutive gfns. */
	struct Run {
		std::uint64_t gfn;
		std::vector<std::uint32_t> maps, old;
	};
	std::vector<Run> runs;
	/* The pages that are hidden or shown (every page without R has map 0). */
	std::map<std::uint64_t, bool> hide;
	for (auto &[gfn, pg] : changes) {
		auto it = pages_.find(gfn);
		const KvmiPage old = it == pages_.end() ? KvmiPage{} : it->second;
		if (old.hidden() != pg.hidden())
			hide[gfn] = pg.hidden();
		if (old.map() == pg.map())
			continue;
		if (runs.empty() || runs.back().gfn + runs.back().maps.size() != gfn)
			runs.push_back({gfn, {}, {}});
		runs.back().maps.push_back(pg.map());
		runs.back().old.push_back(old.map());
	}
	/* Put back the first n runs (after a later step failed). */
	auto undo_runs = [&](std::size_t n) {
		for (std::size_t j = 0; j < n; j++) {
			try {
				spp_->set_access(runs[j].gfn, runs[j].old);
			} catch (const Error &) {
			}
		}
	};
	if (!runs.empty()) {
		SubpageProtection *spp;
		try {
			spp = &SubpageProtection::enable(vm_);
		} catch (const Error &) {
			return -KVMI_EOPNOTSUPP;
		}
		if (!spp_) {
			std::weak_ptr<IntrospectionServer> weak = weak_from_this();
			spp->on_violation([weak](Vcpu &v, const SppViolation &viol) {
				auto self = weak.lock();
				return self ? self->on_spp_violation(v, viol) : SppDecision::drop;
			});
			spp_ = spp;
		}
		for (std::size_t i = 0; i < runs.size(); i++) {
			try {
				spp->set_access(runs[i].gfn, runs[i].maps);
			} catch (const Error &e) {
				undo_runs(i);
				return kvmi_error(e.err());
			}
		}
	}
	/*
	 * After the maps: a page is hidden only once its map is 0. Writes to
	 * a hidden page are MMIO writes on RAM, which the SPP engine performs
	 * wherever the map allows them.
	 */
	if (!hide.empty()) {
		try {
			set_hidden_locked(hide);
		} catch (const Error &e) {
			undo_runs(runs.size());
			return kvmi_error(e.err());
		}
	}
	for (auto &[gfn, pg] : changes) {
		if (pg.unrestricted() && pg.access == access_rwx)
			pages_.erase(gfn);
		else
			pages_[gfn] = pg;
	}
	return 0;
}

void IntrospectionServer::set_hidden_locked(const std::map<std::uint64_t, bool> &hidden)
{
	/* Runs of consecutive gfns: one memory map call (one vCPU pause) each. */
	std::vector<std::pair<std::uint64_t, std::uint64_t>> runs; /* first, count */
	for (auto &[gfn, h] : hidden) {
		if (runs.empty() || runs.back().first + runs.back().second != gfn)
			runs.push_back({gfn, 0});
		runs.back().second++;
	}
	auto &mem = RunControl::memory_map(vm_);
	auto lock = mem.lock();
	std::size_t done = 0;
	try {
		for (; done < runs.size(); done++)
			mem.set_hidden_locked(runs[done].first, runs[done].second,
					      [&](std::uint64_t g) { return hidden.at(g); });
	} catch (const Error &) {
		while (done--) {
			try {
				mem.set_hidden_locked(runs[done].first, runs[done].second,
						      [&](std::uint64_t g) { return !hidden.at(g); });
			} catch (const Error &) {
			}
		}
		throw;
	}
}

namespace {

/* Whether maps allow every byte of [gpa, gpa + size). */
template <class MapOf> bool write_allowed(std::uint64_t gpa, std::uint32_t size, const MapOf &map_of)
{
	for (std::uint64_t a = gpa; a < gpa + size;) {
		const std::uint64_t gfn = a / kvmi::page_size;
		const std::uint32_t sub = (a % kvmi::page_size) / SubpageProtection::subpage_size;
		if (!(map_of(gfn) >> sub & 1))
			return false;
		a = (a / SubpageProtection::subpage_size + 1) * SubpageProtection::subpage_size;
	}
	return true;
}

} // namespace

bool IntrospectionServer::pf_allows(Vcpu &vcpu, const kvmi_event_pf &pf,
				    const std::function<bool()> &allowed)
{
	if (vcpu.id() > 0xffff)
		return true; /* KVMI addresses vCPUs with 16 bits */
	const auto id = static_cast<std::uint16_t>(vcpu.id());
	for (;;) {
		if (!wants(id, KVMI_EVENT_PF))
			return true;
		auto out = raise(id, &vcpu, KVMI_EVENT_PF, std::as_bytes(std::span(&pf, 1)));
		switch (out.action) {
		case KVMI_EVENT_ACTION_RETRY:
			if (allowed())
				return true;
			break; /* still blocked: ask again */
		case KVMI_EVENT_ACTION_CRASH:
			return false; /* raise() marked the crash */
		default:
			return true;
		}
	}
}

/*
 * A blocked guest write (vCPU thread). Pages the tool did not restrict are
 * the VMM's own protection: dropped, as without a handler.
 */
SppDecision IntrospectionServer::on_spp_violation(Vcpu &vcpu, const SppViolation &v)
{
	auto map_of = [this](std::uint64_t gfn) {
		auto it = pages_.find(gfn);
		return it == pages_.end() ? SubpageProtection::all_writable : it->second.map();
	};
	{
		std::lock_guard lock(restr_mu_);
		if (map_of(v.gpa / kvmi::page_size) == SubpageProtection::all_writable)
			return SppDecision::drop;
	}
	kvmi_event_pf pf{};
	/* The write's own address when it starts in the blocked page (as an EPT violation). */
	pf.gpa = v.write_gpa / kvmi::page_size == v.gpa / kvmi::page_size ? v.write_gpa : v.gpa;
	pf.gva = 0; /* not known on this backend */
	pf.access = KVMI_PAGE_ACCESS_W;
	return pf_allows(vcpu, pf,
			 [&] {
				 std::lock_guard lock(restr_mu_);
				 return write_allowed(v.write_gpa, v.write_size, map_of);
			 })
		       ? SppDecision::allow_once
		       : SppDecision::drop;
}

bool IntrospectionServer::read_blocked(std::uint64_t gpa)
{
	std::lock_guard lock(restr_mu_);
	auto it = pages_.find(gpa / kvmi::page_size);
	return it != pages_.end() && it->second.hidden();
}

/*
 * A guest read of a hidden page (vCPU thread). KVM reports it as MMIO, in
 * pieces of at most 8 bytes, one exit each: every piece is one PF event.
 * Whatever the instruction does next (the write of a read-modify-write,
 * the next piece) is a new exit that goes through every handler again.
 */
ExitAction IntrospectionServer::on_mmio_read(Vcpu &vcpu, const MmioExit &m)
{
	if (m.is_write() || m.data.empty() || !read_blocked(m.gpa))
		return ExitAction::pass;
	kvmi_event_pf pf{};
	pf.gpa = m.gpa;
	pf.gva = 0; /* not known on this backend */
	pf.access = KVMI_PAGE_ACCESS_R;
	if (!pf_allows(vcpu, pf, [&] { return !read_blocked(m.gpa); })) {
		/* CRASH: nothing is read; before_entry() ends the vCPU. */
		std::fill(m.data.begin(), m.data.end(), std::byte{0});
		return ExitAction::resume;
	}
	auto &mem = RunControl::memory_map(vm_);
	auto lock = mem.lock_shared();
	if (!mem.writable_ram_locked(m.gpa, m.data.size()))
		return ExitAction::pass; /* the VMM removed the region meanwhile */
	mem.guest_read_locked(m.gpa, m.data.data(), static_cast<std::uint32_t>(m.data.size()));
	return ExitAction::resume;
}

void IntrospectionServer::remove_restrictions() noexcept
{
	std::lock_guard lock(restr_mu_);
	std::map<std::uint64_t, KvmiPage> changes;
	for (auto &[gfn, pg] : pages_)
		changes[gfn] = KvmiPage{};
	int err;
	try {
		err = apply_pages_locked(changes);
	} catch (...) {
		err = -KVMI_ENOMEM;
	}
	if (err) {
		/* All at once failed: page by page, as far as it goes. */
		for (auto &[gfn, pg] : pages_) {
			try {
				if (spp_)
					spp_->set_access(gfn, {SubpageProtection::all_writable});
				if (pg.hidden())
					set_hidden_locked({{gfn, false}});
			} catch (const Error &) {
			}
		}
	}
	pages_.clear();
	spp_control_ = SppControl::unset;
	if (spp_) {
		spp_->on_violation(nullptr);
		spp_ = nullptr;
	}
}

} // namespace virtkit::detail
