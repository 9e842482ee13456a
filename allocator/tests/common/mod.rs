//! Helpers shared by the loopback tests: a fake access switch (relay signer), a rule-stream
//! subscriber and an HTTP getter. Everything binds 127.0.0.1 only.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use mimiq_allocator::lease::{RuleUpdate, Sequenced};
use mimiq_allocator::proto::{
    self, AllocRequest, ClientMsg, Relay, RelayInfo, RelayReply, StreamMsg,
};
use mimiq_allocator::server::wall_ms;
use mimiq_allocator::{Family, Mac};

pub const ACCESS_KEY: &str = "11111111111111111111111111111111111111111111111111111111111111aa";
pub const EDGE_KEY: &str = "22222222222222222222222222222222222222222222222222222222222222bb";

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub fn mac(n: u32) -> Mac {
    let b = n.to_be_bytes();
    Mac([2, 0, b[0], b[1], b[2], b[3]])
}

/// A fake access switch with SID 1, relaying what arrives on its port `port` (1 unless set).
pub struct Switch {
    pub sock: UdpSocket,
    pub allocator: SocketAddr,
    pub key: ring::hmac::Key,
    pub sid: u16,
    pub port: u16,
}

impl Switch {
    pub fn new(allocator: SocketAddr) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(2000)))
            .unwrap();
        Switch {
            sock,
            allocator,
            key: proto::key(&unhex(ACCESS_KEY)),
            sid: 1,
            port: 1,
        }
    }

    pub fn alloc_bytes(&self, txid: u32, mac: Mac, family: Family, count: u8) -> Vec<u8> {
        let mut inner = Vec::new();
        ClientMsg::AllocRequest(AllocRequest {
            family,
            count,
            nonce: [7; 16],
        })
        .emit(txid, &mut inner)
        .unwrap();
        self.wrap(txid, mac, &inner, wall_ms())
    }

    pub fn wrap(&self, txid: u32, mac: Mac, inner: &[u8], ts: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Relay {
            txid,
            info: RelayInfo {
                sid: self.sid,
                ingress_port: self.port,
                mac,
                client_port: 5555,
            },
            timestamp_ms: ts,
            inner,
        }
        .emit(&self.key, &mut out)
        .unwrap();
        out
    }

    pub fn send(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.allocator).unwrap();
    }

    /// The next reply's inner client message, or None on timeout.
    pub fn recv(&self, timeout: Duration) -> Option<(u32, ClientMsg)> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        let r = RelayReply::parse(&buf[..n], &self.key).expect("allocator reply must verify");
        Some(ClientMsg::parse(r.inner).expect("inner reply must parse"))
    }

    pub fn request(&self, txid: u32, mac: Mac, family: Family, count: u8) -> proto::AllocReply {
        self.send(&self.alloc_bytes(txid, mac, family, count));
        match self.recv(Duration::from_secs(5)) {
            Some((t, ClientMsg::AllocReply(r))) if t == txid => r,
            other => panic!("expected AllocReply for {txid}, got {other:?}"),
        }
    }
}

/// A rule-stream subscriber that keeps the switch's view of the rules.
pub struct Subscriber {
    pub stream: TcpStream,
    pub key: ring::hmac::Key,
    pub bindings: BTreeMap<IpAddr, (Mac, u16, u64)>,
    pub epochs: BTreeMap<u64, Vec<(u16, Vec<u32>)>>,
    pub last_seq: u64,
    pub snapshots: u32,
}

impl Subscriber {
    pub fn connect(at: SocketAddr, switch_id: u16, secret: &str) -> Self {
        Self::try_connect(at, switch_id, secret).unwrap()
    }

    /// [`Subscriber::connect`], with the error of a connection the allocator refused or closed.
    pub fn try_connect(at: SocketAddr, switch_id: u16, secret: &str) -> std::io::Result<Self> {
        let mut stream = TcpStream::connect(at)?;
        let key = proto::key(&unhex(secret));
        let mut out = Vec::new();
        StreamMsg::Hello {
            switch_id,
            timestamp_ms: wall_ms(),
        }
        .emit_frame(&key, &mut out)
        .unwrap();
        stream.write_all(&out)?;
        Ok(Subscriber {
            stream,
            key,
            bindings: BTreeMap::new(),
            epochs: BTreeMap::new(),
            last_seq: 0,
            snapshots: 0,
        })
    }

    /// Reads one update; None on timeout or end of stream.
    pub fn next(&mut self, timeout: Duration) -> Option<Sequenced> {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = Vec::new();
        if !proto::read_frame(&mut self.stream, &mut buf).ok()? {
            return None;
        }
        match StreamMsg::parse(&buf, |_| Some(&self.key)).expect("stream message must verify") {
            StreamMsg::Update(u) => Some(u),
            StreamMsg::Hello { .. } => panic!("hello from the allocator"),
        }
    }

    /// Reads and applies the snapshot (must come first).
    pub fn read_snapshot(&mut self) {
        self.try_read_snapshot().unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Subscriber::read_snapshot`]; `Err` if the stream ends (the allocator refused the
    /// connection) or stays silent for 5 s before the snapshot begins.
    pub fn try_read_snapshot(&mut self) -> Result<(), String> {
        let first = self
            .next(Duration::from_secs(5))
            .ok_or("no snapshot: the stream ended or stayed silent for 5 s")?;
        let RuleUpdate::Snapshot { seq, count } = first.update else {
            panic!("first message is not a snapshot: {first:?}")
        };
        self.bindings.clear();
        self.epochs.clear();
        for _ in 0..count {
            let u = self.next(Duration::from_secs(5)).expect("snapshot entry");
            assert_eq!(u.seq, seq, "snapshot entries carry the snapshot's seq");
            self.apply(u.update);
        }
        self.last_seq = seq;
        self.snapshots += 1;
        Ok(())
    }

    /// Applies updates until none arrives for `quiet`. Panics on a gap.
    pub fn drain(&mut self, quiet: Duration) {
        while let Some(u) = self.next(quiet) {
            assert_eq!(u.seq, self.last_seq + 1, "gap in the rule stream");
            self.last_seq = u.seq;
            self.apply(u.update);
        }
    }

    /// Applies updates until it has applied the one numbered `seq` (see [`rule_seq`]); panics,
    /// saying how far it got, if that takes longer than `within`.
    pub fn catch_up(&mut self, seq: u64, within: Duration) {
        mimiq_testkit::eventually(within, || {
            self.drain(Duration::from_millis(20));
            if self.last_seq >= seq {
                Ok(())
            } else {
                Err(format!("applied up to seq {} of {seq}", self.last_seq))
            }
        })
        .unwrap_or_else(|e| panic!("rule stream: {e}"));
    }

    fn apply(&mut self, u: RuleUpdate) {
        match u {
            RuleUpdate::BindingAdd {
                ip,
                mac,
                sid,
                valid_until_ms,
                ..
            } => {
                self.bindings.insert(ip, (mac, sid, valid_until_ms));
            }
            RuleUpdate::BindingRemove { ip } => {
                self.bindings.remove(&ip);
            }
            RuleUpdate::AliasEpoch { epoch, aliases, .. } => {
                self.epochs.insert(epoch, aliases);
            }
            RuleUpdate::Snapshot { .. } => panic!("nested snapshot"),
        }
    }

    pub fn binding_set(&self) -> BTreeSet<(IpAddr, Mac)> {
        self.bindings
            .iter()
            .map(|(ip, (m, _, _))| (*ip, *m))
            .collect()
    }
}

pub fn http_get(at: SocketAddr, path: &str) -> String {
    mimiq_metrics::get(at, path).unwrap_or_else(|e| panic!("{e}"))
}

/// `/leases` as a set of (ip, mac).
pub fn leases(at: SocketAddr) -> BTreeSet<(IpAddr, Mac)> {
    http_get(at, "/leases")
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            let ip: IpAddr = it
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{l:?}"));
            let m: Vec<u8> = it
                .next()
                .unwrap()
                .split(':')
                .map(|x| u8::from_str_radix(x, 16).unwrap())
                .collect();
            (ip, Mac(m.try_into().unwrap()))
        })
        .collect()
}

/// The sequence number of the latest rule update the allocator published: the server sets it
/// before it answers the requests that caused the update, so after a reply a subscriber that
/// [catches up](Subscriber::catch_up) to it has heard everything that reply did.
pub fn rule_seq(at: SocketAddr) -> u64 {
    metric(&http_get(at, "/metrics"), "mimiq_allocator_rule_seq")
}

/// A metric's value from Prometheus text, e.g. `metric(&text, "mimiq_allocator_drops_total{reason=\"replay\"}")`.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("metric {name} missing"))
}
