//! The access switch's virtual gateway (seed 000 §3.3): it answers ARP requests for the gateway
//! IPv4 address and neighbour solicitations for the gateway IPv6 addresses (link-local and
//! global), so that a client whose address changes every few packets always reaches its first
//! hop without the switch ever resolving the client (passive learning: the allocator tells the
//! switch who is where).
//!
//! Sans-IO: [`Gateway::answer`] rewrites a request frame into its reply in place and returns the
//! reply's length; the caller sends it back out of the port it came in on. Anything else is left
//! untouched. Malformed input is an error value, never a panic.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::wire::arp::{ArpOperation, ArpPacket, ArpRepr};
use crate::wire::checksum::PseudoHeader;
use crate::wire::ethernet::{EtherType, EthernetAddress, EthernetFrame, EthernetRepr};
use crate::wire::icmpv6::{Icmpv6Packet, Icmpv6Repr, NdiscRepr, NeighborFlags};
use crate::wire::ipv6::{Ipv6Packet, Ipv6Repr};
use crate::wire::{Error, IpProtocol};

/// Bytes of an untagged Ethernet header.
const ETH_LEN: usize = 14;
/// Bytes of an IPv6 header.
const IPV6_LEN: usize = 40;

/// The gateway's addresses.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The MAC the gateway answers with.
    pub mac: EthernetAddress,
    /// The gateway IPv4 address.
    pub v4: Option<Ipv4Addr>,
    /// The gateway IPv6 addresses (link-local and global).
    pub v6: Vec<Ipv6Addr>,
}

/// What [`Gateway::answer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The frame now holds the reply, this many bytes long.
    Reply(usize),
    /// Not a request for the gateway: the frame is unchanged.
    NotForUs,
}

impl Gateway {
    /// Answers an ARP request or a neighbour solicitation for the gateway, in place. `frame` is
    /// the whole buffer the frame may grow into; `len` the received length.
    pub fn answer(&self, frame: &mut [u8], len: usize) -> Result<Answer, Error> {
        let received = frame.get(..len).ok_or(Error::Truncated)?;
        let eth = EthernetFrame::new_checked(received)?;
        let eth_repr = EthernetRepr::parse(&eth)?;
        if eth_repr.vlan_tci.is_some() {
            return Ok(Answer::NotForUs);
        }
        match eth_repr.ethertype {
            EtherType::Arp => self.answer_arp(frame, len, &eth_repr),
            EtherType::Ipv6 => self.answer_ns(frame, len, &eth_repr),
            _ => Ok(Answer::NotForUs),
        }
    }

    fn answer_arp(
        &self,
        frame: &mut [u8],
        len: usize,
        eth: &EthernetRepr,
    ) -> Result<Answer, Error> {
        let Some(gateway) = self.v4 else {
            return Ok(Answer::NotForUs);
        };
        let arp = ArpPacket::new_checked(&frame[ETH_LEN..len])?;
        let request = match ArpRepr::parse(&arp) {
            Ok(r) => r,
            // ARP for another hardware or protocol type is not for an IPv4 gateway.
            Err(Error::Unsupported) => return Ok(Answer::NotForUs),
            Err(e) => return Err(e),
        };
        if request.operation != ArpOperation::Request || request.target_protocol_addr != gateway {
            return Ok(Answer::NotForUs);
        }
        let reply = ArpRepr {
            operation: ArpOperation::Reply,
            source_hardware_addr: self.mac,
            source_protocol_addr: gateway,
            target_hardware_addr: request.source_hardware_addr,
            target_protocol_addr: request.source_protocol_addr,
        };
        let arp_len = len - ETH_LEN;
        reply.emit(&mut ArpPacket::new_unchecked(
            &mut frame[ETH_LEN..ETH_LEN + arp_len],
        ))?;
        let eth_reply = EthernetRepr {
            src_addr: self.mac,
            dst_addr: eth.src_addr,
            vlan_tci: None,
            ethertype: EtherType::Arp,
        };
        eth_reply.emit(&mut EthernetFrame::new_unchecked(&mut frame[..len]))?;
        Ok(Answer::Reply(len))
    }

    fn answer_ns(&self, frame: &mut [u8], len: usize, eth: &EthernetRepr) -> Result<Answer, Error> {
        let ip = Ipv6Packet::new_checked(&frame[ETH_LEN..len])?;
        let ip_repr = Ipv6Repr::parse(&ip)?;
        if ip_repr.next_header != IpProtocol::Icmpv6 {
            return Ok(Answer::NotForUs);
        }
        //= https://www.rfc-editor.org/rfc/rfc4861#section-7.1.1
        //# - The IP Hop Limit field has a value of 255, i.e., the packet
        //#   could not possibly have been forwarded by a router.
        if ip_repr.hop_limit != 255 {
            return Ok(Answer::NotForUs);
        }
        let pseudo = PseudoHeader::V6 {
            src: ip_repr.src_addr,
            dst: ip_repr.dst_addr,
        };
        let icmp_bytes = ip.payload();
        let icmp = Icmpv6Packet::new_checked(icmp_bytes)?;
        let Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr,
            lladdr,
        }) = Icmpv6Repr::parse(&icmp, &pseudo)?
        else {
            return Ok(Answer::NotForUs);
        };
        if !self.v6.contains(&target_addr) {
            return Ok(Answer::NotForUs);
        }
        //= https://www.rfc-editor.org/rfc/rfc4861#section-7.2.4
        //# If the source of the solicitation is the unspecified address, the
        //# node MUST set the Solicited flag to zero and multicast the
        //# advertisement to the all-nodes address.
        let unspecified = ip_repr.src_addr.is_unspecified();
        let (dst_ip, dst_mac) = if unspecified {
            let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
            (all_nodes, EthernetAddress::ipv6_multicast(&all_nodes))
        } else {
            (ip_repr.src_addr, lladdr.unwrap_or(eth.src_addr))
        };
        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: NeighborFlags {
                router: true,
                solicited: !unspecified,
                override_: true,
            },
            target_addr,
            lladdr: Some(self.mac),
        });
        let icmp_len = na.buffer_len();
        let total = ETH_LEN + IPV6_LEN + icmp_len;
        if frame.len() < total {
            return Err(Error::Truncated);
        }
        let reply_ip = Ipv6Repr {
            src_addr: target_addr,
            dst_addr: dst_ip,
            next_header: IpProtocol::Icmpv6,
            payload_len: icmp_len as u16,
            hop_limit: 255,
            traffic_class: 0,
            flow_label: 0,
        };
        reply_ip.emit(&mut Ipv6Packet::new_unchecked(
            &mut frame[ETH_LEN..ETH_LEN + IPV6_LEN],
        ))?;
        let reply_pseudo = PseudoHeader::V6 {
            src: target_addr,
            dst: dst_ip,
        };
        na.emit(
            &mut Icmpv6Packet::new_unchecked(&mut frame[ETH_LEN + IPV6_LEN..total]),
            &reply_pseudo,
        )?;
        let eth_reply = EthernetRepr {
            src_addr: self.mac,
            dst_addr: dst_mac,
            vlan_tci: None,
            ethertype: EtherType::Ipv6,
        };
        eth_reply.emit(&mut EthernetFrame::new_unchecked(&mut frame[..total]))?;
        Ok(Answer::Reply(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv6Type, PacketBuilder, SlicedPacket};

    const GW_MAC: EthernetAddress = EthernetAddress([0x02, 0x6d, 0x71, 0, 0, 1]);
    const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

    fn gateway() -> Gateway {
        Gateway {
            mac: GW_MAC,
            v4: Some(Ipv4Addr::new(198, 18, 0, 1)),
            v6: vec!["fe80::1".parse().unwrap(), "fd00:1::1".parse().unwrap()],
        }
    }

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]); // broadcast
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&[0x08, 0x06]); // ARP
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
        f.extend_from_slice(&CLIENT_MAC); // sender hardware address
        f.extend_from_slice(&[198, 18, 0, 77]); // sender protocol address
        f.extend_from_slice(&[0; 6]); // target hardware address (unknown)
        f.extend_from_slice(&target); // target protocol address
        f.resize(60, 0); // Ethernet minimum frame, padded
        f
    }

    fn neighbour_solicitation(src: Ipv6Addr, target: Ipv6Addr, with_option: bool) -> Vec<u8> {
        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        if with_option {
            icmp.extend_from_slice(&[1, 1]);
            icmp.extend_from_slice(&CLIENT_MAC);
        }
        let solicited = {
            let t = target.octets();
            Ipv6Addr::new(
                0xff02,
                0,
                0,
                0,
                0,
                1,
                0xff00 | u16::from(t[13]),
                u16::from_be_bytes([t[14], t[15]]),
            )
        };
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, [0x33, 0x33, 0xff, 0, 0, 1])
            .ipv6(src.octets(), solicited.octets(), 255)
            .icmpv6(Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            });
        let mut out = Vec::new();
        builder.write(&mut out, &icmp[8..]).unwrap();
        out
    }

    #[test]
    fn an_arp_request_for_the_gateway_becomes_the_reply_in_place() {
        let mut f = arp_request([198, 18, 0, 1]);
        let len = f.len();
        assert_eq!(gateway().answer(&mut f, len), Ok(Answer::Reply(60)));
        assert_eq!(&f[0..6], &CLIENT_MAC, "to the requester");
        assert_eq!(&f[6..12], &GW_MAC.0, "from the gateway MAC");
        assert_eq!(&f[20..22], &[0, 2], "ARP reply");
        assert_eq!(&f[22..28], &GW_MAC.0);
        assert_eq!(&f[28..32], &[198, 18, 0, 1]);
        assert_eq!(&f[32..38], &CLIENT_MAC);
        assert_eq!(&f[38..42], &[198, 18, 0, 77]);
    }

    #[test]
    fn requests_for_other_addresses_and_other_traffic_are_left_alone() {
        let mut f = arp_request([198, 18, 0, 2]);
        let before = f.clone();
        assert_eq!(gateway().answer(&mut f, 60), Ok(Answer::NotForUs));
        assert_eq!(f, before);
        let mut ns = neighbour_solicitation(
            "fe80::42".parse().unwrap(),
            "fd00:1::99".parse().unwrap(),
            true,
        );
        let len = ns.len();
        assert_eq!(gateway().answer(&mut ns, len), Ok(Answer::NotForUs));
    }

    #[test]
    fn a_solicitation_for_a_gateway_address_becomes_a_valid_advertisement() {
        for with_option in [true, false] {
            let mut f = neighbour_solicitation(
                "fe80::42".parse().unwrap(),
                "fd00:1::1".parse().unwrap(),
                with_option,
            );
            let len = f.len();
            f.resize(128, 0); // room to grow, as in a UMEM frame
            let Ok(Answer::Reply(n)) = gateway().answer(&mut f, len) else {
                panic!("no reply")
            };
            assert_eq!(n, 14 + 40 + 32);
            // An independent parser agrees, checksum included.
            let p = SlicedPacket::from_ethernet(&f[..n]).unwrap();
            let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else {
                panic!("not IPv6")
            };
            assert_eq!(
                ip.header().source_addr(),
                "fd00:1::1".parse::<Ipv6Addr>().unwrap()
            );
            assert_eq!(
                ip.header().destination_addr(),
                "fe80::42".parse::<Ipv6Addr>().unwrap()
            );
            assert_eq!(ip.header().hop_limit(), 255);
            assert_eq!(&f[0..6], &CLIENT_MAC);
            let icmp = &f[54..n];
            assert_eq!(icmp[0], 136, "neighbour advertisement");
            assert_eq!(icmp[4], 0x80 | 0x40 | 0x20, "router, solicited, override");
            assert_eq!(&icmp[24..26], &[2, 1], "target link-layer address option");
            assert_eq!(&icmp[26..32], &GW_MAC.0);
            let pseudo = PseudoHeader::V6 {
                src: "fd00:1::1".parse().unwrap(),
                dst: "fe80::42".parse().unwrap(),
            };
            assert!(Icmpv6Packet::new_checked(icmp)
                .unwrap()
                .verify_checksum(&pseudo));
        }
    }

    #[test]
    fn a_duplicate_address_probe_is_answered_to_all_nodes_without_the_solicited_flag() {
        let mut f =
            neighbour_solicitation(Ipv6Addr::UNSPECIFIED, "fe80::1".parse().unwrap(), false);
        let len = f.len();
        f.resize(128, 0);
        let Ok(Answer::Reply(n)) = gateway().answer(&mut f, len) else {
            panic!("no reply")
        };
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(f[54 + 4] & 0x40, 0, "not solicited");
        assert_eq!(n, 86);
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200), extra in 0usize..64) {
            let mut buf = bytes.clone();
            let len = buf.len();
            buf.resize(len + extra, 0);
            let _ = gateway().answer(&mut buf, len);
            // And the same bytes as an ARP or IPv6 frame.
            for ethertype in [[0x08, 0x06], [0x86, 0xdd]] {
                let mut f = arp_request([198, 18, 0, 1]);
                f.truncate(12);
                f.extend_from_slice(&ethertype);
                f.extend_from_slice(&bytes);
                let len = f.len();
                f.resize(len + extra, 0);
                let _ = gateway().answer(&mut f, len);
            }
        }
    }
}
