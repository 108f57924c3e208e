// SPDX-License-Identifier: MIT
/*
 * Session::map_guest_memory() and GuestMapping: guest RAM mapped read-only
 * into the tool, from the memfds the VMM passes with SCM_RIGHTS in answer to
 * VIRTKIT_KVMI_SHARE_MEMORY (uapi/linux/virtkit_kvmi.h).
 *
 * Everything the VMM sends is checked before it is mapped: the reply's
 * size against its count, the regions (page aligned, non-empty, sorted, not
 * overlapping, offset + size without overflow), the number of descriptors,
 * and each descriptor (a regular file at least offset + size long). A reply
 * that fails a check ends the session (EPROTO): the peer does not speak the
 * protocol. The descriptors are closed once mapped - the mappings keep the
 * files - and on every failure.
 */
#include <virtkit/introspect.hpp>

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "kvmi/tool/names.hpp"
#include "kvmi/tool/session_state.hpp"

namespace virtkit::introspect {

using namespace detail;

namespace detail {

struct MappedRegion {
	GuestMapping::Region region;
	void *base = nullptr;	/* what mmap() returned: host, page aligned */
	std::size_t length = 0;
};

struct MappingState {
	std::vector<MappedRegion> mapped; /* sorted by gpa */
	std::vector<GuestMapping::Region> regions;

	MappingState() = default;
	MappingState(const MappingState &) = delete;
	MappingState &operator=(const MappingState &) = delete;
	~MappingState()
	{
		for (auto &m : mapped)
			::munmap(m.base, m.length);
	}

	/* The region holding gpa, or nullptr. */
	const MappedRegion *find(std::uint64_t gpa) const noexcept
	{
		auto it = std::upper_bound(mapped.begin(), mapped.end(), gpa,
					   [](std::uint64_t a, const MappedRegion &m) {
						   return a < m.region.gpa;
					   });
		if (it == mapped.begin())
			return nullptr;
		--it;
		return gpa - it->region.gpa < it->region.size ? &*it : nullptr;
	}
};

} // namespace detail

namespace {

constexpr const char read_op[] = "GuestMapping::read";
constexpr const char view_op[] = "GuestMapping::view";
constexpr const char map_op[] = "VIRTKIT_KVMI_SHARE_MEMORY";

[[noreturn]] void outside(const char *op, std::uint64_t gpa, std::uint64_t size,
			  std::uint64_t bad)
{
	throw Error(op, EFAULT,
		    "gpa=" + hex(gpa) + " size=" + std::to_string(size) + ": " + hex(bad) +
			    " is not in the mapped guest RAM");
}

} // namespace

GuestMapping::GuestMapping() noexcept = default;
GuestMapping::GuestMapping(std::unique_ptr<detail::MappingState> s) noexcept
	: state_(std::move(s)) {}
GuestMapping::GuestMapping(GuestMapping &&) noexcept = default;
GuestMapping &GuestMapping::operator=(GuestMapping &&) noexcept = default;
GuestMapping::~GuestMapping() = default;

std::span<const GuestMapping::Region> GuestMapping::regions() const noexcept
{
	if (!state_)
		return {};
	return state_->regions;
}

void GuestMapping::read(std::uint64_t gpa, std::span<std::byte> out) const
{
	if (out.empty())
		return;
	if (!state_)
		outside(read_op, gpa, out.size(), gpa);
	if (gpa + out.size() - 1 < gpa)
		throw Error(read_op, EFAULT,
			    "gpa=" + hex(gpa) + " size=" + std::to_string(out.size()) +
				    ": past the end of the address space");
	/* Check the whole range first: nothing is copied from a bad one. */
	std::uint64_t at = gpa, left = out.size();
	const MappedRegion *first = nullptr;
	while (left) {
		const MappedRegion *m = state_->find(at);
		if (!m)
			outside(read_op, gpa, out.size(), at);
		if (!first)
			first = m;
		std::uint64_t n = std::min<std::uint64_t>(left, m->region.gpa + m->region.size - at);
		at += n, left -= n;
	}
	at = gpa, left = out.size();
	std::byte *dst = out.data();
	for (const MappedRegion *m = first; left; m++) {
		std::uint64_t off = at - m->region.gpa;
		std::uint64_t n = std::min<std::uint64_t>(left, m->region.size - off);
		std::memcpy(dst, static_cast<const std::byte *>(m->base) + off, n);
		dst += n, at += n, left -= n;
	}
}

std::span<const std::byte> GuestMapping::view(std::uint64_t gpa, std::size_t size) const
{
	const MappedRegion *m = state_ ? state_->find(gpa) : nullptr;
	if (!m)
		outside(view_op, gpa, size, gpa);
	std::uint64_t off = gpa - m->region.gpa;
	if (size > m->region.size - off)
		throw Error(view_op, EFAULT,
			    "gpa=" + hex(gpa) + " size=" + std::to_string(size) +
				    ": crosses the end of the region at " + hex(m->region.gpa) +
				    " (view() stays within one region; read() crosses)");
	return {static_cast<const std::byte *>(m->base) + off, size};
}

GuestMapping Session::map_guest_memory()
{
	auto &s = state();
	s.ensure_connected(map_op);
	sockaddr_storage ss{};
	socklen_t len = sizeof(ss);
	if (::getsockname(s.channel.fd(), reinterpret_cast<sockaddr *>(&ss), &len) < 0)
		throw Error(map_op, errno, "getsockname");
	if (ss.ss_family != AF_UNIX)
		throw Error(map_op, EOPNOTSUPP,
			    "the session's socket is not a unix socket: file descriptors cannot be "
			    "passed (SCM_RIGHTS); nothing was sent");

	virtkit_kvmi_share_memory c{};
	s.channel.accept_fds(true);
	std::vector<FileDesc> fds;
	ReplyView r;
	try {
		r = s.transact(Request::of(VIRTKIT_KVMI_SHARE_MEMORY, c), map_op);
	} catch (...) {
		s.channel.accept_fds(false);
		throw;
	}
	fds = s.channel.take_fds();
	bool truncated = s.channel.fds_truncated();
	s.channel.accept_fds(false);
	if (r.err) {
		if (!fds.empty())
			s.fail(Error(map_op, EPROTO, "descriptors with a refusal"));
		std::string why;
		if (r.err == -KVMI_EPERM)
			why = "the VMM does not share guest memory (virtkit: "
			      "IntrospectionOptions::share_memory is off)";
		else if (r.err == -KVMI_EOPNOTSUPP)
			why = "the VMM cannot pass descriptors on this connection (not a unix socket)";
		else if (r.err == -KVMI_ENOSYS)
			why = "the VMM does not know this command (not virtkit)";
		throw CommandError(VIRTKIT_KVMI_SHARE_MEMORY, r.err, why);
	}
	auto bad = [&](const std::string &why) {
		s.fail(Error(map_op, EPROTO, why));
	};
	if (truncated)
		bad("descriptors were lost (MSG_CTRUNC)");
	if (r.data.size() < sizeof(virtkit_kvmi_share_memory_reply))
		bad("reply data of " + std::to_string(r.data.size()) + " bytes");
	auto head = load<virtkit_kvmi_share_memory_reply>(r.data);
	if (head.padding)
		bad("non-zero padding in the reply");
	if (head.count > VIRTKIT_KVMI_MAX_SHARED_REGIONS ||
	    r.data.size() != sizeof(head) + head.count * sizeof(virtkit_kvmi_memory_region))
		bad(std::to_string(head.count) + " regions in " + std::to_string(r.data.size()) +
		    " bytes of reply data");
	if (fds.size() != head.count)
		bad(std::to_string(fds.size()) + " descriptors for " + std::to_string(head.count) +
		    " regions");
	const std::uint64_t page = kvmi::page_size;
	auto state = std::make_unique<MappingState>();
	std::uint64_t prev_end = 0;
	for (std::uint32_t i = 0; i < head.count; i++) {
		auto reg = load<virtkit_kvmi_memory_region>(
			r.data.subspan(sizeof(head) + i * sizeof(virtkit_kvmi_memory_region)));
		const std::string what = "region " + std::to_string(i) + " (gpa=" + hex(reg.gpa) +
					 " size=" + hex(reg.size) + " offset=" + hex(reg.offset) + ")";
		if (!reg.size || reg.gpa % page || reg.size % page || reg.offset % page ||
		    reg.gpa + reg.size < reg.gpa || reg.offset + reg.size < reg.offset ||
		    reg.size > SIZE_MAX || (i && reg.gpa < prev_end))
			bad(what + ": not page aligned, empty, overflowing or out of order");
		prev_end = reg.gpa + reg.size;
		struct stat st {};
		if (::fstat(fds[i].get(), &st) < 0)
			throw Error(map_op, errno, what + ": fstat");
		if (!S_ISREG(st.st_mode) || std::uint64_t(st.st_size) < reg.offset + reg.size)
			bad(what + ": the descriptor is not a file that long");
		void *p = ::mmap(nullptr, reg.size, PROT_READ, MAP_SHARED, fds[i].get(),
				 static_cast<off_t>(reg.offset));
		if (p == MAP_FAILED)
			throw Error(map_op, errno, what + ": mmap");
		state->mapped.push_back({{reg.gpa, reg.size}, p, reg.size});
		state->regions.push_back({reg.gpa, reg.size});
	}
	/* fds close here: the mappings keep the files. */
	return GuestMapping(std::move(state));
}

} // namespace virtkit::introspect
