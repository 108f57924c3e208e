// SPDX-License-Identifier: MIT
/*
 * memcpy, memmove, memset, memcmp and strlen for guest code.
 *
 * The compiler emits calls to these for struct copies and loops even in
 * guest code, and guest code cannot reach libc (it is not loaded into the
 * guest). Test binaries define them here - the kernel's KVM selftests do the
 * same (lib/string_override.c) - so that those calls bind to code inside the
 * executable, which the guest environment loads. Host code uses them too; they
 * are simple, not fast.
 */
#include <stddef.h>

extern "C" {

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = static_cast<unsigned char *>(dst);
	const unsigned char *s = static_cast<const unsigned char *>(src);
	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = static_cast<const unsigned char *>(a);
	const unsigned char *y = static_cast<const unsigned char *>(b);
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

} // extern "C"
