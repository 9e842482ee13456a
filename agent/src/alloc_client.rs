//! The agent's side of the allocator (ARCHITECTURE.md §5), through the access switch's gateway
//! (UDP port 6363), which relays to the allocator.
//!
//! [`AllocDriver`] keeps an [`AddressSet`] supplied without ever making traffic wait:
//!
//! - **When** to ask is the set's decision ([`AddressSet::poll_refill`]: the refill lead before
//!   it would run short, so the next set arrives while the current one is still usable). The
//!   driver only adds whether the network is ready: no request in flight, and not backing off.
//! - **How** is the allocator crate's client library: each request is a
//!   [`mimiq_allocator::client::PendingRequest`] (fresh txid and nonce; the library builds the
//!   bytes and recognises the reply), each release a
//!   [`mimiq_allocator::client::PendingRelease`]. The driver owns a non-blocking UDP socket and
//!   is polled from the agent's event loop ([`AllocDriver::poll`]) — the library's blocking
//!   [`AllocClient`] would stall that loop for up to timeout × attempts (2 s by default) on a
//!   lost reply. On exit, where blocking is what we want, [`AllocDriver::release_all`] does use
//!   [`AllocClient`].
//! - **Failures** (no reply within `reply_timeout_ms`: the gateway or allocator is unreachable;
//!   the pool is exhausted; any other refusal; a socket error) come back as
//!   [`AllocEvent::Failed`] with an [`AllocError`], bump a counter, and hold the next request
//!   back for an exponential backoff (`backoff_initial_ms` doubling up to `backoff_max_ms`, with
//!   jitter so many agents do not retry in step); a success resets it. A reply that arrives
//!   after its request timed out is still accepted (the last [`LATE_REPLIES_KEPT`] requests are
//!   remembered): its addresses are ours, and wasting them would only load the pool.
//! - **Releases**: addresses the set will never hand out again ([`AddressSet::poll_release`])
//!   are given back at once (one attempt: a lost release costs nothing, the allocator frees the
//!   address at its expiry anyway), and every address still held at exit
//!   ([`AddressSet::release_all`]).
//!
//! Time is the caller's monotonic clock in milliseconds (`now_ms`), the same one the set uses;
//! the driver reads no clock. Threading: owned by the agent's event loop. Nothing here panics on
//! input: datagrams that are not the reply to something in flight are ignored.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use mimiq_allocator::client::{AllocClient, ClientError, PendingRelease, PendingRequest};
use mimiq_allocator::proto::Status;
use mimiq_allocator::rng::Csprng;
use mimiq_allocator::Family;
use serde::Deserialize;

use crate::addrset::AddressSet;

/// Requests that timed out whose late replies are still accepted.
pub const LATE_REPLIES_KEPT: usize = 4;
/// Most addresses in one request or release (the wire format's count is one byte).
pub const MAX_PER_MESSAGE: usize = 255;

/// Allocator-client settings. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocClientConfig {
    /// A request without a reply this long, in milliseconds, counts as lost (the allocator is
    /// unreachable). Default 500.
    pub reply_timeout_ms: u64,
    /// Wait after the first failure before asking again, in milliseconds. Default 500.
    pub backoff_initial_ms: u64,
    /// Longest wait between attempts after repeated failures, in milliseconds. Default 30,000.
    pub backoff_max_ms: u64,
    /// On exit: wait for the release's reply this long per attempt, in milliseconds.
    /// Default 300.
    pub release_timeout_ms: u64,
    /// On exit: attempts of the release. Default 3.
    pub release_attempts: u32,
}

impl Default for AllocClientConfig {
    fn default() -> Self {
        Self {
            reply_timeout_ms: 500,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            release_timeout_ms: 300,
            release_attempts: 3,
        }
    }
}

/// Why an allocator-client config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocClientConfigError {
    /// A time is zero.
    #[error("allocator: {0} must be at least 1 ms")]
    Zero(&'static str),
    /// `backoff_max_ms` is below `backoff_initial_ms`.
    #[error("allocator: backoff_max_ms ({max}) must be at least backoff_initial_ms ({initial})")]
    Backoff {
        /// `backoff_initial_ms`.
        initial: u64,
        /// `backoff_max_ms`.
        max: u64,
    },
}

impl AllocClientConfig {
    /// Refuses settings the driver cannot follow.
    pub fn validate(&self) -> Result<(), AllocClientConfigError> {
        for (v, name) in [
            (self.reply_timeout_ms, "reply_timeout_ms"),
            (self.backoff_initial_ms, "backoff_initial_ms"),
            (self.release_timeout_ms, "release_timeout_ms"),
        ] {
            if v == 0 {
                return Err(AllocClientConfigError::Zero(name));
            }
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err(AllocClientConfigError::Backoff {
                initial: self.backoff_initial_ms,
                max: self.backoff_max_ms,
            });
        }
        Ok(())
    }
}

/// Why an allocation (or the driver) failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// No reply within `reply_timeout_ms`: the gateway or the allocator behind it is
    /// unreachable (or the reply was lost).
    #[error("allocator unreachable: no reply from the gateway {gateway} within {timeout_ms} ms")]
    Unreachable {
        /// The gateway asked.
        gateway: SocketAddr,
        /// How long the driver waited.
        timeout_ms: u64,
    },
    /// The allocator has no free address left (pool exhausted).
    #[error("allocator out of addresses: the pool is exhausted")]
    OutOfAddresses,
    /// The allocator refused for another reason: rate limited, the client holds its cap of
    /// addresses, or a bad request (e.g. `set_size` above the allocator's `max_per_request`).
    #[error("allocator refused the request: {}", .0.label())]
    Refused(Status),
    /// The socket failed.
    #[error("allocator client socket (gateway {gateway}): {source}")]
    Io {
        /// The gateway.
        gateway: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The allocator client library failed (the OS CSPRNG, or on exit the blocking release).
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Something the driver did that the agent may want to log or act on.
#[derive(Debug)]
pub enum AllocEvent {
    /// An allocation arrived and was added to the set.
    Allocated {
        /// The addresses and their lifetimes, counted from `requested_ms`.
        addrs: Vec<(IpAddr, Duration)>,
        /// When the request was sent (ms, the caller's clock). The allocator started each
        /// lifetime somewhere between then and the reply's arrival; counting from the request
        /// means the agent never uses an address past the allocator's expiry, however long the
        /// reply took (the allocator hands it out again `t_remove` after that expiry, seed 000
        /// §3.3).
        requested_ms: u64,
        /// The gateway the allocator named.
        gateway: IpAddr,
        /// It answered a request that had already timed out.
        late: bool,
        /// From sending the request to its reply (none for a late reply).
        round_trip: Option<Duration>,
    },
    /// An allocation failed; the next attempt is not before `retry_at_ms`.
    Failed {
        /// What went wrong.
        error: AllocError,
        /// When the driver may ask again (ms, the caller's clock).
        retry_at_ms: u64,
    },
    /// These addresses were given back to the allocator (a release sent: the agent no longer
    /// uses them; the allocator may hand them out again `t_remove` after it hears it).
    Releasing {
        /// The addresses.
        addrs: Vec<IpAddr>,
    },
    /// The allocator acknowledged a release.
    Released {
        /// Addresses it released (not counting ones already freed).
        count: u8,
    },
}

/// Counters, for `mimiq_agent_alloc_<name>` metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocCounters {
    /// Allocation requests sent.
    pub requests_total: u64,
    /// Allocations received (replies with addresses).
    pub allocations_total: u64,
    /// Addresses received.
    pub addresses_total: u64,
    /// Allocations that answered a request which had timed out already.
    pub late_replies_total: u64,
    /// Requests without a reply in time.
    pub unreachable_total: u64,
    /// Refusals because the pool was exhausted.
    pub out_of_addresses_total: u64,
    /// Other refusals (rate limited, client cap, bad request, unknown status).
    pub refused_total: u64,
    /// Socket errors.
    pub io_errors_total: u64,
    /// Release messages sent.
    pub releases_total: u64,
    /// Addresses the allocator acknowledged as released.
    pub released_total: u64,
}

/// Keeps an [`AddressSet`] supplied from the allocator (see the module docs).
#[derive(Debug)]
pub struct AllocDriver {
    sock: UdpSocket,
    gateway: SocketAddr,
    family: Family,
    config: AllocClientConfig,
    rng: Csprng,
    in_flight: Option<(PendingRequest, u64)>,
    /// When the request in flight was sent (for its round trip).
    sent_at: Option<Instant>,
    late: VecDeque<(PendingRequest, u64)>,
    releases: VecDeque<(PendingRelease, u64)>,
    failures: u32,
    retry_at_ms: u64,
    last_gateway: Option<IpAddr>,
    counters: AllocCounters,
}

impl AllocDriver {
    /// A driver asking `gateway` for addresses of `family`, from an ephemeral port of the
    /// gateway's family.
    pub fn new(
        gateway: SocketAddr,
        family: Family,
        config: AllocClientConfig,
    ) -> Result<Self, AllocError> {
        let local: SocketAddr = if gateway.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(local).map_err(|source| AllocError::Io { gateway, source })?;
        Self::with_socket(sock, gateway, family, config)
    }

    /// A driver on a socket the caller bound (to the host interface's address, say). The socket
    /// is made non-blocking.
    pub fn with_socket(
        sock: UdpSocket,
        gateway: SocketAddr,
        family: Family,
        config: AllocClientConfig,
    ) -> Result<Self, AllocError> {
        sock.set_nonblocking(true)
            .map_err(|source| AllocError::Io { gateway, source })?;
        let rng = Csprng::new().map_err(ClientError::from)?;
        Ok(Self {
            sock,
            gateway,
            family,
            config,
            rng,
            in_flight: None,
            sent_at: None,
            late: VecDeque::new(),
            releases: VecDeque::new(),
            failures: 0,
            retry_at_ms: 0,
            last_gateway: None,
            counters: AllocCounters::default(),
        })
    }

    /// The socket, for the event loop to wait on (readable: call [`Self::poll`]).
    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// The counters so far.
    pub fn counters(&self) -> AllocCounters {
        self.counters
    }

    /// The gateway named in the last allocation, if any arrived.
    pub fn allocator_gateway(&self) -> Option<IpAddr> {
        self.last_gateway
    }

    /// Whether a request is waiting for its reply.
    pub fn request_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Reads every reply waiting on the socket, notices a request that timed out, asks for the
    /// next set if the set wants one and the driver may, and gives back the addresses the set
    /// no longer hands out. Call it when the socket is readable and at
    /// [`Self::next_timeout_ms`] (and the set's).
    pub fn poll(&mut self, now_ms: u64, set: &mut AddressSet) -> Vec<AllocEvent> {
        let mut events = Vec::new();
        self.receive(now_ms, set, &mut events);
        if let Some((pending, sent_ms)) = self.in_flight {
            if now_ms >= sent_ms.saturating_add(self.config.reply_timeout_ms) {
                self.in_flight = None;
                if self.late.len() == LATE_REPLIES_KEPT {
                    self.late.pop_front();
                }
                self.late.push_back((pending, sent_ms));
                self.counters.unreachable_total += 1;
                let error = AllocError::Unreachable {
                    gateway: self.gateway,
                    timeout_ms: self.config.reply_timeout_ms,
                };
                events.push(self.failed(now_ms, error));
            }
        }
        let timeout = self.config.reply_timeout_ms;
        while self
            .releases
            .front()
            .is_some_and(|&(_, sent)| now_ms >= sent.saturating_add(timeout))
        {
            self.releases.pop_front();
        }
        if self.in_flight.is_none() && now_ms >= self.retry_at_ms {
            if let Some(refill) = set.poll_refill(now_ms) {
                // The set may ask for up to 1024; one request carries at most 255.
                let count = u8::try_from(refill.count).unwrap_or(u8::MAX);
                if let Err(error) = self.send_request(now_ms, count) {
                    events.push(self.failed(now_ms, error));
                }
            }
        }
        let released = set.poll_release(now_ms);
        self.send_releases(now_ms, &released, &mut events);
        events
    }

    /// The next time (ms) [`Self::poll`] has something to do without a datagram arriving: a
    /// reply's deadline, or the end of a backoff. `None`: only the set's timer matters.
    pub fn next_timeout_ms(&self) -> Option<u64> {
        let reply = self
            .in_flight
            .map(|(_, sent)| sent.saturating_add(self.config.reply_timeout_ms));
        let backoff = (self.failures > 0).then_some(self.retry_at_ms);
        let release = self
            .releases
            .front()
            .map(|&(_, sent)| sent.saturating_add(self.config.reply_timeout_ms));
        [reply, backoff, release].into_iter().flatten().min()
    }

    /// On exit: gives back every address the set still holds, blocking until the allocator
    /// acknowledges (each message tried `release_attempts` times, `release_timeout_ms` each).
    /// Returns how many addresses the allocator released.
    pub fn release_all(&mut self, now_ms: u64, set: &mut AddressSet) -> Result<usize, AllocError> {
        let addrs: Vec<IpAddr> = set
            .release_all(now_ms)
            .into_iter()
            .filter(|a| self.is_family(*a))
            .collect();
        if addrs.is_empty() {
            return Ok(0);
        }
        let gateway = self.gateway;
        let io_err = move |source| AllocError::Io { gateway, source };
        let sock = self.sock.try_clone().map_err(io_err)?;
        // The clone shares the file's flags: blocking while the library waits, and non-blocking
        // again afterwards, whatever happened, for the event loop.
        sock.set_nonblocking(false).map_err(io_err)?;
        let result = self.release_blocking(sock, &addrs);
        let restored = self.sock.set_nonblocking(true).map_err(io_err);
        let released = result?;
        restored?;
        Ok(released)
    }

    /// The exit-time release through the library's blocking client.
    fn release_blocking(&mut self, sock: UdpSocket, addrs: &[IpAddr]) -> Result<usize, AllocError> {
        let mut client = AllocClient::with_socket(sock, self.gateway)?;
        client.set_retry(
            Duration::from_millis(self.config.release_timeout_ms),
            self.config.release_attempts,
        );
        let mut released = 0;
        let mut result = Ok(());
        for chunk in addrs.chunks(MAX_PER_MESSAGE) {
            self.counters.releases_total += 1;
            match client.release(self.family, chunk) {
                Ok(n) => released += usize::from(n),
                // Go on with the other chunks; report the (last) failure.
                Err(e) => {
                    self.count_client_error(&e);
                    result = Err(AllocError::Client(e));
                }
            }
        }
        self.counters.released_total += released as u64;
        result.map(|()| released)
    }

    fn receive(&mut self, now_ms: u64, set: &mut AddressSet, events: &mut Vec<AllocEvent>) {
        let mut buf = [0u8; 4096];
        loop {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) if from == self.gateway => {
                    self.on_datagram(now_ms, &buf[..n], set, events)
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // An ICMP port unreachable from an earlier send: the reply timeout reports it.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    self.counters.io_errors_total += 1;
                    let error = AllocError::Io {
                        gateway: self.gateway,
                        source,
                    };
                    events.push(self.failed(now_ms, error));
                    return;
                }
            }
        }
    }

    fn on_datagram(
        &mut self,
        now_ms: u64,
        datagram: &[u8],
        set: &mut AddressSet,
        events: &mut Vec<AllocEvent>,
    ) {
        if let Some((pending, sent_ms)) = self.in_flight {
            if let Some(outcome) = pending.accept(datagram) {
                self.in_flight = None;
                match outcome {
                    Ok(allocation) => {
                        self.failures = 0;
                        self.retry_at_ms = 0;
                        let round_trip = self.sent_at.map(|t| t.elapsed());
                        events.push(self.allocated(sent_ms, allocation, set, false, round_trip));
                    }
                    Err(e) => {
                        self.count_client_error(&e);
                        let error = match e {
                            ClientError::Refused(Status::PoolExhausted) => {
                                AllocError::OutOfAddresses
                            }
                            ClientError::Refused(s) => AllocError::Refused(s),
                            other => AllocError::Client(other),
                        };
                        events.push(self.failed(now_ms, error));
                    }
                }
                return;
            }
        }
        if let Some(i) = self
            .late
            .iter()
            .position(|(p, _)| p.accept(datagram).is_some())
        {
            if let Some((pending, sent_ms)) = self.late.remove(i) {
                // A refusal of a request already given up on changes nothing.
                if let Some(Ok(allocation)) = pending.accept(datagram) {
                    self.counters.late_replies_total += 1;
                    events.push(self.allocated(sent_ms, allocation, set, true, None));
                }
            }
            return;
        }
        if let Some(i) = self
            .releases
            .iter()
            .position(|(p, _)| p.accept(datagram).is_some())
        {
            if let Some((pending, _)) = self.releases.remove(i) {
                if let Some(Ok(count)) = pending.accept(datagram) {
                    self.counters.released_total += u64::from(count);
                    events.push(AllocEvent::Released { count });
                }
            }
        }
    }

    fn allocated(
        &mut self,
        requested_ms: u64,
        allocation: mimiq_allocator::client::Allocation,
        set: &mut AddressSet,
        late: bool,
        round_trip: Option<Duration>,
    ) -> AllocEvent {
        self.counters.allocations_total += 1;
        self.counters.addresses_total += allocation.addrs.len() as u64;
        self.last_gateway = Some(allocation.gateway);
        set.add_allocation(requested_ms, &allocation.addrs);
        AllocEvent::Allocated {
            requested_ms,
            addrs: allocation.addrs,
            gateway: allocation.gateway,
            late,
            round_trip,
        }
    }

    fn send_request(&mut self, now_ms: u64, count: u8) -> Result<(), AllocError> {
        let (pending, bytes) = PendingRequest::new(&mut self.rng, self.family, count)?;
        self.counters.requests_total += 1;
        self.sock.send_to(&bytes, self.gateway).map_err(|source| {
            self.counters.io_errors_total += 1;
            AllocError::Io {
                gateway: self.gateway,
                source,
            }
        })?;
        self.in_flight = Some((pending, now_ms));
        self.sent_at = Some(Instant::now());
        Ok(())
    }

    fn send_releases(&mut self, now_ms: u64, addrs: &[IpAddr], events: &mut Vec<AllocEvent>) {
        let mine: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| self.is_family(*a))
            .collect();
        for chunk in mine.chunks(MAX_PER_MESSAGE) {
            let sent = PendingRelease::new(&mut self.rng, self.family, chunk)
                .map_err(AllocError::Client)
                .and_then(|(pending, bytes)| {
                    self.counters.releases_total += 1;
                    self.sock
                        .send_to(&bytes, self.gateway)
                        .map(|_| pending)
                        .map_err(|source| {
                            self.counters.io_errors_total += 1;
                            AllocError::Io {
                                gateway: self.gateway,
                                source,
                            }
                        })
                });
            match sent {
                Ok(pending) => {
                    self.releases.push_back((pending, now_ms));
                    events.push(AllocEvent::Releasing {
                        addrs: chunk.to_vec(),
                    });
                }
                // Not retried: the allocator frees the addresses at their expiry anyway.
                Err(error) => events.push(AllocEvent::Failed {
                    error,
                    retry_at_ms: self.retry_at_ms.max(now_ms),
                }),
            }
        }
    }

    /// Counts a failure and sets the backoff: `initial · 2^(failures-1)`, capped, jittered into
    /// its upper half.
    fn failed(&mut self, now_ms: u64, error: AllocError) -> AllocEvent {
        self.failures = self.failures.saturating_add(1);
        let backoff = backoff_ms(
            self.config.backoff_initial_ms,
            self.config.backoff_max_ms,
            self.failures,
        );
        let wait = self.rng.in_range(backoff / 2, backoff);
        self.retry_at_ms = now_ms.saturating_add(wait);
        AllocEvent::Failed {
            error,
            retry_at_ms: self.retry_at_ms,
        }
    }

    fn count_client_error(&mut self, e: &ClientError) {
        let c = &mut self.counters;
        match e {
            ClientError::Refused(Status::PoolExhausted) => c.out_of_addresses_total += 1,
            ClientError::Refused(_) => c.refused_total += 1,
            ClientError::Timeout(_) => c.unreachable_total += 1,
            ClientError::Io(_) => c.io_errors_total += 1,
            ClientError::BadArgument(_) | ClientError::Rng(_) => {}
        }
    }

    fn is_family(&self, addr: IpAddr) -> bool {
        match self.family {
            Family::V4 => addr.is_ipv4(),
            Family::V6 => addr.is_ipv6(),
        }
    }
}

/// The backoff after `failures` consecutive failures (≥ 1): `initial · 2^(failures-1)`, at most
/// `max`.
pub fn backoff_ms(initial_ms: u64, max_ms: u64, failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(63);
    initial_ms.saturating_mul(1u64 << doublings).min(max_ms)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use mimiq_allocator::proto::{AllocReply, ClientMsg, ReleaseReply};

    use super::*;
    use crate::addrset::AddressSetConfig;

    /// A gateway socket the test answers by hand.
    struct FakeGateway {
        sock: UdpSocket,
    }

    impl FakeGateway {
        fn new() -> Self {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            Self { sock }
        }

        fn addr(&self) -> SocketAddr {
            self.sock.local_addr().unwrap()
        }

        /// The next datagram from the driver, parsed.
        fn recv(&self) -> (u32, ClientMsg, SocketAddr) {
            let mut buf = [0u8; 4096];
            let (n, from) = self
                .sock
                .recv_from(&mut buf)
                .expect("a datagram from the driver");
            let (txid, msg) = ClientMsg::parse(&buf[..n]).expect("the driver sends valid messages");
            (txid, msg, from)
        }

        fn nothing_sent(&self) -> bool {
            self.sock.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 64];
            let none = self.sock.recv_from(&mut buf).is_err();
            self.sock.set_nonblocking(false).unwrap();
            none
        }

        /// Answers an AllocRequest with `status` and addresses 10.0.0.n for n in `hosts`.
        fn answer(&self, txid: u32, req: &ClientMsg, to: SocketAddr, status: Status, hosts: &[u8]) {
            let ClientMsg::AllocRequest(req) = req else {
                panic!("not a request: {req:?}")
            };
            let mut out = Vec::new();
            ClientMsg::AllocReply(AllocReply {
                status,
                family: Family::V4,
                prefix_len: 32,
                nonce: req.nonce,
                gateway: "10.0.0.1".parse().unwrap(),
                addrs: hosts
                    .iter()
                    .map(|&h| (IpAddr::V4(Ipv4Addr::new(10, 0, 0, h)), 10_000))
                    .collect(),
            })
            .emit(txid, &mut out)
            .unwrap();
            self.sock.send_to(&out, to).unwrap();
        }
    }

    fn set() -> AddressSet {
        let config = AddressSetConfig {
            expiry_margin_ms: 1_000,
            refill_lead_ms: 2_000,
            refill_retry_ms: 100,
            set_size: 3,
            min_usable: 2,
        };
        AddressSet::new(config, 5).unwrap()
    }

    fn config() -> AllocClientConfig {
        AllocClientConfig {
            reply_timeout_ms: 200,
            backoff_initial_ms: 400,
            backoff_max_ms: 3_000,
            release_timeout_ms: 100,
            release_attempts: 2,
        }
    }

    /// Polls until the reply sent by the test has arrived on the driver's socket (a few
    /// seconds at most).
    fn poll_until(
        driver: &mut AllocDriver,
        now_ms: u64,
        set: &mut AddressSet,
        what: impl Fn(&[AllocEvent]) -> bool,
    ) -> Vec<AllocEvent> {
        mimiq_testkit::eventually(Duration::from_secs(5), || {
            let events = driver.poll(now_ms, set);
            if what(&events) {
                Ok(events)
            } else {
                Err(format!("events at {now_ms} ms: {events:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("the expected event never came: {e}"))
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff_ms(500, 30_000, 1), 500);
        assert_eq!(backoff_ms(500, 30_000, 2), 1_000);
        assert_eq!(backoff_ms(500, 30_000, 6), 16_000);
        assert_eq!(backoff_ms(500, 30_000, 7), 30_000);
        assert_eq!(backoff_ms(500, 30_000, u32::MAX), 30_000);
        assert_eq!(backoff_ms(u64::MAX, u64::MAX, 3), u64::MAX);
    }

    #[test]
    fn config_validation_refuses_zero_times_and_inverted_backoff() {
        assert!(AllocClientConfig::default().validate().is_ok());
        let c = AllocClientConfig {
            reply_timeout_ms: 0,
            ..AllocClientConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(AllocClientConfigError::Zero("reply_timeout_ms"))
        );
        let c = AllocClientConfig {
            backoff_max_ms: 100,
            ..AllocClientConfig::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "allocator: backoff_max_ms (100) must be at least backoff_initial_ms (500)"
        );
    }

    #[test]
    fn an_allocation_reply_fills_the_set_and_only_the_matching_reply_counts() {
        let gw = FakeGateway::new();
        let mut driver = AllocDriver::new(gw.addr(), Family::V4, config()).unwrap();
        let mut set = set();
        assert!(driver.poll(0, &mut set).is_empty());
        assert!(driver.request_in_flight());
        let (txid, req, from) = gw.recv();
        assert!(
            matches!(req, ClientMsg::AllocRequest(r) if r.count == 3 && r.family == Family::V4)
        );
        // Wrong txid, garbage, and a reply from another socket: all ignored.
        gw.answer(txid ^ 1, &req, from, Status::Ok, &[66]);
        gw.sock.send_to(b"MQ garbage", from).unwrap();
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(b"MQ\x01\x02", from).unwrap();
        gw.answer(txid, &req, from, Status::Ok, &[5, 6, 7]);
        let events = poll_until(&mut driver, 10, &mut set, |e| !e.is_empty());
        assert_eq!(events.len(), 1, "{events:?}");
        let AllocEvent::Allocated {
            addrs,
            gateway,
            late,
            requested_ms,
            round_trip,
        } = &events[0]
        else {
            panic!("{events:?}")
        };
        assert_eq!(addrs.len(), 3);
        assert!(!late);
        assert!(round_trip.is_some(), "an answer in time has its round trip");
        assert_eq!(*gateway, "10.0.0.1".parse::<IpAddr>().unwrap());
        // The reply arrived at 10 ms; the lifetimes (10 s) count from the request, at 0.
        assert_eq!(*requested_ms, 0);
        let held: Vec<IpAddr> = set.addresses().map(|(a, _)| a).collect();
        assert!(set.addresses().all(|(_, expires_ms)| expires_ms == 10_000));
        assert_eq!(held.len(), 3);
        assert!(!held.contains(&IpAddr::V4(Ipv4Addr::new(10, 0, 0, 66))));
        assert_eq!(set.usable_count(10), 3);
        let c = driver.counters();
        assert_eq!(
            (c.requests_total, c.allocations_total, c.addresses_total),
            (1, 1, 3)
        );
        assert!(!driver.request_in_flight());
        // Set full: nothing more is asked until the refill lead (expiry 10,000 − margin − lead).
        assert!(driver.poll(6_000, &mut set).is_empty());
        assert!(gw.nothing_sent());
        driver.poll(7_010, &mut set);
        assert!(
            matches!(gw.recv().1, ClientMsg::AllocRequest(_)),
            "refill before the set runs short"
        );
    }

    #[test]
    fn an_unreachable_allocator_is_an_error_a_counter_and_a_growing_backoff() {
        let gw = FakeGateway::new();
        let mut driver = AllocDriver::new(gw.addr(), Family::V4, config()).unwrap();
        let mut set = set();
        driver.poll(0, &mut set);
        gw.recv();
        assert_eq!(driver.next_timeout_ms(), Some(200));
        assert!(driver.poll(199, &mut set).is_empty());
        let events = driver.poll(200, &mut set);
        let [AllocEvent::Failed { error, retry_at_ms }] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert!(matches!(
            error,
            AllocError::Unreachable {
                timeout_ms: 200,
                ..
            }
        ));
        assert_eq!(
            error.to_string(),
            format!(
                "allocator unreachable: no reply from the gateway {} within 200 ms",
                gw.addr()
            )
        );
        // First backoff: 400 ms, jittered into [200, 400].
        assert!((400..=600).contains(retry_at_ms), "{retry_at_ms}");
        assert_eq!(driver.counters().unreachable_total, 1);
        assert_eq!(driver.next_timeout_ms(), Some(*retry_at_ms));
        let mut at = *retry_at_ms;
        assert!(driver.poll(at - 1, &mut set).is_empty());
        assert!(gw.nothing_sent(), "no request during the backoff");
        // Each further loss doubles the backoff, up to the 3,000 ms cap.
        let mut waits = Vec::new();
        for _ in 0..6 {
            driver.poll(at, &mut set);
            gw.recv();
            let events = driver.poll(at + 200, &mut set);
            let [AllocEvent::Failed { retry_at_ms, .. }] = events.as_slice() else {
                panic!("{events:?}")
            };
            waits.push(retry_at_ms - (at + 200));
            at = *retry_at_ms;
        }
        for (i, &w) in waits.iter().enumerate() {
            let full = backoff_ms(400, 3_000, i as u32 + 2);
            assert!((full / 2..=full).contains(&w), "wait {i}: {w} vs {full}");
        }
        assert_eq!(driver.counters().unreachable_total, 7);
        assert_eq!(driver.counters().requests_total, 7);
    }

    #[test]
    fn refusals_are_errors_with_counters_and_a_success_resets_the_backoff() {
        let gw = FakeGateway::new();
        let mut driver = AllocDriver::new(gw.addr(), Family::V4, config()).unwrap();
        let mut set = set();
        driver.poll(0, &mut set);
        let (txid, req, from) = gw.recv();
        gw.answer(txid, &req, from, Status::PoolExhausted, &[]);
        let events = poll_until(&mut driver, 1, &mut set, |e| !e.is_empty());
        let [AllocEvent::Failed {
            error: AllocError::OutOfAddresses,
            retry_at_ms,
        }] = events.as_slice()
        else {
            panic!("{events:?}")
        };
        assert_eq!(driver.counters().out_of_addresses_total, 1);
        assert_eq!(
            AllocError::OutOfAddresses.to_string(),
            "allocator out of addresses: the pool is exhausted"
        );
        let at = *retry_at_ms;
        driver.poll(at, &mut set);
        let (txid, req, from) = gw.recv();
        gw.answer(txid, &req, from, Status::RateLimited, &[]);
        let events = poll_until(&mut driver, at, &mut set, |e| !e.is_empty());
        let [AllocEvent::Failed {
            error: AllocError::Refused(Status::RateLimited),
            retry_at_ms,
        }] = events.as_slice()
        else {
            panic!("{events:?}")
        };
        assert!(
            retry_at_ms - at >= 400,
            "second failure: at least half of 800 ms"
        );
        assert_eq!(driver.counters().refused_total, 1);
        let at = *retry_at_ms;
        driver.poll(at, &mut set);
        let (txid, req, from) = gw.recv();
        gw.answer(txid, &req, from, Status::Ok, &[1, 2, 3]);
        poll_until(&mut driver, at, &mut set, |e| {
            matches!(e, [AllocEvent::Allocated { .. }])
        });
        assert_eq!(driver.next_timeout_ms(), None, "backoff reset");
    }

    #[test]
    fn a_late_reply_to_a_timed_out_request_is_still_used() {
        let gw = FakeGateway::new();
        let mut driver = AllocDriver::new(gw.addr(), Family::V4, config()).unwrap();
        let mut set = set();
        driver.poll(0, &mut set);
        let (txid, req, from) = gw.recv();
        driver.poll(200, &mut set); // timed out
        gw.answer(txid, &req, from, Status::Ok, &[9, 10]);
        let events = poll_until(&mut driver, 250, &mut set, |e| !e.is_empty());
        assert!(
            matches!(
                events.as_slice(),
                [AllocEvent::Allocated { late: true, .. }]
            ),
            "{events:?}"
        );
        assert_eq!(set.addresses().count(), 2);
        assert_eq!(driver.counters().late_replies_total, 1);
    }

    #[test]
    fn draining_addresses_are_released_once_and_the_rest_on_exit() {
        let gw = FakeGateway::new();
        let mut driver = AllocDriver::new(gw.addr(), Family::V4, config()).unwrap();
        let mut set = set();
        driver.poll(0, &mut set);
        let (txid, req, from) = gw.recv();
        gw.answer(txid, &req, from, Status::Ok, &[1, 2, 3]);
        poll_until(&mut driver, 0, &mut set, |e| !e.is_empty());
        // At expiry − margin (9,000) the unused addresses drain: released, once. (A refill
        // request goes out too; leave it unanswered.)
        driver.poll(9_000, &mut set);
        let mut released = Vec::new();
        let mut release_txid = 0;
        for _ in 0..2 {
            match gw.recv() {
                (t, ClientMsg::Release(r), _) => {
                    released = r.addrs;
                    release_txid = t;
                }
                (_, ClientMsg::AllocRequest(_), _) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(released.len(), 3, "nothing is current, so all three drain");
        let mut out = Vec::new();
        ClientMsg::ReleaseReply(ReleaseReply {
            status: Status::Ok,
            released: 3,
        })
        .emit(release_txid, &mut out)
        .unwrap();
        gw.sock.send_to(&out, from).unwrap();
        let events = poll_until(&mut driver, 9_001, &mut set, |e| {
            e.iter().any(|e| matches!(e, AllocEvent::Released { .. }))
        });
        assert!(events
            .iter()
            .any(|e| matches!(e, AllocEvent::Released { count: 3 })));
        assert_eq!(driver.counters().released_total, 3);
        assert!(gw.nothing_sent(), "released once");
        // Nothing left to give back at exit: no blocking exchange at all.
        assert_eq!(driver.release_all(9_002, &mut set).unwrap(), 0);
    }

    #[test]
    fn release_all_on_exit_blocks_for_the_acknowledgement() {
        let gw = FakeGateway::new();
        let mut driver = AllocDriver::new(gw.addr(), Family::V4, config()).unwrap();
        let mut set = set();
        driver.poll(0, &mut set);
        let (txid, req, from) = gw.recv();
        gw.answer(txid, &req, from, Status::Ok, &[1, 2, 3]);
        poll_until(&mut driver, 0, &mut set, |e| !e.is_empty());
        let answerer = std::thread::spawn(move || {
            let (txid, msg, from) = gw.recv();
            let ClientMsg::Release(r) = msg else {
                panic!("{msg:?}")
            };
            let mut out = Vec::new();
            ClientMsg::ReleaseReply(ReleaseReply {
                status: Status::Ok,
                released: r.addrs.len() as u8,
            })
            .emit(txid, &mut out)
            .unwrap();
            gw.sock.send_to(&out, from).unwrap();
            gw
        });
        assert_eq!(driver.release_all(100, &mut set).unwrap(), 3);
        // Kept open, so the unanswered release below times out rather than being refused.
        let _gw = answerer.join().unwrap();
        assert_eq!(driver.counters().released_total, 3);
        // The socket is non-blocking again for the event loop.
        assert!(driver
            .poll(101, &mut set)
            .iter()
            .all(|e| !matches!(e, AllocEvent::Failed { .. })));
        // Unanswered: the library's timeout, as an error value, counted.
        let mut set2 = self::set();
        set2.add_allocation(0, &[("10.0.0.9".parse().unwrap(), Duration::from_secs(9))]);
        let e = driver.release_all(0, &mut set2).unwrap_err();
        assert!(
            matches!(e, AllocError::Client(ClientError::Timeout(2))),
            "{e:?}"
        );
        assert_eq!(driver.counters().unreachable_total, 1);
        // Non-blocking again after the failure too.
        let mut buf = [0u8; 8];
        let e = driver.socket().recv_from(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
