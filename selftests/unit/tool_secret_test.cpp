// SPDX-License-Identifier: MIT
/* The tools' --secret-file / --secret-fd readers (tools/common/secret.hpp). */
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include <virtkit/error.hpp>

#include "../../tools/common/secret.hpp"

using virtkit::Error;
using namespace virtkit::tool;

namespace {

/* A temporary file holding text, removed at the end of the scope. */
struct TempFile {
	explicit TempFile(const std::string &text)
	{
		char t[] = "/tmp/virtkit-secret-XXXXXX";
		int fd = ::mkstemp(t);
		REQUIRE(fd >= 0);
		path = t;
		REQUIRE(::write(fd, text.data(), text.size()) == ssize_t(text.size()));
		::close(fd);
	}
	~TempFile() { ::unlink(path.c_str()); }
	std::string path;
};

int error_of(auto &&fn)
{
	try {
		fn();
	} catch (const Error &e) {
		return e.err();
	}
	return 0;
}

} // namespace

TEST_CASE("read_secret_file takes the content less one trailing newline", "[tool]")
{
	CHECK(read_secret_file(TempFile("s3cret\n").path) == "s3cret");
	CHECK(read_secret_file(TempFile("s3cret").path) == "s3cret");
	/* Only one newline goes: the rest is the secret's own. */
	CHECK(read_secret_file(TempFile("a b\n\n").path) == "a b\n");
	CHECK(read_secret_file(TempFile(std::string(max_secret_size, 'k')).path).size() ==
	      max_secret_size);
}

TEST_CASE("read_secret_file refuses empty, missing and oversized files", "[tool]")
{
	CHECK(error_of([] { read_secret_file(TempFile("").path); }) == EINVAL);
	CHECK(error_of([] { read_secret_file(TempFile("\n").path); }) == EINVAL);
	CHECK(error_of([] { read_secret_file("/nonexistent/virtkit-secret"); }) == ENOENT);
	CHECK(error_of([] {
		      read_secret_file(TempFile(std::string(max_secret_size + 1, 'k')).path);
	      }) == E2BIG);
}

TEST_CASE("read_secret_fd_arg reads a pipe to its end and closes the descriptor", "[tool]")
{
	int p[2];
	REQUIRE(::pipe(p) == 0);
	REQUIRE(::write(p[1], "from-fd\n", 8) == 8);
	::close(p[1]);
	CHECK(read_secret_fd_arg(std::to_string(p[0])) == "from-fd");
	CHECK(::fcntl(p[0], F_GETFD) == -1);
	CHECK(errno == EBADF);
}

TEST_CASE("read_secret_fd_arg refuses what is not an open descriptor", "[tool]")
{
	CHECK(error_of([] { read_secret_fd_arg("x"); }) == EINVAL);
	CHECK(error_of([] { read_secret_fd_arg("3x"); }) == EINVAL);
	CHECK(error_of([] { read_secret_fd_arg("-1"); }) == EINVAL);
	CHECK(error_of([] { read_secret_fd_arg(""); }) == EINVAL);
	CHECK(error_of([] { read_secret_fd_arg("999999"); }) == EBADF);
}
