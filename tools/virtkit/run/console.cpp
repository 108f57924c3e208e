// SPDX-License-Identifier: MIT
/* The terminal as the serial line (console.hpp). */
#include "console.hpp"

#include <poll.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace virtkit::tool::run {
namespace {

/* The terminal's settings before raw mode, for the crash handlers too. */
struct termios saved_termios;
volatile sig_atomic_t termios_saved = 0;

void restore_terminal() noexcept
{
	if (termios_saved)
		tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved_termios);
}

/* A crash: restore the terminal, then let the signal do what it does by default. */
void crash_handler(int sig)
{
	restore_terminal();
	signal(sig, SIG_DFL);
	raise(sig);
}

constexpr int crash_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
constexpr int stop_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};

void write_all(int fd, const void *buf, std::size_t len)
{
	auto *p = static_cast<const char *>(buf);
	while (len) {
		ssize_t n = ::write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;	/* stdout gone: the guest's output is lost, the VM runs on */
		p += n;
		len -= std::size_t(n);
	}
}

sigset_t stop_signal_set()
{
	sigset_t set;
	sigemptyset(&set);
	for (int s : stop_signals)
		sigaddset(&set, s);
	return set;
}

} // namespace

Console::Console()
{
	sigset_t set = stop_signal_set();
	if (pthread_sigmask(SIG_BLOCK, &set, &old_mask_))
		throw Error("pthread_sigmask", errno);
	signals_ = FileDesc::adopt(signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK), "signalfd");
	quit_ = EventFd::create();

	if (isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &saved_termios) == 0) {
		struct sigaction sa {};
		sa.sa_handler = crash_handler;
		for (int s : crash_signals)
			sigaction(s, &sa, nullptr);
		termios_saved = 1;
		struct termios raw = saved_termios;
		cfmakeraw(&raw);
		if (tcsetattr(STDIN_FILENO, TCSAFLUSH, &raw) != 0)
			throw Error("tcsetattr", errno, "stdin (raw mode)");
		raw_ = true;
	}
}

Console::~Console()
{
	try {
		close();
	} catch (...) {
	}
	pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
}

void Console::close()
{
	if (thread_.joinable()) {
		quit_.notify();
		thread_.join();
	}
	if (raw_) {
		restore_terminal();
		raw_ = false;
		termios_saved = 0;
	}
}

void Console::output(std::uint8_t byte)
{
	write_all(STDOUT_FILENO, &byte, 1);
}

void Console::start(Uart &uart, std::function<void(ConsoleStop, int)> stop)
{
	thread_ = std::thread([this, &uart, stop = std::move(stop)] { input_loop(uart, stop); });
}

void Console::input_loop(Uart &uart, const std::function<void(ConsoleStop, int)> &stop)
{
	pollfd fds[3] = {{quit_.fd(), POLLIN, 0}, {signals_.get(), POLLIN, 0},
			 {STDIN_FILENO, POLLIN, 0}};
	/* Returns whether to go on: false once quit or a signal stopped the VM. */
	auto wait = [&](int nfds, int timeout_ms) {
		if (poll(fds, nfds, timeout_ms) < 0 && errno != EINTR)
			return false;
		if (fds[0].revents)
			return false;
		if (fds[1].revents) {
			signalfd_siginfo si{};
			if (::read(signals_.get(), &si, sizeof(si)) == sizeof(si)) {
				stop(ConsoleStop::signal, int(si.ssi_signo));
				return false;
			}
		}
		return true;
	};
	/* A key for the guest, once its receive FIFO has room. */
	auto deliver = [&](unsigned char c) {
		while (!uart.receive(c))
			if (!wait(2, 2))
				return false;
		return true;
	};

	bool eof = false, escaped = false;
	for (;;) {
		if (!wait(eof ? 2 : 3, -1))
			return;
		if (eof || !(fds[2].revents & (POLLIN | POLLHUP | POLLERR)))
			continue;
		unsigned char buf[64];
		ssize_t n = ::read(STDIN_FILENO, buf, sizeof(buf));
		if (n <= 0) {
			eof = n == 0 || errno != EINTR;
			continue;
		}
		for (ssize_t i = 0; i < n; i++) {
			unsigned char c = buf[i];
			if (!escaped && c == escape_key) {
				escaped = true;
				continue;
			}
			if (escaped) {
				escaped = false;
				if (c == 'x' || c == 'X') {
					stop(ConsoleStop::escape, 0);
					return;
				}
				if (c == 'h' || c == 'H' || c == '?') {
					static const char help[] =
						"\r\nvirtkit run: C-a x  quit\r\n"
						"             C-a a  send C-a to the guest\r\n"
						"             C-a h  this help\r\n";
					write_all(STDOUT_FILENO, help, sizeof(help) - 1);
					continue;
				}
				if (c == 'a')
					c = escape_key;
				/* Any other key after C-a goes to the guest as typed. */
			}
			if (!deliver(c))
				return;
		}
	}
}

} // namespace virtkit::tool::run
