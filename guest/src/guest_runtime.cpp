// SPDX-License-Identifier: MIT
/*
 * Guest-side runtime: ucalls, assertion reports, formatted messages and the
 * exception router. Everything here runs inside the guest: no libc calls, and
 * the file is compiled so that the compiler does not turn loops into calls to
 * memset/memcpy (see the Makefile).
 */
#include <stdarg.h>

#include <virtkit/x86/guest.h>

extern "C" {

/* Guest handlers per vector; written by the host (GuestVm::install_exception_handler). */
virtkit_ex_handler virtkit_guest_handlers[256];

static void copy_str(char *dst, uint64_t size, const char *src)
{
	uint64_t i = 0;
	for (; src && src[i] && i + 1 < size; i++)
		dst[i] = src[i];
	dst[i] = 0;
}

static void port_kick(void)
{
	/* The data is in the per-CPU page; the port write is the doorbell. */
	__asm__ volatile("outb %%al, %w0" ::"d"(VIRTKIT_UCALL_PORT), "a"(0) : "memory");
}

void virtkit_guest_ucall(uint64_t cmd, uint64_t nargs, ...)
{
	struct virtkit_ucall *uc = &guest_percpu()->ucall;
	va_list ap;

	uc->cmd = cmd;
	uc->nargs = nargs > VIRTKIT_UCALL_MAX_ARGS ? VIRTKIT_UCALL_MAX_ARGS : nargs;
	va_start(ap, nargs);
	for (uint64_t i = 0; i < uc->nargs; i++)
		uc->args[i] = va_arg(ap, uint64_t);
	va_end(ap);
	uc->line = 0;
	uc->file[0] = 0;
	uc->message[0] = 0;
	port_kick();
}

static int format(char *buf, uint64_t size, const char *fmt, va_list ap);

void virtkit_guest_assert_fail(const char *file, int line, const char *fmt, ...)
{
	struct virtkit_ucall *uc = &guest_percpu()->ucall;
	va_list ap;

	uc->cmd = VIRTKIT_UCALL_ASSERT;
	uc->nargs = 0;
	uc->line = (uint64_t)line;
	copy_str(uc->file, sizeof(uc->file), file);
	va_start(ap, fmt);
	format(uc->message, sizeof(uc->message), fmt, ap);
	va_end(ap);
	for (;;)
		port_kick(); /* the host does not resume a failed guest */
}

void virtkit_guest_printf(const char *fmt, ...)
{
	struct virtkit_ucall *uc = &guest_percpu()->ucall;
	va_list ap;

	uc->cmd = VIRTKIT_UCALL_PRINT;
	uc->nargs = 0;
	uc->line = 0;
	uc->file[0] = 0;
	va_start(ap, fmt);
	format(uc->message, sizeof(uc->message), fmt, ap);
	va_end(ap);
	port_kick();
}

void virtkit_guest_done(void)
{
	for (;;)
		virtkit_guest_ucall(VIRTKIT_UCALL_DONE, 0);
}

int virtkit_guest_snprintf(char *buf, uint64_t size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = format(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

struct out {
	char *buf;
	uint64_t size;
	uint64_t len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void put_num(struct out *o, unsigned long long v, unsigned base, bool upper,
		    bool neg, int width, bool zero)
{
	char tmp[24];
	int n = 0;
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	int len = n + (neg ? 1 : 0);
	if (neg && zero)
		put(o, '-');
	for (; len < width; len++)
		put(o, zero ? '0' : ' ');
	if (neg && !zero)
		put(o, '-');
	while (n)
		put(o, tmp[--n]);
}

static int format(char *buf, uint64_t size, const char *fmt, va_list ap)
{
	struct out o = {buf, size, 0};

	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		fmt++;
		bool zero = false;
		int width = 0, lng = 0;
		if (*fmt == '0') {
			zero = true;
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng++;
			fmt++;
		}
		switch (*fmt) {
		case 'd':
		case 'i': {
			long long v = lng ? va_arg(ap, long long) : va_arg(ap, int);
			unsigned long long u = v < 0 ? 0ull - (unsigned long long)v
						     : (unsigned long long)v;
			put_num(&o, u, 10, false, v < 0, width, zero);
			break;
		}
		case 'u':
			put_num(&o, lng ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned),
				10, false, false, width, zero);
			break;
		case 'x':
		case 'X':
			put_num(&o, lng ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned),
				16, *fmt == 'X', false, width, zero);
			break;
		case 'p':
			put(&o, '0');
			put(&o, 'x');
			put_num(&o, (unsigned long long)va_arg(ap, void *), 16, false, false,
				width, zero);
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			while (*s)
				put(&o, *s++);
			break;
		}
		case 'c':
			put(&o, (char)va_arg(ap, int));
			break;
		case '%':
			put(&o, '%');
			break;
		case 0:
			fmt--;
			break;
		default:
			put(&o, '%');
			put(&o, *fmt);
		}
	}
	if (o.size)
		o.buf[o.len < o.size ? o.len : o.size - 1] = 0;
	return (int)o.len;
}

/* Called by the exception entry code with the saved frame. */
void virtkit_guest_route_exception(struct virtkit_ex_frame *f)
{
	struct virtkit_percpu *pc = guest_percpu();

	if (pc->recover_rip) {
		struct virtkit_exception *ex = (struct virtkit_exception *)pc->catch_info;
		if (ex) {
			ex->vector = f->vector;
			ex->error_code = f->error_code;
			ex->cr2 = f->vector == PF_VECTOR ? guest_read_cr2() : 0;
			ex->rip = f->rip;
		}
		f->rax = f->vector + 1;
		f->rip = pc->recover_rip;
		f->rsp = pc->recover_rsp;
		/* guest_catch() runs at CPL 0, also when fn went on at CPL 3. */
		f->cs = VIRTKIT_SEL_KERNEL_CS;
		f->ss = VIRTKIT_SEL_KERNEL_DS;
		pc->recover_rip = 0;
		return;
	}
	if (virtkit_guest_handlers[f->vector]) {
		virtkit_guest_handlers[f->vector](f);
		return;
	}
	for (;;)
		virtkit_guest_ucall(VIRTKIT_UCALL_UNHANDLED, 4, f->vector, f->error_code,
				    f->rip, f->vector == PF_VECTOR ? guest_read_cr2() : 0);
}

} // extern "C"
