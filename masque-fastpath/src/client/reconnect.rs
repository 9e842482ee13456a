//! A tunnel that outlives its connection: when the connection to the proxy is lost (the proxy
//! restarted, the path died: keep-alives go unanswered until the idle timeout), the client
//! connects again, with backoff, keeps the TUN device (or the local UDP socket) the applications
//! use, and asks the new connection's proxy for the addresses the tunnel had with an
//! ADDRESS_REQUEST (RFC 9484 §4.7.2), so the applications' flows go on. It gives up, with one
//! error, only after [`Reconnect::attempts`] failed attempts in a row.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{
    AddressEntry, CapsuleRepr, Client, ClientError, ClientStats, IpPrefix, Mode, TunDevice,
};
use crate::netcfg::NetConfig;

/// How a lost tunnel comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// Failed attempts in a row after which the client gives up (0: a lost tunnel ends the
    /// client at once).
    pub attempts: u32,
    /// The wait before the first attempt; each failed attempt doubles it.
    pub backoff_initial: Duration,
    /// The longest wait between two attempts.
    pub backoff_max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            attempts: 10,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl Reconnect {
    /// The wait before attempt `n` (1-based): `backoff_initial · 2^(n-1)`, at most
    /// `backoff_max`.
    pub fn backoff(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.backoff_initial
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }
}

/// What the applications use, taken from a client whose tunnel was lost and handed to the next
/// one ([`Client::take_local`], [`Client::resume`]): the TUN device with the addresses and
/// routes on it, or the local UDP socket with the last application that sent to it.
pub struct Local {
    tun: Option<TunDevice>,
    local_udp: Option<(UdpSocket, Option<SocketAddr>)>,
    /// The addresses on the TUN device.
    assigned: Vec<IpPrefix>,
    mtu: usize,
}

impl Local {
    /// The addresses the tunnel had (CONNECT-IP), which the next connection asks for.
    pub fn addresses(&self) -> &[IpPrefix] {
        &self.assigned
    }
}

impl Client {
    /// After [`Client::run`] ended (with [`ClientError::Lost`], say): the TUN device or local
    /// socket, for [`Client::resume`]. `None` when the tunnel never came up.
    pub fn take_local(&mut self) -> Option<Local> {
        if let Some(local) = self.resume.take() {
            // This connection never got as far as adopting it.
            return Some(local);
        }
        let (tun, local_udp) = (self.tun.take(), self.local_udp.take());
        (tun.is_some() || local_udp.is_some()).then(|| Local {
            tun,
            local_udp,
            assigned: std::mem::take(&mut self.assigned),
            mtu: self.stats.mtu,
        })
    }

    /// Carries on the tunnel `local` is left from: once the request is answered, the client
    /// asks for `local`'s addresses (ADDRESS_REQUEST), waits for the answer, and then uses
    /// `local`'s device or socket instead of making its own.
    pub fn resume(mut self, local: Local) -> Self {
        self.resume = Some(local);
        self
    }

    /// Whether the tunnel waits for the answer to its ADDRESS_REQUEST.
    pub(super) fn awaiting_addresses(&self) -> bool {
        let asks = self
            .resume
            .as_ref()
            .is_some_and(|l| l.tun.is_some() && !l.assigned.is_empty());
        asks && !self
            .address_request
            .as_ref()
            .is_some_and(|(_, answered)| *answered)
    }

    /// Takes over a lost connection's TUN device: the addresses the proxy now assigned replace
    /// those it had (the same ones when the ADDRESS_REQUEST was granted); the routes stay.
    pub(super) fn adopt_local(&mut self, local: Local) -> Result<(), ClientError> {
        let Local {
            tun,
            local_udp,
            assigned: had,
            mtu,
        } = local;
        self.stats.mtu = mtu;
        match (&self.mode, tun, local_udp) {
            (Mode::Ip { tun: name, .. }, Some(dev), _) => {
                let setup = |e: crate::netcfg::NetConfigError| ClientError::Setup(e.to_string());
                let nc = NetConfig::new().map_err(setup)?;
                let link = nc.link(name).map_err(setup)?;
                for p in self.assigned.iter().filter(|p| !had.contains(p)) {
                    nc.add_address(&link, p.addr(), p.prefix_len(), None)
                        .map_err(setup)?;
                }
                for p in had.iter().filter(|p| !self.assigned.contains(p)) {
                    nc.delete_address(&link, p.addr(), p.prefix_len())
                        .map_err(setup)?;
                }
                if self.assigned.iter().any(|p| !had.contains(p)) {
                    self.stats.addresses_changed += 1;
                    tracing::warn!(
                        had = ?had,
                        now = ?self.assigned,
                        "the proxy gave the tunnel other addresses: flows on the old ones are lost"
                    );
                }
                self.stats.addresses = self
                    .assigned
                    .iter()
                    .map(|p| format!("{}/{}", p.addr(), p.prefix_len()))
                    .collect();
                self.tun = Some(dev);
            }
            (Mode::Udp { .. }, _, Some(socket)) => {
                self.stats.addresses = socket
                    .0
                    .local_addr()
                    .map(|a| vec![a.to_string()])
                    .unwrap_or_default();
                self.local_udp = Some(socket);
            }
            _ => {
                return Err(ClientError::Setup(
                    "resumed with the device of another mode".into(),
                ))
            }
        }
        Ok(())
    }
}

/// The ADDRESS_REQUEST for the addresses `resume` holds (Request IDs 1, 2, …: RFC 9484 §4.7.2
/// wants them non-zero and never reused, and this is the connection's first request), as
/// capsule bytes; records what was asked in `request`. Empty when there is nothing to ask for.
pub(super) fn previous_addresses_request(
    resume: &Option<Local>,
    request: &mut Option<(Vec<u64>, bool)>,
) -> Vec<u8> {
    let entries: Vec<AddressEntry> = resume
        .iter()
        .filter(|l| l.tun.is_some())
        .flat_map(|l| l.assigned.iter())
        .zip(1u64..)
        .map(|(&prefix, request_id)| AddressEntry { request_id, prefix })
        .collect();
    let mut out = vec![0u8; 16 + 40 * entries.len()];
    let n = if entries.is_empty() {
        0
    } else {
        CapsuleRepr::AddressRequest(&entries)
            .emit(&mut out)
            .unwrap_or(0)
    };
    out.truncate(n);
    // Nothing asked (or nothing encodable): nothing to wait for.
    *request = Some((entries.iter().map(|e| e.request_id).collect(), n == 0));
    out
}

/// Runs a tunnel over as many connections as it takes: `connect` makes each one's client (a
/// fresh connection, from a fresh local address if it likes), [`Client::run`] runs it, and when
/// a tunnel that was up is lost, the next client resumes it ([`Client::resume`]) after the
/// backoff. `on_ready` is called each time the tunnel carries traffic. A first connection that
/// never comes up is an error at once (a wrong address or certificate is not worth retrying);
/// so is a setup error. Returns the last client's counters when `stop` is set.
pub fn run_reconnecting(
    reconnect: Reconnect,
    stop: &AtomicBool,
    mut connect: impl FnMut() -> Result<Client, ClientError>,
    mut on_ready: impl FnMut(&ClientStats),
) -> Result<ClientStats, ClientError> {
    let mut local: Option<Local> = None;
    let mut stats = ClientStats::default();
    // Since the tunnel was lost: when, why, and the failed attempts since.
    let mut lost: Option<(Instant, String, u32)> = None;
    loop {
        let was_lost = lost.is_some();
        let error = match connect() {
            Ok(mut client) => {
                if let Some(l) = local.take() {
                    client = client.resume(l);
                }
                client.stats.reconnects = stats.reconnects;
                client.stats.addresses_changed = stats.addresses_changed;
                let result = client.run(stop, |ready| {
                    if let Some((since, _, _)) = lost.take() {
                        tracing::info!(
                            after_ms = since.elapsed().as_millis() as u64,
                            addresses = ?ready.addresses,
                            "tunnel back on a new connection"
                        );
                    }
                    on_ready(ready)
                });
                stats = client.stats().clone();
                if was_lost && lost.is_none() {
                    stats.reconnects += 1;
                }
                local = local.or_else(|| client.take_local());
                match result {
                    Ok(_) => return Ok(stats),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        // What is worth another connection: a tunnel that was up and was lost, and while it is
        // being brought back, anything but a setup error (a wrong setting stays wrong).
        let retry = match &error {
            ClientError::Setup(_) => false,
            ClientError::Lost(_) => true,
            _ => lost.is_some(),
        };
        if !retry {
            return Err(error);
        }
        let (since, reason, failures) = match lost.take() {
            Some((since, reason, failures)) => (since, reason, failures + 1),
            None => {
                let reason = match &error {
                    ClientError::Lost(why) => why.clone(),
                    e => e.to_string(),
                };
                (Instant::now(), reason, 0)
            }
        };
        let attempt = failures + 1;
        if attempt > reconnect.attempts || local.is_none() {
            return Err(ClientError::Lost(if failures == 0 {
                reason
            } else {
                format!(
                    "{reason}; gave up after {failures} attempts over {:.1} s (last: {error})",
                    since.elapsed().as_secs_f64()
                )
            }));
        }
        let wait = reconnect.backoff(attempt);
        tracing::warn!(
            attempt,
            of = reconnect.attempts,
            wait_ms = wait.as_millis() as u64,
            "{error}: reconnecting"
        );
        lost = Some((since, reason, failures));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(stats);
            }
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let r = Reconnect {
            attempts: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
        };
        let waits: Vec<u128> = (1..=5).map(|n| r.backoff(n).as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1000, 1000]);
        assert_eq!(r.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn nothing_to_ask_for_is_no_capsule_and_nothing_to_wait_for() {
        let mut request = None;
        assert!(previous_addresses_request(&None, &mut request).is_empty());
        assert_eq!(request, Some((vec![], true)));
    }
}
