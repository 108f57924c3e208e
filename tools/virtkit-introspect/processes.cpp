// SPDX-License-Identifier: MIT
/* A Linux guest's process list over KVMI (processes.hpp). */
#include "processes.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <set>

#include "../common/hex.hpp"
#include "../common/kernel_image.hpp"

namespace virtkit::tool {
namespace {

constexpr std::uint64_t page_size = 4096, unmapped = ~0ull;

/* Guest-virtual reads on one vCPU, each page translated once. */
class VirtualReader {
public:
	VirtualReader(introspect::Session &s, std::uint16_t vcpu) : s_(s), vcpu_(vcpu) {}

	/* false if a page of [gva, gva + out.size()) is not mapped to guest RAM. */
	bool read(std::uint64_t gva, std::span<std::byte> out)
	{
		while (!out.empty()) {
			std::uint64_t page = gva & ~(page_size - 1);
			auto [it, fresh] = pages_.try_emplace(page, 0);
			if (fresh)
				it->second = s_.translate_gva(vcpu_, page);
			if (it->second == unmapped)
				return false;
			std::size_t n = std::min<std::uint64_t>(out.size(), page + page_size - gva);
			try {
				s_.read_physical(it->second + (gva - page), out.first(n));
			} catch (const introspect::CommandError &) {
				return false; /* mapped outside guest RAM: as good as unmapped */
			}
			out = out.subspan(n);
			gva += n;
		}
		return true;
	}

	/* A NUL-terminated string of at most size bytes. */
	std::optional<std::string> string(std::uint64_t gva, std::size_t size)
	{
		std::string s(size, '\0');
		if (!read(gva, std::as_writable_bytes(std::span(s))))
			return std::nullopt;
		s.resize(strnlen(s.data(), size));
		return s;
	}

private:
	introspect::Session &s_;
	std::uint16_t vcpu_;
	std::map<std::uint64_t, std::uint64_t> pages_;
};


std::string banner(VirtualReader &r, const LinuxKernelLayout &k)
{
	if (k.linux_banner)
		if (auto b = r.string(*k.linux_banner, 512)) {
			while (!b->empty() && b->back() == '\n')
				b->pop_back();
			return *b;
		}
	if (!k.init_uts_ns)
		return {};
	/* struct new_utsname: six char[65]: sysname, nodename, release, version, machine, domainname. */
	std::uint64_t uts = *k.init_uts_ns + k.uts_name;
	std::string out;
	for (int field : {0, 2, 3, 4}) {
		auto f = r.string(uts + 65 * std::uint64_t(field), 65);
		if (!f)
			return {};
		out += (out.empty() ? "" : " ") + *f;
	}
	return out;
}

} // namespace

GuestProcesses list_processes(introspect::Session &s, std::uint16_t vcpu, const LinuxKernelLayout &k)
{
	VirtualReader r(s, vcpu);
	GuestProcesses p;
	p.banner = banner(r, k);

	/* The members read, as one block per task: one or two pages. */
	std::uint32_t lo = std::min({k.task_pid, k.task_tgid, k.task_comm, k.task_tasks});
	std::uint32_t hi = std::max({k.task_pid + 4, k.task_tgid + 4, k.task_comm + k.comm_size,
				     k.task_tasks + 8});
	std::vector<std::byte> block(hi - lo);
	auto at = [&](std::uint32_t off) { return block.data() + (off - lo); };

	std::set<std::uint64_t> seen;
	std::uint64_t task = k.init_task;
	for (;;) {
		if (!r.read(task + lo, block)) {
			if (task == k.init_task)
				throw KernelImageError("init_task at " + hex(task) +
						       " is not mapped on vCPU " + std::to_string(vcpu) +
						       ": the guest kernel is not running yet, or it is "
						       "not the kernel given");
			p.incomplete = "task " + hex(task) + " is not mapped";
			break;
		}
		std::int32_t pid, tgid;
		std::uint64_t next;
		std::memcpy(&pid, at(k.task_pid), 4);
		std::memcpy(&tgid, at(k.task_tgid), 4);
		std::memcpy(&next, at(k.task_tasks), 8);
		auto *c = reinterpret_cast<const char *>(at(k.task_comm));
		std::string comm(c, strnlen(c, k.comm_size));
		if (task == k.init_task && !comm.starts_with("swapper"))
			throw KernelImageError("init_task at " + hex(task) + " holds \"" + comm +
					       "\", not \"swapper\": the guest does not run the kernel "
					       "given, or runs it with KASLR (boot it with nokaslr)");
		p.tasks.push_back({task, pid, tgid, comm});
		seen.insert(task);
		task = next - k.task_tasks;
		if (task == k.init_task)
			break;
		if (seen.count(task)) {
			p.incomplete = "the list loops back to task " + hex(task);
			break;
		}
		if (p.tasks.size() >= max_tasks) {
			p.incomplete = "more than " + std::to_string(max_tasks) + " tasks";
			break;
		}
	}
	return p;
}

} // namespace virtkit::tool
