// SPDX-License-Identifier: MIT
/*
 * A minimal libvirtkit consumer: open KVM, create a VM with 1 MiB of guest
 * RAM, and write and read back a value through the VMM's view of it.
 * Built against an installed libvirtkit with pkg-config or CMake.
 */
#include <virtkit/virtkit.hpp>

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <exception>

int main()
{
	try {
		auto sys = virtkit::System::open();
		std::printf("KVM API %d\n", sys.api_version());

		auto vm = sys.create_vm();
		vm.memory().add(0, 1 << 20);

		const std::uint64_t gpa = 0x1000;
		const std::uint64_t value = 0x7669727400c0ffeeULL;
		vm.memory().write_obj(gpa, value);
		auto back = vm.memory().read_obj<std::uint64_t>(gpa);
		std::printf("guest[0x%" PRIx64 "] = 0x%" PRIx64 "\n", gpa, back);
		if (back != value) {
			std::fprintf(stderr, "consumer: read back 0x%" PRIx64
				     ", expected 0x%" PRIx64 "\n", back, value);
			return 1;
		}
	} catch (const virtkit::Error &e) {
		std::fprintf(stderr, "consumer: %s\n", e.what());
		return 1;
	} catch (const std::exception &e) {
		std::fprintf(stderr, "consumer: %s\n", e.what());
		return 1;
	}
	std::printf("libvirtkit %s consumer: ok\n", VIRTKIT_VERSION_STRING);
	return 0;
}
