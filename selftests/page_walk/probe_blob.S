/* SPDX-License-Identifier: MIT */
/* The access-probe image, built into the program that loads it into a KVM guest. */
	.section .rodata
	.balign 4096
	.globl pw_probe_image, pw_probe_image_end
pw_probe_image:
	.incbin PW_PROBE_BIN
pw_probe_image_end:

	.section .note.GNU-stack, "", @progbits
