// SPDX-License-Identifier: MIT
/*
 * A minimal consumer of both installed libraries, the two ends of KVMI in
 * one process: the tool (libvirtkit-introspect) listens on a unix socket,
 * a libvirtkit VM with one vCPU connects to it (virtkit::Introspection),
 * the two run the handshake, and the tool sends GET_VERSION and
 * GET_GUEST_INFO. Built against an installed virtkit with pkg-config
 * (virtkit-introspect) or CMake (virtkit::introspect).
 */
#include <virtkit/introspect.hpp>
#include <virtkit/introspection.hpp>
#include <virtkit/virtkit.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <future>
#include <string>

#include <unistd.h>

using namespace std::chrono_literals;
namespace intro = virtkit::introspect;

int main()
{
	char dir[] = "/tmp/virtkit-introspect-consumer.XXXXXX";
	if (!mkdtemp(dir)) {
		std::perror("consumer: mkdtemp");
		return 1;
	}
	const std::string path = std::string(dir) + "/tool.sock";
	int rc = 1;
	try {
		auto sys = virtkit::System::open();
		auto vm = sys.create_vm();
		vm.memory().add(0, 1 << 20);
		auto vcpu = vm.create_vcpu(0);

		/* The tool's end. */
		auto listener = intro::Listener::unix_socket(path);
		const std::string secret = "introspect-consumer";

		/* The VMM's end: connect() waits for the tool's half of the
		 * handshake, so it runs on a thread while this one accepts. */
		virtkit::IntrospectionOptions o;
		o.address = listener.address();
		o.secret = secret;
		o.name = "consumer-vm";
		auto vmm = std::async(std::launch::async,
				      [&] { return virtkit::Introspection::connect(vm, o); });
		auto session = intro::Session::accept(listener, secret, 5000ms);
		auto intro_vm = vmm.get();

		std::printf("handshake: VM \"%s\" (struct_size %u)\n",
			    session.info().name.c_str(), session.info().struct_size);
		auto v = session.get_version();
		std::printf("GET_VERSION: KVMI version %u, spp=%d\n", v.version, v.spp);
		auto vcpus = session.get_guest_info();
		std::printf("GET_GUEST_INFO: %u vCPU(s)\n", vcpus);

		if (session.info().name != "consumer-vm" || v.version == 0 || vcpus != 1) {
			std::fprintf(stderr, "consumer: unexpected answers\n");
		} else {
			session.close();
			if (!intro_vm.wait_disconnected(5000ms))
				std::fprintf(stderr, "consumer: the VMM did not see the tool close\n");
			else
				rc = 0;
		}
	} catch (const std::exception &e) {
		std::fprintf(stderr, "consumer: %s\n", e.what());
	}
	unlink(path.c_str());
	rmdir(dir);
	if (rc == 0)
		std::printf("libvirtkit %s introspect-consumer: ok\n", VIRTKIT_VERSION_STRING);
	return rc;
}
