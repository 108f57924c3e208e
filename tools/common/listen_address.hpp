// SPDX-License-Identifier: MIT
/*
 * The address a VM connects to its introspection tool at (unix:/path or
 * vsock:CID:PORT), checked by the VMM tools before they run anything: a
 * socket in a directory that does not exist can never be listened on, so
 * retrying until a tool listens there would only wait in vain.
 */
#pragma once

#include <filesystem>
#include <string>

namespace virtkit::tool {

/* Why no tool can listen at address ("" when one can, or may later). */
inline std::string unusable_listen_address(const std::string &address)
{
	if (!address.starts_with("unix:"))
		return "";
	std::filesystem::path dir = std::filesystem::path(address.substr(5)).parent_path();
	std::error_code ec;
	if (dir.empty() || std::filesystem::is_directory(dir, ec))
		return "";
	return "no directory " + dir.string() + " for the socket: no tool can listen there";
}

} // namespace virtkit::tool
