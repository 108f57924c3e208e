// SPDX-License-Identifier: MIT
/*
 * Commands about the whole VM, executed on the reader thread. The payload
 * size was checked already (wire.cpp); each command checks its fields.
 */
#include "kvmi/vmm/server.hpp"

#include <algorithm>
#include <new>

#include <virtkit/error.hpp>
#include <virtkit/memory.hpp>

namespace virtkit::detail {

int IntrospectionServer::vm_command(std::uint16_t id, std::span<const std::byte> p,
				    std::vector<std::byte> &out)
{
	switch (id) {
	case KVMI_GET_VERSION: {
		kvmi_get_version_reply r{};
		r.version = KVMI_VERSION;
		/* Sub-page write bitmaps are emulated on every host (virtkit SPP). */
		r.features.spp = 1;
		append_bytes(out, r);
		return 0;
	}
	case KVMI_CHECK_COMMAND:
		return check_command(p);
	case KVMI_CHECK_EVENT:
		return check_event(p);
	case KVMI_GET_GUEST_INFO: {
		kvmi_get_guest_info_reply r{};
		r.vcpu_count = static_cast<std::uint32_t>(RunControl::vcpus(vm_).size());
		append_bytes(out, r);
		return 0;
	}
	case KVMI_CONTROL_VM_EVENTS:
		return control_vm_events(p);
	case KVMI_READ_PHYSICAL:
		return read_physical(p, out);
	case KVMI_WRITE_PHYSICAL:
		return write_physical(p);
	case KVMI_SET_PAGE_ACCESS:
		return set_page_access(p);
	case KVMI_CONTROL_SPP:
		return control_spp(p);
	case KVMI_SET_PAGE_WRITE_BITMAP:
		return set_page_write_bitmap(p);
	case KVMI_GET_MAX_GFN:
		return max_gfn(out);
	case KVMI_QUERY_PHYSICAL:
		return query_physical(p, out);
	default:
		return -KVMI_ENOSYS;
	}
}

/*
 * CHECK_COMMAND / CHECK_EVENT: 0, -KVMI_EOPNOTSUPP for ids this backend
 * does not serve (also unknown ids), -KVMI_EPERM for ones the VMM forbids.
 * Later kvmi versions answer -KVMI_ENOENT for unsupported ids; libkvmi and
 * the tools built on it test for non-zero, and EOPNOTSUPP is the same
 * answer the command or event itself gets.
 */
int IntrospectionServer::check_command(std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_check_command>(p);
	if (!VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2))
		return -KVMI_EINVAL;
	if (c.id == VIRTKIT_KVMI_SHARE_MEMORY)
		return share_memory_refusal();
	if (!kvmi::supported_command(c.id))
		return -KVMI_EOPNOTSUPP;
	return command_allowed(c.id) ? 0 : -KVMI_EPERM;
}

int IntrospectionServer::check_event(std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_check_event>(p);
	if (!VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2))
		return -KVMI_EINVAL;
	if (!kvmi::supported_event(c.id, c.id == KVMI_EVENT_BREAKPOINT && int3_exits()))
		return -KVMI_EOPNOTSUPP;
	return event_allowed(c.id) ? 0 : -KVMI_EPERM;
}

int IntrospectionServer::control_vm_events(std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_control_vm_events>(p);
	if (c.enable > 1 || !VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2))
		return -KVMI_EINVAL;
	if (!kvmi::vm_event(c.event_id))
		return -KVMI_EINVAL; /* vCPU events go through CONTROL_EVENTS */
	if (!event_allowed(c.event_id))
		return -KVMI_EPERM;
	std::vector<Vcpu> wake;
	{
		std::lock_guard lock(mu_);
		const std::uint32_t bit = 1u << c.event_id;
		vm_events_ = c.enable ? vm_events_ | bit : vm_events_ & ~bit;
		if (c.event_id != KVMI_EVENT_CREATE_VCPU)
			return 0;
		/* Every vCPU not reported yet reports itself before its next entry. */
		for (auto &v : RunControl::vcpus(vm_)) {
			if (v.id() > 0xffff)
				continue;
			auto &r = record_locked(static_cast<std::uint16_t>(v.id()));
			r.create_pending = c.enable && !r.create_sent;
			if (r.create_pending)
				wake.push_back(std::move(v));
		}
	}
	for (auto &v : wake)
		RunControl::request_work(v);
	return 0;
}

/* A read or write of guest RAM: within one page, inside guest memory. */
static int check_physical(const GuestMemory &mem, std::uint64_t gpa, std::uint64_t size)
{
	if (size == 0 || size > kvmi::page_size || gpa % kvmi::page_size + size > kvmi::page_size)
		return -KVMI_EINVAL;
	if (!mem.contains(gpa, size))
		return -KVMI_ENOENT;
	return 0;
}

int IntrospectionServer::read_physical(std::span<const std::byte> p, std::vector<std::byte> &out)
{
	auto c = kvmi::load<kvmi_read_physical>(p);
	if (int err = check_physical(vm_.memory(), c.gpa, c.size))
		return err;
	out.resize(c.size);
	vm_.memory().read(c.gpa, out);
	return 0;
}

int IntrospectionServer::write_physical(std::span<const std::byte> p)
{
	auto c = kvmi::load<kvmi_write_physical>(p);
	if (int err = check_physical(vm_.memory(), c.gpa, c.size))
		return err;
	vm_.memory().write(c.gpa, p.subspan(sizeof(c)));
	return 0;
}

int IntrospectionServer::max_gfn(std::vector<std::byte> &out)
{
	std::uint64_t end = 0;
	for (const auto &r : vm_.memory().regions())
		end = std::max(end, r.gpa + r.size);
	if (!end)
		return -KVMI_ENOENT;
	kvmi_get_max_gfn_reply r{(end - 1) / kvmi::page_size};
	append_bytes(out, r);
	return 0;
}

int IntrospectionServer::query_physical(std::span<const std::byte> p, std::vector<std::byte> &out)
{
	auto c = kvmi::load<kvmi_query_physical>(p);
	if (c.gfn > ~0ull / kvmi::page_size)
		return -KVMI_EINVAL;
	auto region = vm_.memory().try_region_at(c.gfn * kvmi::page_size);
	if (!region)
		return -KVMI_ENOENT;
	kvmi_query_physical_reply r{region->gpa / kvmi::page_size, region->size};
	append_bytes(out, r);
	return 0;
}

int IntrospectionServer::share_memory_refusal() const
{
	if (!share_memory_)
		return -KVMI_EPERM;
	if (!conn_->can_pass_fds())
		return -KVMI_EOPNOTSUPP;
	return 0;
}

/*
 * VIRTKIT_KVMI_SHARE_MEMORY: every RAM region's memfd, opened read-only
 * (GuestMemory::region_fd), with the layout, in one reply message that
 * carries the descriptors. Ours are closed once sent: the tool has its own.
 * The reader flushed the queued replies before this (reply_may_wait() is
 * false for it), so the reply goes out directly, in order.
 */
bool IntrospectionServer::share_memory(const kvmi_msg_hdr &hdr, std::span<const std::byte> p)
{
	n_commands_++;
	auto &out = reply_;
	out.clear();
	std::vector<FileDesc> files;
	int err = share_memory_refusal();
	if (!err) {
		virtkit_kvmi_share_memory c{};
		if (p.size() != sizeof(c))
			err = -KVMI_EINVAL;
		else if (c = kvmi::load<virtkit_kvmi_share_memory>(p); c.flags || c.padding)
			err = -KVMI_EINVAL;
	}
	if (!err) {
		try {
			auto regions = vm_.memory().regions();
			std::sort(regions.begin(), regions.end(),
				  [](const RegionInfo &a, const RegionInfo &b) { return a.gpa < b.gpa; });
			if (regions.size() > VIRTKIT_KVMI_MAX_SHARED_REGIONS) {
				err = -KVMI_E2BIG;
			} else {
				virtkit_kvmi_share_memory_reply head{};
				head.count = static_cast<std::uint32_t>(regions.size());
				append_bytes(out, head);
				for (const auto &r : regions) {
					auto f = vm_.memory().region_fd(r.id, FileAccess::read_only);
					virtkit_kvmi_memory_region m{r.gpa, f.size, f.offset};
					append_bytes(out, m);
					files.push_back(std::move(f.fd));
				}
			}
		} catch (const Error &e) {
			err = kvmi_error(e.err());
		} catch (const std::bad_alloc &) {
			err = -KVMI_ENOMEM;
		}
	}
	if (err) {
		n_errors_++;
		out.clear();
		files.clear();
	}
	/* Replies off (CONTROL_CMD_RESPONSE): no reply, so no descriptors. */
	if (!replies_enabled_) {
		if (err && !batch_error_)
			batch_error_ = err;
		return true;
	}
	std::vector<int> fds;
	for (auto &f : files)
		fds.push_back(f.get());
	kvmi_error_code ec{err, 0};
	kvmi_msg_hdr rh{hdr.id, static_cast<std::uint16_t>(sizeof(ec) + out.size()), hdr.seq};
	return conn_->send_with_fds(
		rh, {std::as_bytes(std::span(&ec, 1)), std::span<const std::byte>(out)}, fds);
}

} // namespace virtkit::detail
