// SPDX-License-Identifier: MIT
/*
 * The 16550A (uart.hpp). Register semantics: the National Semiconductor
 * PC16550D data sheet; where it is silent (THR-empty re-arming), QEMU's
 * hw/char/serial.c, which Linux's driver is known to work with.
 */
#include "uart.hpp"

#include <cstdio>

namespace virtkit::tool::run {
namespace {

enum : std::uint16_t { RBR_THR = 0, IER = 1, IIR_FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7 };

constexpr std::uint8_t ier_rdi = 0x01, ier_thri = 0x02, ier_rlsi = 0x04, ier_msi = 0x08;
constexpr std::uint8_t iir_none = 0x01, iir_msi = 0x00, iir_thri = 0x02, iir_rdi = 0x04,
		       iir_rlsi = 0x06, iir_fifo = 0xc0;
constexpr std::uint8_t fcr_enable = 0x01, fcr_clear_rx = 0x02;
constexpr std::uint8_t lcr_dlab = 0x80;
constexpr std::uint8_t mcr_dtr = 0x01, mcr_rts = 0x02, mcr_out1 = 0x04, mcr_out2 = 0x08,
		       mcr_loop = 0x10;
constexpr std::uint8_t lsr_dr = 0x01, lsr_errors = 0x1e, lsr_thre = 0x20, lsr_temt = 0x40;
constexpr std::uint8_t msr_deltas = 0x0f, msr_cts = 0x10, msr_dsr = 0x20, msr_ri = 0x40,
		       msr_dcd = 0x80;

} // namespace

Uart::Uart(std::function<void(bool)> set_irq, std::function<void(std::uint8_t)> output)
	: set_irq_(std::move(set_irq)), output_(std::move(output))
{
	lsr_ = lsr_thre | lsr_temt;
	/* A terminal is attached: carrier, data set ready, clear to send. */
	msr_ = msr_dcd | msr_dsr | msr_cts;
}

std::uint8_t Uart::iir_locked() const
{
	std::uint8_t fifo = (fcr_ & fcr_enable) ? iir_fifo : 0;
	if ((ier_ & ier_rlsi) && (lsr_ & lsr_errors))
		return iir_rlsi | fifo;
	if ((ier_ & ier_rdi) && (lsr_ & lsr_dr))
		return iir_rdi | fifo;
	if ((ier_ & ier_thri) && thr_pending_)
		return iir_thri | fifo;
	if ((ier_ & ier_msi) && (msr_ & msr_deltas))
		return iir_msi | fifo;
	return iir_none | fifo;
}

void Uart::update_irq_locked()
{
	/* OUT2 gates the line to the interrupt controller on PC hardware. */
	bool level = !(iir_locked() & iir_none) && (mcr_ & mcr_out2);
	if (level != irq_) {
		irq_ = level;
		set_irq_(level);
	}
}

void Uart::receive_locked(std::uint8_t byte)
{
	rx_.push_back(byte);
	lsr_ |= lsr_dr;
}

std::uint8_t Uart::read(std::uint16_t offset)
{
	std::lock_guard g(lock_);
	std::uint8_t v = 0;
	switch (offset) {
	case RBR_THR:
		if (lcr_ & lcr_dlab)
			return std::uint8_t(divisor_);
		if (!rx_.empty()) {
			v = rx_.front();
			rx_.pop_front();
		}
		if (rx_.empty())
			lsr_ &= ~lsr_dr;
		update_irq_locked();
		return v;
	case IER:
		return (lcr_ & lcr_dlab) ? std::uint8_t(divisor_ >> 8) : ier_;
	case IIR_FCR:
		v = iir_locked();
		/* Reading the THR-empty identification acknowledges it. */
		if ((v & 0x0f) == iir_thri) {
			thr_pending_ = false;
			update_irq_locked();
		}
		return v;
	case LCR:
		return lcr_;
	case MCR:
		return mcr_;
	case LSR:
		v = lsr_;
		lsr_ &= ~lsr_errors;
		update_irq_locked();
		return v;
	case MSR:
		if (mcr_ & mcr_loop) {
			/* Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD. */
			return std::uint8_t((mcr_ & mcr_rts ? msr_cts : 0) |
					    (mcr_ & mcr_dtr ? msr_dsr : 0) |
					    (mcr_ & mcr_out1 ? msr_ri : 0) |
					    (mcr_ & mcr_out2 ? msr_dcd : 0));
		}
		v = msr_;
		msr_ &= ~msr_deltas;
		update_irq_locked();
		return v;
	case SCR:
		return scr_;
	}
	return 0xff;
}

void Uart::write(std::uint16_t offset, std::uint8_t value)
{
	std::lock_guard g(lock_);
	switch (offset) {
	case RBR_THR:
		if (lcr_ & lcr_dlab) {
			divisor_ = std::uint16_t((divisor_ & 0xff00) | value);
			return;
		}
		if (mcr_ & mcr_loop)
			receive_locked(value);
		else
			output_(value);
		/* Sent at once: the THR is empty again, which interrupts if enabled. */
		thr_pending_ = true;
		update_irq_locked();
		return;
	case IER:
		if (lcr_ & lcr_dlab) {
			divisor_ = std::uint16_t((divisor_ & 0xff) | value << 8);
			return;
		}
		{
			std::uint8_t changed = (ier_ ^ value) & 0x0f;
			ier_ = value & 0x0f;
			if (changed & ier_thri)
				thr_pending_ = (ier_ & ier_thri) && (lsr_ & lsr_thre);
		}
		update_irq_locked();
		return;
	case IIR_FCR:
		fcr_ = value & 0xc9;
		if (value & fcr_clear_rx) {
			rx_.clear();
			lsr_ &= ~lsr_dr;
		}
		update_irq_locked();
		return;
	case LCR:
		lcr_ = value;
		return;
	case MCR:
		mcr_ = value & 0x1f;
		update_irq_locked();
		return;
	case SCR:
		scr_ = value;
		return;
	}
	/* LSR and MSR are read-only. */
}

bool Uart::can_receive()
{
	std::lock_guard g(lock_);
	return rx_.size() < fifo_size;
}

bool Uart::receive(std::uint8_t byte)
{
	std::lock_guard g(lock_);
	if (rx_.size() >= fifo_size || (mcr_ & mcr_loop))
		return false;
	receive_locked(byte);
	update_irq_locked();
	return true;
}

std::string Uart::describe()
{
	std::lock_guard g(lock_);
	char buf[160];
	std::snprintf(buf, sizeof(buf),
		      "ier %#x iir %#x lsr %#x lcr %#x mcr %#x, THR-empty interrupt %s, "
		      "%zu bytes received unread, line %s",
		      ier_, iir_locked(), lsr_, lcr_, mcr_, thr_pending_ ? "pending" : "not pending",
		      rx_.size(), irq_ ? "high" : "low");
	return buf;
}

} // namespace virtkit::tool::run
