// SPDX-License-Identifier: MIT
/*
 * Internal: starting the library's own threads (SPP's stall watch, the KVMI
 * reader, a probe's watchdog) so that they take none of the process's
 * asynchronous signals. A thread inherits its creator's signal mask; a VMM
 * that blocks SIGINT/SIGTERM in its threads and reads them from a signalfd
 * (virtkit run) or waits for them in one thread would otherwise lose them
 * to a library thread - and a SIGTERM taken there kills the process
 * outright. Synchronous faults stay deliverable. Signals aimed at one
 * thread (the vCPU kick, pthread_kill) are not affected.
 */
#pragma once

#include <pthread.h>
#include <signal.h>

#include <utility>

namespace virtkit::detail {

template <class Thread, class... Args> Thread start_library_thread(Args &&...args)
{
	sigset_t all, old;
	sigfillset(&all);
	for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS})
		sigdelset(&all, s);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	struct Restore {
		sigset_t &old;
		~Restore() { pthread_sigmask(SIG_SETMASK, &old, nullptr); }
	} restore{old};
	return Thread(std::forward<Args>(args)...);
}

} // namespace virtkit::detail
