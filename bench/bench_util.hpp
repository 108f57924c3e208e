// SPDX-License-Identifier: MIT
/*
 * What every benchmark program needs: failing a run whose result is wrong,
 * integer fixed-point formatting (the programs are guest code, built
 * without floating point) and wall-clock time.
 */
#pragma once

#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

using Clock = std::chrono::steady_clock;

class BenchFailure : public std::runtime_error {
public:
	using std::runtime_error::runtime_error;
};

__attribute__((format(printf, 2, 3))) inline void check(bool ok, const char *fmt, ...)
{
	if (ok)
		return;
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	std::vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	throw BenchFailure(buf);
}

/* num / den with `decimals` decimals, rounded ("n/a" when den is 0). */
inline std::string fixed(unsigned __int128 num, unsigned __int128 den, int decimals)
{
	if (!den)
		return "n/a";
	unsigned __int128 scale = 1;
	for (int i = 0; i < decimals; i++)
		scale *= 10;
	unsigned __int128 v = (num * scale + den / 2) / den;
	char buf[64];
	if (decimals)
		std::snprintf(buf, sizeof(buf), "%llu.%0*llu", (unsigned long long)(v / scale),
			      decimals, (unsigned long long)(v % scale));
	else
		std::snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);
	return buf;
}

inline std::uint64_t ns_since(Clock::time_point t)
{
	return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count();
}

