//! A client recognises a stateless reset (RFC 9000 §10.3) for any connection ID the server
//! issued it, not only the handshake's (vendor/quiche/MIMIQ-PATCH.md, the seventh fix): after a
//! hop the client sends with another ID, and a restarted proxy resets with that ID's token.

use std::net::SocketAddr;

use mimiq_h3test::TestCert;

const ALPN: &[u8] = b"mimiq-test";

fn config() -> quiche::Config {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    c.set_application_protos(&[ALPN]).unwrap();
    c.set_max_idle_timeout(30_000);
    c.set_initial_max_data(1_000_000);
    c.set_initial_max_stream_data_bidi_local(100_000);
    c.set_initial_max_stream_data_bidi_remote(100_000);
    c.set_initial_max_streams_bidi(4);
    c.set_active_connection_id_limit(4);
    c
}

/// Everything each side has to send, delivered to the other, until both are quiet.
fn pump(client: &mut quiche::Connection, server: &mut quiche::Connection) {
    let (c_addr, s_addr): (SocketAddr, SocketAddr) = (
        "198.18.0.10:40000".parse().unwrap(),
        "198.18.1.1:4433".parse().unwrap(),
    );
    let mut buf = [0u8; 1500];
    loop {
        let mut moved = false;
        while let Ok((len, _)) = client.send(&mut buf) {
            let info = quiche::RecvInfo {
                from: c_addr,
                to: s_addr,
            };
            let _ = server.recv(&mut buf[..len], info);
            moved = true;
        }
        while let Ok((len, _)) = server.send(&mut buf) {
            let info = quiche::RecvInfo {
                from: s_addr,
                to: c_addr,
            };
            let _ = client.recv(&mut buf[..len], info);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

/// A stateless reset ending in `token`: a short header and unpredictable bytes before it.
fn reset(token: u128) -> Vec<u8> {
    let mut packet = vec![0x4b; 43];
    packet[27..].copy_from_slice(&token.to_be_bytes());
    packet
}

/// A connected pair whose server issued one more connection ID, with `token`.
fn connected(token: u128) -> (quiche::Connection, quiche::Connection, TestCert) {
    let cert = TestCert::new().unwrap();
    let mut ccfg = config();
    ccfg.verify_peer(false);
    let mut scfg = config();
    cert.load_into(&mut scfg).unwrap();
    scfg.set_stateless_reset_token(Some(1));
    let (c_addr, s_addr): (SocketAddr, SocketAddr) = (
        "198.18.0.10:40000".parse().unwrap(),
        "198.18.1.1:4433".parse().unwrap(),
    );
    let cscid = quiche::ConnectionId::from_ref(&[0xc1; 16]);
    let sscid = quiche::ConnectionId::from_ref(&[0x51; 16]);
    let mut client = quiche::connect(None, &cscid, c_addr, s_addr, &mut ccfg).unwrap();
    let mut server = quiche::accept(&sscid, None, s_addr, c_addr, &mut scfg).unwrap();
    pump(&mut client, &mut server);
    assert!(client.is_established() && server.is_established());
    let spare = quiche::ConnectionId::from_ref(&[0x52; 16]);
    server.new_scid(&spare, token, false).unwrap();
    pump(&mut client, &mut server);
    assert_eq!(client.available_dcids(), 1, "the client holds the spare ID");
    (client, server, cert)
}

#[test]
fn a_reset_with_the_token_of_a_later_connection_id_closes_the_client_at_once() {
    let token = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
    let (mut client, _server, _cert) = connected(token);
    let info = quiche::RecvInfo {
        from: "198.18.1.1:4433".parse().unwrap(),
        to: "198.18.0.10:40000".parse().unwrap(),
    };
    // A reset with a token the server never issued is ignored.
    let mut forged = reset(token ^ 1);
    let _ = client.recv(&mut forged, info);
    assert!(
        !client.is_closed(),
        "a wrong token must not close the connection"
    );
    let mut real = reset(token);
    let _ = client.recv(&mut real, info);
    assert!(
        client.is_closed(),
        "the reset carries the token of an ID the server issued after the handshake"
    );
    assert!(!client.is_timed_out());
}

#[test]
fn the_handshake_ids_token_still_resets() {
    let (mut client, _server, _cert) = connected(7);
    let info = quiche::RecvInfo {
        from: "198.18.1.1:4433".parse().unwrap(),
        to: "198.18.0.10:40000".parse().unwrap(),
    };
    let mut packet = reset(1);
    let _ = client.recv(&mut packet, info);
    assert!(client.is_closed());
}
