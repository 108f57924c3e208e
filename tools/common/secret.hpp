// SPDX-License-Identifier: MIT
/*
 * The introspection secret for the command-line tools (virtkit demo
 * --introspect, virtkit-introspect): from --secret TEXT, --secret-file PATH
 * or --secret-fd N. A secret on the command line is visible to every user
 * in /proc/PID/cmdline; a file or an inherited descriptor is not.
 *
 * The whole content is the secret, less one trailing newline (so that
 * `echo s3cret >file` works). An empty file is an error rather than "no
 * secret": a misconfigured file must not silently turn authentication off.
 */
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <string>

#include <virtkit/error.hpp>

namespace virtkit::tool {

/* Longer than any sensible secret; the reader stops there. */
inline constexpr std::size_t max_secret_size = 4096;

/*
 * Read the secret from fd up to the end of the file (a pipe's writer
 * closing it), without closing fd. what names the source in errors:
 * Error("read secret", errno, what) - EINVAL when it is empty, E2BIG when it
 * is longer than max_secret_size.
 */
inline std::string read_secret_fd(int fd, const std::string &what)
{
	std::string s;
	char buf[512];
	for (;;) {
		ssize_t n = ::read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			throw Error("read secret", errno, what);
		if (n == 0)
			break;
		s.append(buf, std::size_t(n));
		if (s.size() > max_secret_size + 1)
			throw Error("read secret", E2BIG,
				    what + ": more than " + std::to_string(max_secret_size) + " bytes");
	}
	if (!s.empty() && s.back() == '\n')
		s.pop_back();
	if (s.size() > max_secret_size)
		throw Error("read secret", E2BIG,
			    what + ": more than " + std::to_string(max_secret_size) + " bytes");
	if (s.empty())
		throw Error("read secret", EINVAL, what + ": empty");
	return s;
}

/* The secret in the file at path (see read_secret_fd()). */
inline std::string read_secret_file(const std::string &path)
{
	int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		throw Error("read secret", errno, path);
	try {
		std::string s = read_secret_fd(fd, path);
		::close(fd);
		return s;
	} catch (...) {
		::close(fd);
		throw;
	}
}

/*
 * The secret from descriptor text ("--secret-fd N"), which is closed
 * afterwards: nothing started later inherits it. EBADF for a number that is
 * not an open descriptor, EINVAL for text that is not a number.
 */
inline std::string read_secret_fd_arg(const std::string &text)
{
	std::size_t used = 0;
	int fd = -1;
	try {
		fd = std::stoi(text, &used, 10);
	} catch (...) {
		used = 0;
	}
	if (used == 0 || used != text.size() || fd < 0)
		throw Error("read secret", EINVAL, "'" + text + "' is not a file descriptor number");
	std::string what = "descriptor " + text;
	try {
		std::string s = read_secret_fd(fd, what);
		::close(fd);
		return s;
	} catch (...) {
		::close(fd);
		throw;
	}
}

} // namespace virtkit::tool
