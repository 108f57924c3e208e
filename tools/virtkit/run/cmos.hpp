// SPDX-License-Identifier: MIT
/*
 * The CMOS RTC at ports 0x70/0x71, reading the host's UTC time. Linux reads
 * it at boot for the wall clock; an absent RTC (all ones) makes it warn
 * ("RTC_VALID") and start in 2255. Only reads are modelled: the time in BCD,
 * 24-hour mode, no update in progress, valid RAM; the guest's writes
 * (alarms, setting the time) go to the 128 bytes of CMOS RAM and are
 * forgotten once the clock registers are read again. No RTC interrupt.
 */
#pragma once

#include <array>
#include <cstdint>
#include <mutex>

namespace virtkit::tool::run {

class Cmos {
public:
	static constexpr std::uint16_t index_port = 0x70, data_port = 0x71;

	std::uint8_t read(std::uint16_t port);
	void write(std::uint16_t port, std::uint8_t value);

private:
	std::mutex lock_;
	std::uint8_t index_ = 0;
	std::array<std::uint8_t, 128> ram_{};
};

} // namespace virtkit::tool::run
