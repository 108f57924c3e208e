// SPDX-License-Identifier: MIT
#include "kvmi/tool/handshake.hpp"

#include <cerrno>
#include <cstring>

#include <virtkit/error.hpp>

namespace virtkit::introspect::detail {

namespace {
constexpr const char *op = "KVMI handshake";
constexpr std::size_t size_field = sizeof(kvmi_qemu2introspector::struct_size);
} // namespace

std::size_t HandshakeReader::feed(std::span<const std::byte> data)
{
	std::size_t used = 0;

	if (received_ < size_field) {
		std::size_t n = std::min(size_field - received_, data.size());
		std::memcpy(known_.data() + received_, data.data(), n);
		received_ += n;
		used += n;
		if (received_ < size_field)
			return used;
		auto size = load<std::uint32_t>(known_);
		if (size < kvmi::min_hello_size)
			throw Error(op, EPROTO,
				    "struct_size " + std::to_string(size) +
					    ", less than the start of the name (" +
					    std::to_string(kvmi::min_hello_size) + ")");
		if (size > kvmi::max_handshake_size)
			throw Error(op, E2BIG,
				    "struct_size " + std::to_string(size) + ", more than " +
					    std::to_string(kvmi::max_handshake_size));
		size_ = size;
	}

	std::size_t n = std::min(size_ - received_, data.size() - used);
	if (received_ < known_.size()) {
		std::size_t keep = std::min(n, known_.size() - received_);
		std::memcpy(known_.data() + received_, data.data() + used, keep);
	}
	received_ += n;
	used += n;

	if (done()) {
		auto q = load<kvmi_qemu2introspector>(known_);
		if (!zero(q.padding))
			throw Error(op, EPROTO, "non-zero padding");
	}
	return used;
}

HandshakeInfo HandshakeReader::info() const
{
	auto q = load<kvmi_qemu2introspector>(known_);
	HandshakeInfo info;
	info.struct_size = q.struct_size;
	std::memcpy(info.uuid.data(), q.uuid, sizeof(q.uuid));
	info.start_time = q.start_time;
	/* NUL-terminated; like libkvmi, the last byte is a terminator anyway. */
	info.name.assign(q.name, strnlen(q.name, sizeof(q.name) - 1));
	if (q.struct_size >= sizeof(kvmi_qemu2introspector))
		info.max_gpa = q.max_gpa;
	return info;
}

} // namespace virtkit::introspect::detail
