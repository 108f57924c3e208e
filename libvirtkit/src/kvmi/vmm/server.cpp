// SPDX-License-Identifier: MIT
/*
 * virtkit::Introspection and the server's core: connect + handshake, the
 * reader thread, command dispatch with the VMM's policy, CONTROL_CMD_RESPONSE
 * batching, and the teardown that undoes everything on disconnect.
 */
#include "kvmi/vmm/server.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <new>

#include <virtkit/error.hpp>
#include <virtkit/memory.hpp>

#include "core/library_thread.hpp"

namespace virtkit {

namespace detail {

int kvmi_error(int err)
{
	switch (err) {
	case EPERM: return -KVMI_EPERM;
	case ENOENT: return -KVMI_ENOENT;
	case E2BIG: return -KVMI_E2BIG;
	case EAGAIN: return -KVMI_EAGAIN;
	case ENOMEM: return -KVMI_ENOMEM;
	case ENOSPC: return -KVMI_ENOMEM; /* out of memslots or SPP table pages */
	case EBUSY: return -KVMI_EBUSY;
	case EINVAL: return -KVMI_EINVAL;
	case EOPNOTSUPP: return -KVMI_EOPNOTSUPP;
	default: return -KVMI_EFAULT;
	}
}

IntrospectionServer::IntrospectionServer(Vm vm, const IntrospectionOptions &o)
	: vm_(std::move(vm)),
	  allowed_commands_(o.allowed_commands), allowed_events_(o.allowed_events),
	  share_memory_(o.share_memory),
	  reply_poll_(kvmi::polls_on_this_cpu_set() ? o.reply_poll : std::chrono::microseconds(0))
{
}

IntrospectionServer::~IntrospectionServer()
{
	if (reader_.joinable()) {
		/* The reader may drop the last reference itself. */
		if (reader_.get_id() == std::this_thread::get_id())
			reader_.detach();
		else
			reader_.join();
	}
}

void IntrospectionServer::start(std::unique_ptr<kvmi::Connection> conn)
{
	conn_ = std::move(conn);
	attach_stray_msr_exits(vm_);
	attach_stray_debug_exits(vm_);
	/* Every event carries the registers: KVM returns them with each exit. */
	RunControl::sync_regs(vm_);
	std::weak_ptr<IntrospectionServer> weak = weak_from_this();
	/*
	 * After sub-page protection (INT_MIN), which takes the guest writes
	 * to restricted pages: MSR and debug exits, reads of hidden pages.
	 */
	exit_reg_ = vm_.add_exit_handler(
		[weak](Vcpu &v, Exit &e) {
			auto self = weak.lock();
			return self ? self->on_exit(v, e) : ExitAction::pass;
		},
		INT_MIN + 1);
	{
		std::lock_guard lock(mu_);
		connected_ = true;
	}
	reader_ = start_library_thread<std::thread>(
		[self = shared_from_this()] { self->reader_main(); });
}

void IntrospectionServer::release_vm() noexcept
{
	RunControl::release_work(vm_, this);
}

bool IntrospectionServer::connected() const noexcept
{
	std::lock_guard lock(mu_);
	return connected_;
}

void IntrospectionServer::request_stop() noexcept
{
	{
		std::lock_guard lock(mu_);
		stopping_ = true;
		connected_ = false;
		settled_.fetch_add(1, std::memory_order_release);
	}
	cv_.notify_all();
	if (conn_)
		conn_->cancel();
}

void IntrospectionServer::disconnect() noexcept
{
	request_stop();
	std::lock_guard lock(join_mu_);
	/* The reader tears down when it returns; it never waits for itself. */
	if (reader_.joinable() && reader_.get_id() != std::this_thread::get_id())
		reader_.join();
}

bool IntrospectionServer::wait_disconnected(std::chrono::milliseconds timeout) const
{
	std::unique_lock lock(mu_);
	return cv_.wait_for(lock, timeout, [&] { return torn_down_; });
}

IntrospectionStats IntrospectionServer::stats() const
{
	return {n_commands_.load(), n_events_.load(), n_errors_.load(), n_polled_replies_.load()};
}

bool IntrospectionServer::command_allowed(std::uint16_t id) const
{
	if (kvmi::always_allowed_command(id) || !allowed_commands_)
		return true;
	return std::find(allowed_commands_->begin(), allowed_commands_->end(), id) !=
	       allowed_commands_->end();
}

bool IntrospectionServer::event_allowed(std::uint16_t id) const
{
	if (!allowed_events_)
		return true;
	return std::find(allowed_events_->begin(), allowed_events_->end(), id) !=
	       allowed_events_->end();
}

KvmiVcpu &IntrospectionServer::record_locked(std::uint16_t id)
{
	auto &r = vcpus_[id];
	if (!r) {
		r = std::make_unique<KvmiVcpu>();
		r->id = id;
		/* Enabled already: the vCPU reports itself before its next entry. */
		r->create_pending = vm_events_ >> KVMI_EVENT_CREATE_VCPU & 1;
	}
	return *r;
}

namespace {

/*
 * Commands whose replies may wait in the connection's queue while the
 * next buffered message runs: they neither raise events nor wake a vCPU,
 * so an event can never overtake a reply the tool is owed.
 */
bool reply_may_wait(std::uint16_t id)
{
	switch (id) {
	case KVMI_GET_VERSION:
	case KVMI_CHECK_COMMAND:
	case KVMI_CHECK_EVENT:
	case KVMI_GET_GUEST_INFO:
	case KVMI_READ_PHYSICAL:
	case KVMI_WRITE_PHYSICAL:
	case KVMI_GET_MAX_GFN:
	case KVMI_QUERY_PHYSICAL:
		return true;
	default:
		return false;
	}
}

/* Queued replies beyond this are sent before the next command runs. */
constexpr std::size_t max_queued = 256 * 1024;

} // namespace

/*
 * Messages run one at a time, in arrival order (a reply to a command never
 * overtakes the reply to an earlier one), by whichever thread holds the
 * read role (read_mu_): the reader thread, or a vCPU thread polling for its
 * event's reply (poll_for_reply()), which thus completes its own reply
 * without waking the reader. Anything that breaks the framing ends the
 * connection: the stream cannot be trusted after it.
 *
 * Replies go out in batches: the connection reads whatever the socket has,
 * and while the next message is already buffered, the replies of commands
 * that cannot raise events (reply_may_wait) wait in the connection's queue;
 * it is flushed, in one sendmsg(), before any other message runs, before
 * the role is given up or waits for more bytes, and past max_queued bytes.
 * A window of pipelined READ_PHYSICAL commands thus costs one recv() and
 * one sendmsg() on this side.
 *
 * Run every whole message the connection has, reading the socket without
 * waiting; with may_block (the reader thread) also wait for the rest of a
 * message that has begun to arrive. The role is given up with no whole
 * message buffered and nothing queued, so a reader asleep on the socket
 * misses nothing. false: the connection ends (the tool closed it, a read or
 * send failed, or a message broke the protocol: read_error_).
 */
bool IntrospectionServer::drain_locked(bool may_block)
{
	if (read_ended_)
		return false;
	auto end = [&](bool error) {
		if (error) {
			n_errors_++;
			read_error_ = true;
		}
		read_ended_ = true;
		return false;
	};
	/* A reply that cannot be sent ends the connection as a failed send always did. */
	auto flushed = [&] { return conn_->flush() || end(true); };
	for (;;) {
		if (!conn_->message_buffered()) {
			if (!flushed())
				return false;
			int got = conn_->fill();
			if (got < 0)
				return end(false);
			if (got > 0)
				continue;
			if (!may_block || !conn_->partial_message())
				return true;
			if (!conn_->wait_socket_readable())
				return end(false);
			continue;
		}
		kvmi_msg_hdr hdr;
		(void)conn_->read_exact(&hdr, sizeof(hdr));
		if (hdr.size > KVMI_MSG_SIZE)
			return end(true);
		(void)conn_->read_exact(payload_.data(), hdr.size);
		const bool may_wait = hdr.id != KVMI_EVENT_REPLY && reply_may_wait(hdr.id);
		if (!may_wait && !flushed())
			return false;
		std::span<const std::byte> p(payload_.data(), hdr.size);
		bool ok;
		try {
			ok = hdr.id == KVMI_EVENT_REPLY ? complete_event(hdr, p)
							: handle_command(hdr, p);
		} catch (...) {
			ok = false;
		}
		if (!ok)
			return end(true);
		if (!may_block && hdr.id == KVMI_EVENT_REPLY)
			n_polled_replies_++;
		if ((!may_wait || conn_->queued() >= max_queued) && !flushed())
			return false;
	}
}

void IntrospectionServer::reader_main()
{
	for (;;) {
		{
			std::lock_guard role(read_mu_);
			if (!drain_locked(true))
				break;
		}
		if (!conn_->wait_socket_readable())
			break;
		/* A polling vCPU reads what came: do not race it for the role. */
		std::unique_lock lock(mu_);
		cv_.wait(lock, [&] { return pollers_ == 0 || stopping_; });
	}
	bool error;
	{
		std::lock_guard role(read_mu_);
		read_ended_ = true;
		/* What was answered before the end still reaches the tool. */
		(void)conn_->flush();
		error = read_error_;
	}
	{
		std::lock_guard lock(mu_);
		if (!stopping_ && !error)
			closed_by_tool_ = true;
	}
	teardown();
}

/*
 * Undo everything the tool set, in an order that never leaves a vCPU
 * waiting: first the connection state (every waiter resumes as CONTINUE),
 * then the KVM-side changes, then our hooks in the VM.
 */
void IntrospectionServer::teardown() noexcept
{
	request_stop();
	remove_restrictions();
	remove_msr_filter();
	remove_guest_debug();
	{
		std::lock_guard lock(mu_);
		for (auto &[id, r] : vcpus_) {
			r->pauses = 0;
			r->inject.reset();
		}
	}
	exit_reg_.reset();
	release_vm();
	{
		std::lock_guard lock(mu_);
		torn_down_ = true;
	}
	cv_.notify_all();
}

/*
 * A command: execute it and reply, unless replies are switched off by
 * CONTROL_CMD_RESPONSE. Then the first error is kept for the reply to the
 * command that switches them on again (libkvmi's batch suffix), and the
 * remaining commands still run: the protocol has no rollback.
 */
bool IntrospectionServer::handle_command(const kvmi_msg_hdr &hdr, std::span<const std::byte> p)
{
	if (hdr.id == VIRTKIT_KVMI_SHARE_MEMORY)
		return share_memory(hdr, p);
	n_commands_++;
	auto &out = reply_; /* reused: no allocation per command */
	out.clear();
	int err;
	bool reply;
	if (hdr.id == KVMI_CONTROL_CMD_RESPONSE && kvmi::payload_size_ok(hdr.id, p)) {
		auto c = kvmi::load<kvmi_control_cmd_response>(p);
		if (c.enable > 1 || c.now > 1 || !VK_KVMI_ZERO(c.padding1) || !VK_KVMI_ZERO(c.padding2)) {
			err = -KVMI_EINVAL;
			reply = replies_enabled_;
		} else {
			/* now: the new setting applies to this command's own reply. */
			if (c.now)
				replies_enabled_ = c.enable;
			reply = replies_enabled_;
			err = c.enable ? batch_error_ : 0;
			batch_error_ = 0;
			replies_enabled_ = c.enable;
		}
	} else {
		err = execute(hdr.id, p, out);
		reply = replies_enabled_;
		if (!reply && err && !batch_error_)
			batch_error_ = err;
	}
	if (err)
		n_errors_++;
	if (!reply)
		return true;
	kvmi_error_code ec{err, 0};
	if (err)
		out.clear();
	kvmi_msg_hdr rh{hdr.id, static_cast<std::uint16_t>(sizeof(ec) + out.size()), hdr.seq};
	/* The read role sends it (drain_locked(): alone or with the next replies). */
	conn_->queue(rh, {std::as_bytes(std::span(&ec, 1)), std::span<const std::byte>(out)});
	return true;
}

int IntrospectionServer::execute(std::uint16_t id, std::span<const std::byte> p,
				 std::vector<std::byte> &out)
{
	if (!kvmi::known_command(id))
		return -KVMI_ENOSYS;
	if (!command_allowed(id))
		return -KVMI_EPERM;
	if (!kvmi::supported_command(id))
		return -KVMI_EOPNOTSUPP;
	try {
		if (!kvmi::vcpu_command(id)) {
			if (!kvmi::payload_size_ok(id, p))
				return -KVMI_EINVAL;
			return vm_command(id, p, out);
		}
		if (p.size() < sizeof(kvmi_vcpu_hdr))
			return -KVMI_EINVAL;
		auto vh = kvmi::load<kvmi_vcpu_hdr>(p);
		auto rest = p.subspan(sizeof(vh));
		if (!VK_KVMI_ZERO(vh.padding1) || !VK_KVMI_ZERO(vh.padding2) ||
		    !kvmi::payload_size_ok(id, rest))
			return -KVMI_EINVAL;
		auto vcpu = RunControl::vcpu(vm_, vh.vcpu);
		if (!vcpu)
			return -KVMI_EINVAL;
		return vcpu_command(id, *vcpu, rest, out);
	} catch (const Error &e) {
		out.clear();
		return kvmi_error(e.err());
	} catch (const std::bad_alloc &) {
		out.clear();
		return -KVMI_ENOMEM;
	}
}

ExitAction IntrospectionServer::on_exit(Vcpu &vcpu, Exit &exit)
{
	if (auto *m = std::get_if<MsrExit>(&exit))
		return on_msr_exit(vcpu, *m);
	if (auto *d = std::get_if<DebugExit>(&exit))
		return on_debug_exit(vcpu, *d);
	if (auto *m = std::get_if<MmioExit>(&exit))
		return on_mmio_read(vcpu, *m);
	return ExitAction::pass;
}

} // namespace detail

/* --- the public handle --- */

namespace {

constexpr const char connect_op[] = "Introspection::connect";

void check_ids(const std::optional<std::vector<std::uint16_t>> &ids, bool events)
{
	if (!ids)
		return;
	for (auto id : *ids)
		if (events ? !detail::kvmi::known_event(id) : !detail::kvmi::known_command(id))
			throw Error(connect_op, EINVAL,
				    std::string(events ? "allowed_events" : "allowed_commands") +
					    ": unknown id " + std::to_string(id));
}

std::uint64_t max_gpa(const GuestMemory &mem)
{
	std::uint64_t end = 0;
	for (const auto &r : mem.regions())
		end = std::max(end, r.gpa + r.size);
	return end;
}

} // namespace

Introspection Introspection::connect(Vm &vm, const IntrospectionOptions &o)
{
	std::string why;
	auto address = detail::kvmi::parse_address(o.address, &why);
	if (!address)
		throw Error(connect_op, EINVAL, "address \"" + o.address + "\": " + why);
	if (o.name.size() > 63 || o.name.find('\0') != std::string::npos)
		throw Error(connect_op, EINVAL, "the name must be at most 63 bytes without NUL");
	if (o.handshake_timeout.count() <= 0)
		throw Error(connect_op, EINVAL, "handshake_timeout must be positive");
	if (o.reply_poll.count() < 0 || o.reply_poll > std::chrono::seconds(1))
		throw Error(connect_op, EINVAL, "reply_poll must be 0 to 1 s");
	check_ids(o.allowed_commands, false);
	check_ids(o.allowed_events, true);

	auto server = std::make_shared<detail::IntrospectionServer>(
		detail::RunControl::handle(vm), o);
	/* The VM's VcpuWork slot is the "one introspection per VM" lock. */
	if (!detail::RunControl::claim_work(vm, server))
		throw Error(connect_op, EBUSY, "the VM already has an introspection");
	try {
		kvmi_qemu2introspector hello{};
		hello.struct_size = sizeof(hello);
		std::memcpy(hello.uuid, o.uuid.data(), sizeof(hello.uuid));
		/* Milliseconds, as QEMU sends it (qemu_clock_get_ms(QEMU_CLOCK_REALTIME)). */
		hello.start_time = o.start_time ? o.start_time :
				   std::chrono::duration_cast<std::chrono::milliseconds>(
					   std::chrono::system_clock::now().time_since_epoch())
					   .count();
		std::memcpy(hello.name, o.name.data(), o.name.size());
		hello.max_gpa = max_gpa(vm.memory());
		auto deadline = detail::kvmi::deadline_after(o.handshake_timeout);
		std::optional<detail::kvmi::CookieHash> hash;
		if (!o.secret.empty())
			hash = detail::kvmi::cookie_hash(o.secret);
		auto conn = detail::kvmi::Connection::open(*address, hello,
							   hash ? &*hash : nullptr, deadline, o.stop);
		if (!hash)
			/*
			 * As QEMU's kvmi without a key: any tool is accepted
			 * (libkvmi's examples leave cookie_hash zero). Say so
			 * once per connection (not per attempt of a VMM that
			 * retries) - the library has no logging hook.
			 */
			std::fprintf(stderr,
				     "virtkit: warning: introspection of this VM without a secret: "
				     "whoever listens on %s gets full control of the guest's "
				     "memory and vCPUs\n",
				     o.address.c_str());
		server->start(std::move(conn));
	} catch (...) {
		server->release_vm();
		throw;
	}
	return Introspection(std::move(server));
}

Introspection::Introspection() noexcept = default;
Introspection::Introspection(std::shared_ptr<detail::IntrospectionServer> s) noexcept
	: server_(std::move(s)) {}
Introspection::Introspection(Introspection &&) noexcept = default;

Introspection &Introspection::operator=(Introspection &&o) noexcept
{
	if (this != &o) {
		disconnect();
		server_ = std::move(o.server_);
	}
	return *this;
}

Introspection::~Introspection() { disconnect(); }

bool Introspection::connected() const noexcept { return server_ && server_->connected(); }

bool Introspection::unhook(std::chrono::milliseconds timeout)
{
	return server_ ? server_->unhook(timeout) : true;
}

void Introspection::disconnect() noexcept
{
	if (server_)
		server_->disconnect();
}

bool Introspection::wait_disconnected(std::chrono::milliseconds timeout) const
{
	return server_ ? server_->wait_disconnected(timeout) : true;
}

IntrospectionStats Introspection::stats() const
{
	return server_ ? server_->stats() : IntrospectionStats{};
}

std::vector<std::uint16_t> Introspection::supported_commands()
{
	std::vector<std::uint16_t> ids;
	for (std::uint16_t id = 0; id < KVMI_NUM_MESSAGES; id++)
		if (detail::kvmi::supported_command(id))
			ids.push_back(id);
	return ids;
}

std::vector<std::uint16_t> Introspection::supported_events()
{
	const bool int3 = detail::IntrospectionServer::int3_exits();
	std::vector<std::uint16_t> ids;
	for (std::uint16_t id = 0; id < KVMI_NUM_EVENTS; id++)
		if (detail::kvmi::supported_event(id, int3))
			ids.push_back(id);
	return ids;
}

} // namespace virtkit
