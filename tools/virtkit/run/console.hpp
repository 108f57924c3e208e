// SPDX-License-Identifier: MIT
/*
 * The terminal as the guest's serial line. When stdin is a terminal it is
 * put in raw mode (every key, Ctrl-C included, goes to the guest) and
 * restored on every way out: the destructor (normal return and
 * exceptions), SIGINT/SIGTERM/SIGHUP/SIGQUIT (which stop the VM), and a
 * crash (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT restore it, then the
 * signal does what it would have done).
 *
 * Keys go to the UART from an input thread. Ctrl-A is the escape: Ctrl-A x
 * quits, Ctrl-A Ctrl-A (or Ctrl-A a) sends one Ctrl-A, Ctrl-A h lists the
 * keys. At the end of stdin (a file or /dev/null) input stops; the VM runs
 * on.
 */
#pragma once

#include <signal.h>
#include <termios.h>

#include <functional>
#include <thread>

#include <virtkit/virtkit.hpp>

#include "uart.hpp"

namespace virtkit::tool::run {

/* Why the console asked the VM to stop. */
enum class ConsoleStop {
	escape,	/* the user typed Ctrl-A x */
	signal,	/* a terminating signal; its number is given */
};

class Console {
public:
	static constexpr unsigned char escape_key = 0x01;	/* Ctrl-A */

	/*
	 * Blocks the terminating signals in the calling thread (threads
	 * started afterwards inherit that; the console takes them through a
	 * signalfd) and puts a terminal stdin in raw mode.
	 */
	Console();
	~Console();
	Console(const Console &) = delete;
	Console &operator=(const Console &) = delete;

	/* Start passing keys to uart; stop(reason, signo) is called once, from the input thread. */
	void start(Uart &uart, std::function<void(ConsoleStop, int)> stop);
	/* Stop the input thread and restore the terminal (idempotent). */
	void close();

	/* Write the guest's serial output to stdout. */
	static void output(std::uint8_t byte);

private:
	void input_loop(Uart &uart, const std::function<void(ConsoleStop, int)> &stop);

	bool raw_ = false;
	sigset_t old_mask_{};
	FileDesc signals_;
	EventFd quit_;
	std::thread thread_;
};

} // namespace virtkit::tool::run
