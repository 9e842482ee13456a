//! The agent's side of the allocation protocol (the agent crate uses it).
//!
//! [`PendingRequest`] and [`PendingRelease`] are sans-IO: they build the request bytes and
//! recognise the matching reply (same txid and, for allocations, same nonce), so an agent with
//! its own event loop can use them. [`AllocClient`] wraps them with a blocking UDP socket,
//! a timeout and retries (each retry is a fresh transaction: the relay hop drops replays, so a
//! lost reply is never answered twice; the addresses of a lost reply expire unused).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use crate::proto::{AllocRequest, ClientMsg, Release, Status, NONCE_LEN};
use crate::rng::{Csprng, RngError};
use crate::Family;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("allocator client socket: {0}")]
    Io(#[from] std::io::Error),
    /// No matching reply after all retries.
    #[error("no reply from the gateway after {0} attempts")]
    Timeout(u32),
    /// The allocator refused.
    #[error("the allocator refused: {}", .0.label())]
    Refused(Status),
    /// Arguments out of range (count 0 or > 255, addresses of the wrong family).
    #[error("bad argument: {0}")]
    BadArgument(&'static str),
    /// The OS CSPRNG failed.
    #[error(transparent)]
    Rng(#[from] RngError),
}

/// Addresses granted by one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Gateway to use.
    pub gateway: IpAddr,
    /// Prefix length to configure with each address.
    pub prefix_len: u8,
    /// Addresses and how long each may be used from now.
    pub addrs: Vec<(IpAddr, Duration)>,
}

/// An allocation request in flight.
#[derive(Debug, Clone, Copy)]
pub struct PendingRequest {
    txid: u32,
    nonce: [u8; NONCE_LEN],
}

impl PendingRequest {
    /// A new request for `count` addresses; returns it and the datagram to send.
    pub fn new(
        rng: &mut Csprng,
        family: Family,
        count: u8,
    ) -> Result<(Self, Vec<u8>), ClientError> {
        if count == 0 {
            return Err(ClientError::BadArgument("count must be 1..=255"));
        }
        let txid = rng.next_u64() as u32;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce);
        let mut out = Vec::new();
        ClientMsg::AllocRequest(AllocRequest {
            family,
            count,
            nonce,
        })
        .emit(txid, &mut out)
        .map_err(|_| ClientError::BadArgument("request"))?;
        Ok((PendingRequest { txid, nonce }, out))
    }

    /// The transaction ID.
    pub fn txid(&self) -> u32 {
        self.txid
    }

    /// `None` if `datagram` is not the reply to this request (ignore it); otherwise the outcome.
    pub fn accept(&self, datagram: &[u8]) -> Option<Result<Allocation, ClientError>> {
        match ClientMsg::parse(datagram) {
            Ok((txid, ClientMsg::AllocReply(r))) if txid == self.txid && r.nonce == self.nonce => {
                Some(match r.status {
                    Status::Ok => Ok(Allocation {
                        gateway: r.gateway,
                        prefix_len: r.prefix_len,
                        addrs: r
                            .addrs
                            .iter()
                            .map(|&(a, ms)| (a, Duration::from_millis(u64::from(ms))))
                            .collect(),
                    }),
                    s => Err(ClientError::Refused(s)),
                })
            }
            Ok((txid, ClientMsg::ReleaseReply(r)))
                if txid == self.txid && r.status != Status::Ok =>
            {
                Some(Err(ClientError::Refused(r.status)))
            }
            _ => None,
        }
    }
}

/// A release in flight.
#[derive(Debug, Clone, Copy)]
pub struct PendingRelease {
    txid: u32,
}

impl PendingRelease {
    /// A release of `addrs` (all of `family`, at most 255); returns it and the datagram.
    pub fn new(
        rng: &mut Csprng,
        family: Family,
        addrs: &[IpAddr],
    ) -> Result<(Self, Vec<u8>), ClientError> {
        let txid = rng.next_u64() as u32;
        let mut out = Vec::new();
        ClientMsg::Release(Release {
            family,
            addrs: addrs.to_vec(),
        })
        .emit(txid, &mut out)
        .map_err(|_| ClientError::BadArgument("at most 255 addresses, all of the given family"))?;
        Ok((PendingRelease { txid }, out))
    }

    /// `None` if not the reply; otherwise how many addresses were released.
    pub fn accept(&self, datagram: &[u8]) -> Option<Result<u8, ClientError>> {
        match ClientMsg::parse(datagram) {
            Ok((txid, ClientMsg::ReleaseReply(r))) if txid == self.txid => {
                Some(if r.status == Status::Ok {
                    Ok(r.released)
                } else {
                    Err(ClientError::Refused(r.status))
                })
            }
            _ => None,
        }
    }
}

/// A blocking client talking to the access switch's gateway (UDP port 6363).
#[derive(Debug)]
pub struct AllocClient {
    sock: UdpSocket,
    gateway: SocketAddr,
    rng: Csprng,
    timeout: Duration,
    attempts: u32,
}

impl AllocClient {
    /// A client on an ephemeral port of the gateway's family.
    pub fn new(gateway: SocketAddr) -> Result<Self, ClientError> {
        let local: SocketAddr = if gateway.is_ipv4() {
            "0.0.0.0:0".parse()
        } else {
            "[::]:0".parse()
        }
        .map_err(|_| ClientError::BadArgument("gateway"))?;
        Self::with_socket(UdpSocket::bind(local)?, gateway)
    }

    /// A client on a socket the caller bound (e.g. to one of its addresses).
    pub fn with_socket(sock: UdpSocket, gateway: SocketAddr) -> Result<Self, ClientError> {
        Ok(AllocClient {
            sock,
            gateway,
            rng: Csprng::new()?,
            timeout: Duration::from_millis(500),
            attempts: 4,
        })
    }

    /// Per-attempt timeout (default 500 ms) and number of attempts (default 4).
    pub fn set_retry(&mut self, timeout: Duration, attempts: u32) {
        self.timeout = timeout;
        self.attempts = attempts.max(1);
    }

    /// The local socket address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Asks for `count` addresses of `family`.
    pub fn allocate(&mut self, family: Family, count: u8) -> Result<Allocation, ClientError> {
        for _ in 0..self.attempts {
            let (p, bytes) = PendingRequest::new(&mut self.rng, family, count)?;
            self.sock.send_to(&bytes, self.gateway)?;
            if let Some(r) = self.wait(|d| p.accept(d))? {
                return r;
            }
        }
        Err(ClientError::Timeout(self.attempts))
    }

    /// Gives addresses back; returns how many the allocator released.
    pub fn release(&mut self, family: Family, addrs: &[IpAddr]) -> Result<u8, ClientError> {
        for _ in 0..self.attempts {
            let (p, bytes) = PendingRelease::new(&mut self.rng, family, addrs)?;
            self.sock.send_to(&bytes, self.gateway)?;
            if let Some(r) = self.wait(|d| p.accept(d))? {
                return r;
            }
        }
        Err(ClientError::Timeout(self.attempts))
    }

    fn wait<T>(
        &self,
        mut accept: impl FnMut(&[u8]) -> Option<T>,
    ) -> Result<Option<T>, ClientError> {
        let deadline = std::time::Instant::now() + self.timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) if from == self.gateway => {
                    if let Some(r) = accept(&buf[..n]) {
                        return Ok(Some(r));
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AllocReply;

    #[test]
    fn pending_request_accepts_only_its_own_reply() {
        let mut rng = Csprng::new().unwrap();
        let (p, bytes) = PendingRequest::new(&mut rng, Family::V4, 2).unwrap();
        let (txid, ClientMsg::AllocRequest(req)) = ClientMsg::parse(&bytes).unwrap() else {
            panic!("not a request")
        };
        let reply = |txid: u32, nonce, status| {
            let mut out = Vec::new();
            ClientMsg::AllocReply(AllocReply {
                status,
                family: Family::V4,
                prefix_len: 32,
                nonce,
                gateway: "10.0.0.1".parse().unwrap(),
                addrs: if status == Status::Ok {
                    vec![("10.0.0.9".parse().unwrap(), 1500)]
                } else {
                    vec![]
                },
            })
            .emit(txid, &mut out)
            .unwrap();
            out
        };
        assert!(
            p.accept(&reply(txid ^ 1, req.nonce, Status::Ok)).is_none(),
            "other txid"
        );
        assert!(
            p.accept(&reply(txid, [0; 16], Status::Ok)).is_none(),
            "other nonce"
        );
        assert!(p.accept(b"garbage").is_none());
        let got = p
            .accept(&reply(txid, req.nonce, Status::Ok))
            .unwrap()
            .unwrap();
        assert_eq!(
            got.addrs,
            vec![("10.0.0.9".parse().unwrap(), Duration::from_millis(1500))]
        );
        assert!(matches!(
            p.accept(&reply(txid, req.nonce, Status::PoolExhausted)),
            Some(Err(ClientError::Refused(Status::PoolExhausted)))
        ));
        assert!(PendingRequest::new(&mut rng, Family::V4, 0).is_err());
    }
}
