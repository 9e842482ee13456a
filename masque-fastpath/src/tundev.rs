//! A layer-3 TUN device (no packet-information header), non-blocking, for the proxy's CONNECT-IP
//! egress and the client's tunnel. Opening and configuring it is the `tun` crate's job; addresses
//! and routes go through [`crate::netcfg`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// An open TUN device.
pub struct TunDevice {
    dev: tun::Device,
    name: String,
}

impl TunDevice {
    /// Creates (or attaches to) the TUN device `name`, sets its MTU and brings it up.
    pub fn create(name: &str, mtu: usize) -> io::Result<TunDevice> {
        let mtu16 = u16::try_from(mtu)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("TUN MTU {mtu} > 65535")))?;
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(name).mtu(mtu16).up();
        let dev = tun::create(&cfg)
            .map_err(|e| io::Error::other(format!("create TUN device {name}: {e}")))?;
        dev.set_nonblock()?;
        Ok(TunDevice {
            dev,
            name: name.to_owned(),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet; `WouldBlock` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf)
    }

    /// Writes one packet.
    pub fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        self.dev.send(pkt)
    }
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}
