// SPDX-License-Identifier: MIT
/*
 * An 8250/16550A UART as Linux's 8250 driver sees it at 0x3f8 (ttyS0): the
 * divisor latch, interrupt enable and identification, a 16-byte receive
 * FIFO, line and modem status, scratch, loopback. Transmitted bytes go to a
 * sink at once, so the transmitter is always empty; its "THR empty"
 * interrupt follows QEMU's model (raised when a byte was sent and when the
 * guest enables it while the THR is empty, cleared by reading IIR or writing
 * THR), which the driver relies on to keep sending.
 *
 * Thread-safe: vCPU threads do port I/O, the input thread receives.
 */
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>

namespace virtkit::tool::run {

class Uart {
public:
	static constexpr std::uint16_t com1_port = 0x3f8;
	static constexpr std::uint32_t com1_irq = 4;
	static constexpr std::size_t fifo_size = 16;

	/*
	 * set_irq(level) drives the UART's interrupt line (called with the
	 * lock held, only on changes); output(byte) takes what the guest sends.
	 */
	Uart(std::function<void(bool)> set_irq, std::function<void(std::uint8_t)> output);

	/* A guest IN/OUT at base + offset (offset 0-7). */
	std::uint8_t read(std::uint16_t offset);
	void write(std::uint16_t offset, std::uint8_t value);

	/* Receive bytes from the terminal; false when the FIFO is full (try later). */
	bool receive(std::uint8_t byte);
	/* Whether the guest has room for another byte (the FIFO is not full). */
	bool can_receive();
	/* The registers and the interrupt line, for --verbose's report. */
	std::string describe();

private:
	std::uint8_t iir_locked() const;
	void update_irq_locked();
	void receive_locked(std::uint8_t byte);

	std::mutex lock_;
	std::function<void(bool)> set_irq_;
	std::function<void(std::uint8_t)> output_;
	std::deque<std::uint8_t> rx_;
	std::uint16_t divisor_ = 12;	/* 9600 baud */
	std::uint8_t ier_ = 0, lcr_ = 0, mcr_ = 0, lsr_ = 0, msr_ = 0, scr_ = 0, fcr_ = 0;
	bool thr_pending_ = false;
	bool irq_ = false;
};

} // namespace virtkit::tool::run
