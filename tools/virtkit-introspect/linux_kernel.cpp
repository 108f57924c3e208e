// SPDX-License-Identifier: MIT
/* Symbols and structure offsets of a Linux kernel image (linux_kernel.hpp). */
#include "linux_kernel.hpp"

#include <cstring>
#include <vector>

#include "../common/kernel_image.hpp"
#include "../common/kernel_symbols.hpp"

namespace virtkit::tool {
namespace {

template <class T> T load(std::span<const std::byte> b, std::size_t off, const char *what)
{
	T v;
	if (off > b.size() || sizeof(T) > b.size() - off)
		throw KernelImageError(std::string(what) + " is truncated");
	std::memcpy(&v, b.data() + off, sizeof(T));
	return v;
}


/* The parts of BTF (include/uapi/linux/btf.h) a member offset needs. */
class Btf {
public:
	explicit Btf(std::span<const std::byte> btf) : b_(btf)
	{
		if (load<std::uint16_t>(b_, 0, "BTF") != 0xeb9f)
			throw KernelImageError("the .BTF section has no BTF magic");
		auto hdr_len = load<std::uint32_t>(b_, 4, "BTF");
		auto type_off = load<std::uint32_t>(b_, 8, "BTF");
		auto type_len = load<std::uint32_t>(b_, 12, "BTF");
		auto str_off = load<std::uint32_t>(b_, 16, "BTF");
		auto str_len = load<std::uint32_t>(b_, 20, "BTF");
		if (std::uint64_t(hdr_len) + type_off + type_len > b_.size() ||
		    std::uint64_t(hdr_len) + str_off + str_len > b_.size())
			throw KernelImageError("BTF: sections outside .BTF");
		strings_ = b_.subspan(hdr_len + str_off, str_len);
		types_.push_back(0); /* type 0 is void */
		std::size_t p = hdr_len + type_off, end = p + type_len;
		while (p < end) {
			types_.push_back(p);
			auto info = load<std::uint32_t>(b_, p + 4, "BTF type");
			std::size_t vlen = info & 0xffff;
			p += 12 + extra(kind(info), vlen);
		}
	}

	/* The first struct called name; 0 if none. */
	std::uint32_t find_struct(std::string_view name) const
	{
		for (std::uint32_t id = 1; id < types_.size(); id++)
			if (kind(info(id)) == kind_struct && this->name(id) == name)
				return id;
		return 0;
	}

	struct Member {
		std::uint32_t offset; /* bytes */
		std::uint32_t type;
	};
	/* The member called name, also inside anonymous structs and unions. */
	std::optional<Member> member(std::uint32_t id, std::string_view name) const
	{
		std::uint32_t i = info(id);
		if (kind(i) != kind_struct && kind(i) != kind_union)
			return std::nullopt;
		for (std::size_t m = 0; m < (i & 0xffff); m++) {
			std::size_t at = types_[id] + 12 + m * 12;
			auto name_off = load<std::uint32_t>(b_, at, "BTF member");
			auto type = load<std::uint32_t>(b_, at + 4, "BTF member");
			auto bits = load<std::uint32_t>(b_, at + 8, "BTF member");
			if (i >> 31) /* kind_flag: bitfield size in the top 8 bits */
				bits &= 0xffffff;
			if (name_off && str(name_off) == name)
				return Member{bits / 8, type};
			if (!name_off && type < types_.size())
				if (auto inner = member(type, name))
					return Member{bits / 8 + inner->offset, inner->type};
		}
		return std::nullopt;
	}

	/* Elements of an array type (through typedefs and qualifiers); 0 if not an array. */
	std::uint32_t array_length(std::uint32_t id) const
	{
		for (int depth = 0; depth < 16 && id && id < types_.size(); depth++) {
			std::uint32_t k = kind(info(id));
			if (k == kind_array)
				return load<std::uint32_t>(b_, types_[id] + 12 + 8, "BTF array");
			if (k != kind_typedef && k != kind_volatile && k != kind_const)
				return 0;
			id = load<std::uint32_t>(b_, types_[id] + 8, "BTF type");
		}
		return 0;
	}

private:
	static constexpr std::uint32_t kind_array = 3, kind_struct = 4, kind_union = 5,
				       kind_typedef = 8, kind_volatile = 9, kind_const = 10;
	static std::uint32_t kind(std::uint32_t info) { return (info >> 24) & 0x1f; }
	/* Bytes after struct btf_type, by kind. */
	static std::size_t extra(std::uint32_t kind, std::size_t vlen)
	{
		switch (kind) {
		case 1: return 4;		/* INT */
		case 3: return 12;		/* ARRAY */
		case 4: case 5: return 12 * vlen; /* STRUCT, UNION */
		case 6: return 8 * vlen;	/* ENUM */
		case 13: return 8 * vlen;	/* FUNC_PROTO */
		case 14: return 4;		/* VAR */
		case 15: return 12 * vlen;	/* DATASEC */
		case 17: return 4;		/* DECL_TAG */
		case 19: return 12 * vlen;	/* ENUM64 */
		case 2: case 7: case 8: case 9: case 10: case 11: case 12: case 16: case 18:
			return 0;
		default:
			throw KernelImageError("BTF: type kind " + std::to_string(kind) +
					       " is unknown to this tool");
		}
	}
	std::uint32_t info(std::uint32_t id) const { return load<std::uint32_t>(b_, types_[id] + 4, "BTF type"); }
	std::string_view name(std::uint32_t id) const
	{
		return str(load<std::uint32_t>(b_, types_[id], "BTF type"));
	}
	std::string_view str(std::uint32_t off) const
	{
		if (off >= strings_.size())
			return {};
		auto *p = reinterpret_cast<const char *>(strings_.data()) + off;
		return {p, strnlen(p, strings_.size() - off)};
	}

	std::span<const std::byte> b_, strings_;
	std::vector<std::size_t> types_; /* offset of each type id's btf_type */
};

std::uint32_t offset_of(const Btf &btf, std::uint32_t type, const char *type_name,
			const char *member, std::uint32_t *array_length = nullptr)
{
	auto m = btf.member(type, member);
	if (!m)
		throw KernelImageError(std::string("BTF: struct ") + type_name + " has no member " + member);
	if (array_length)
		*array_length = btf.array_length(m->type);
	return m->offset;
}

} // namespace

LinuxKernelLayout linux_kernel_layout(std::span<const std::byte> vmlinux,
				      const std::optional<std::string> &system_map)
{
	LinuxKernelLayout k;
	KernelSymbols symbols = kernel_symbols(vmlinux, system_map);
	const auto &syms = symbols.address;
	k.symbols_from = symbols.from;
	auto it = syms.find("init_task");
	if (it == syms.end())
		throw KernelImageError("no init_task among the image's exported symbols "
				       "(give the kernel's System.map)");
	k.init_task = it->second;
	if ((it = syms.find("linux_banner")) != syms.end())
		k.linux_banner = it->second;
	if ((it = syms.find("init_uts_ns")) != syms.end())
		k.init_uts_ns = it->second;

	auto section = elf_section(vmlinux, ".BTF");
	if (!section)
		throw KernelImageError("the image has no .BTF section (a kernel built without "
				       "CONFIG_DEBUG_INFO_BTF): structure offsets are unknown");
	Btf btf(section->bytes);
	std::uint32_t task = btf.find_struct("task_struct");
	if (!task)
		throw KernelImageError("BTF: no struct task_struct");
	k.task_tasks = offset_of(btf, task, "task_struct", "tasks");
	k.task_pid = offset_of(btf, task, "task_struct", "pid");
	k.task_tgid = offset_of(btf, task, "task_struct", "tgid");
	k.task_comm = offset_of(btf, task, "task_struct", "comm", &k.comm_size);
	if (k.comm_size == 0 || k.comm_size > 64)
		throw KernelImageError("BTF: task_struct.comm is not a char array of at most 64");
	if (std::uint32_t uts = btf.find_struct("uts_namespace"))
		k.uts_name = offset_of(btf, uts, "uts_namespace", "name");
	else
		k.init_uts_ns.reset();
	return k;
}

} // namespace virtkit::tool
