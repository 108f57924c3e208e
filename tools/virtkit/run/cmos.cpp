// SPDX-License-Identifier: MIT
/* The CMOS RTC (cmos.hpp): MC146818 registers 0-0xd and the century at 0x32. */
#include "cmos.hpp"

#include <ctime>

namespace virtkit::tool::run {
namespace {

std::uint8_t bcd(int v)
{
	return std::uint8_t((v / 10) << 4 | (v % 10));
}

} // namespace

std::uint8_t Cmos::read(std::uint16_t port)
{
	std::lock_guard g(lock_);
	if (port == index_port)
		return 0xff;
	std::time_t now = std::time(nullptr);
	std::tm tm{};
	gmtime_r(&now, &tm);
	switch (index_) {
	case 0x00: return bcd(tm.tm_sec);
	case 0x02: return bcd(tm.tm_min);
	case 0x04: return bcd(tm.tm_hour);
	case 0x06: return bcd(tm.tm_wday + 1);
	case 0x07: return bcd(tm.tm_mday);
	case 0x08: return bcd(tm.tm_mon + 1);
	case 0x09: return bcd(tm.tm_year % 100);
	case 0x32: return bcd(19 + tm.tm_year / 100);
	case 0x0a: return 0x26;	/* 32.768 kHz time base, 1024 Hz; UIP clear */
	case 0x0b: return 0x02;	/* 24-hour, BCD, no interrupts */
	case 0x0c: return 0x00;	/* no interrupt flags */
	case 0x0d: return 0x80;	/* valid RAM and time */
	}
	return ram_[index_];
}

void Cmos::write(std::uint16_t port, std::uint8_t value)
{
	std::lock_guard g(lock_);
	if (port == index_port)
		index_ = value & 0x7f;	/* bit 7 masks NMIs on real hardware */
	else
		ram_[index_] = value;
}

} // namespace virtkit::tool::run
