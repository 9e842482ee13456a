use super::*;

use std::net::SocketAddr;

fn peer() -> SocketAddr {
    "198.51.100.7:40000".parse().unwrap()
}

/// A real client Initial (quiche pads it to 1200 bytes), and its original destination ID.
fn initial() -> (Vec<u8>, Vec<u8>) {
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    config.verify_peer(false);
    config
        .set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
        .unwrap();
    let scid = quiche::ConnectionId::from_ref(&[7; CID_LEN]);
    let local: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let server: SocketAddr = "203.0.113.1:443".parse().unwrap();
    let mut conn = quiche::connect(None, &scid, local, server, &mut config).unwrap();
    let mut out = vec![0u8; 1500];
    let (len, _) = conn.send(&mut out).unwrap();
    out.truncate(len);
    let odcid = conn.destination_id().to_vec();
    (out, odcid)
}

fn header(datagram: &[u8]) -> quiche::Header<'static> {
    quiche::Header::from_slice(&mut datagram.to_vec(), CID_LEN).unwrap()
}

fn policy(retry: RetryMode) -> Policy {
    Policy {
        retry,
        retry_threshold: 4,
        max_half_open: 8,
        max_connections: 16,
    }
}

#[test]
fn reset_tokens_depend_on_the_key_and_the_connection_id_only() {
    let a = ResetKey::from_bytes(&[1; RESET_KEY_LEN]);
    let b = ResetKey::from_bytes(&[1; RESET_KEY_LEN]);
    let other = ResetKey::from_bytes(&[2; RESET_KEY_LEN]);
    assert_eq!(a.token(&[9; CID_LEN]), b.token(&[9; CID_LEN]));
    assert_ne!(a.token(&[9; CID_LEN]), a.token(&[8; CID_LEN]));
    assert_ne!(a.token(&[9; CID_LEN]), other.token(&[9; CID_LEN]));
}

#[test]
fn a_reset_is_smaller_than_its_trigger_looks_like_a_short_header_and_ends_with_the_token() {
    let key = ResetKey::from_bytes(&[3; RESET_KEY_LEN]);
    let rng = SystemRandom::new();
    let cid = [5u8; CID_LEN];
    let mut out = [0u8; 1500];
    for (trigger, want) in [
        (1400, Some(43)),
        (44, Some(43)),
        (43, Some(42)),
        (22, Some(21)),
        (21, None),
        (0, None),
    ] {
        let len = key.reset(&cid, trigger, &rng, &mut out);
        assert_eq!(len, want, "trigger of {trigger} bytes");
        if let Some(len) = len {
            assert_eq!(out[0] & 0xc0, 0x40, "form bit 0, fixed bit 1");
            assert_eq!(out[len - 16..len], key.token(&cid).to_be_bytes());
        }
    }
}

#[test]
fn the_reset_key_file_is_created_once_private_and_read_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reset.key");
    let rng = SystemRandom::new();
    let first = ResetKey::load_or_create(&path, &rng).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), RESET_KEY_LEN as u64);
    let again = ResetKey::load_or_create(&path, &rng).unwrap();
    assert_eq!(first.token(&[1; CID_LEN]), again.token(&[1; CID_LEN]));

    std::fs::write(&path, [0u8; 7]).unwrap();
    let err = ResetKey::load_or_create(&path, &rng).err().unwrap();
    assert!(
        err.contains("7 bytes") && err.contains("at least 32"),
        "{err}"
    );
    let err = ResetKey::load_or_create(&dir.path().join("no/such/dir/key"), &rng)
        .err()
        .unwrap();
    assert!(err.contains("cannot create"), "{err}");
}

#[test]
fn a_retry_token_is_valid_only_for_its_address_unaltered_and_for_a_while() {
    let rng = SystemRandom::new();
    let t0 = Instant::now();
    let mut tokens = RetryTokens::new(&rng, t0);
    let odcid = [0xab; 16];
    let scid = [0x5c; CID_LEN];
    let token = tokens.mint(peer(), &odcid, &scid, t0);
    assert_eq!(
        tokens.validate(peer(), &scid, &token, t0),
        Some(odcid.to_vec())
    );
    assert_eq!(
        tokens.validate(peer(), &[0x5d; CID_LEN], &token, t0),
        None,
        "another ID"
    );

    let other_port: SocketAddr = "198.51.100.7:40001".parse().unwrap();
    let other_ip: SocketAddr = "198.51.100.8:40000".parse().unwrap();
    assert_eq!(tokens.validate(other_port, &scid, &token, t0), None);
    assert_eq!(tokens.validate(other_ip, &scid, &token, t0), None);
    for i in 0..token.len() {
        let mut bad = token.clone();
        bad[i] ^= 1;
        assert_eq!(
            tokens.validate(peer(), &scid, &bad, t0),
            None,
            "byte {i} flipped"
        );
    }
    assert_eq!(
        tokens.validate(peer(), &scid, &token[..token.len() - 1], t0),
        None
    );
    assert_eq!(tokens.validate(peer(), &scid, &[], t0), None);
    let late = t0 + TOKEN_LIFETIME + Duration::from_secs(1);
    assert_eq!(tokens.validate(peer(), &scid, &token, late), None);

    // One rotation keeps the token valid (the previous key), a second one does not.
    tokens.rotate(&rng, t0 + TOKEN_KEY_ROTATION);
    assert!(
        tokens.validate(peer(), &scid, &token, t0).is_some(),
        "previous key"
    );
    let fresh = tokens.mint(peer(), &odcid, &scid, t0);
    assert!(
        tokens.validate(peer(), &scid, &fresh, t0).is_some(),
        "current key"
    );
    tokens.rotate(&rng, t0 + 2 * TOKEN_KEY_ROTATION);
    assert_eq!(
        tokens.validate(peer(), &scid, &token, t0),
        None,
        "key retired"
    );
    assert!(tokens.validate(peer(), &scid, &fresh, t0).is_some());
}

#[test]
fn small_initials_are_dropped_and_full_ones_retried_or_accepted_as_the_mode_says() {
    let rng = SystemRandom::new();
    let now = Instant::now();
    let tokens = RetryTokens::new(&rng, now);
    let (datagram, odcid) = initial();
    assert!(datagram.len() >= MIN_INITIAL_DATAGRAM);
    let hdr = header(&datagram);

    let mut gate = Gate::new(policy(RetryMode::Always), 10, now);
    // The 168-byte Initials of a flood: nothing is sent back, no state is kept.
    for len in [1, 168, MIN_INITIAL_DATAGRAM - 1] {
        assert_eq!(
            gate.admit(&hdr, len, peer(), 0, 0, &tokens, now),
            Admission::Drop(Refused::InitialTooSmall)
        );
    }
    assert_eq!(
        gate.admit(&hdr, datagram.len(), peer(), 0, 0, &tokens, now),
        Admission::Retry
    );
    // Back with the token: accepted with the original destination ID, even in `always`.
    let mut with_token = header(&datagram);
    with_token.token = Some(tokens.mint(peer(), &odcid, &with_token.dcid, now));
    assert_eq!(
        gate.admit(&with_token, datagram.len(), peer(), 0, 0, &tokens, now),
        Admission::Accept {
            odcid: Some(odcid.clone())
        }
    );
    // Someone else's token, or one from another address: dropped.
    let stolen: SocketAddr = "192.0.2.9:1".parse().unwrap();
    assert_eq!(
        gate.admit(&with_token, datagram.len(), stolen, 0, 0, &tokens, now),
        Admission::Drop(Refused::BadToken)
    );

    let mut auto = Gate::new(policy(RetryMode::Auto), 10, now);
    assert_eq!(
        auto.admit(&hdr, datagram.len(), peer(), 3, 3, &tokens, now),
        Admission::Accept { odcid: None }
    );
    assert_eq!(
        auto.admit(&hdr, datagram.len(), peer(), 4, 4, &tokens, now),
        Admission::Retry,
        "at the threshold of half-open connections"
    );

    let mut never = Gate::new(policy(RetryMode::Never), 10, now);
    assert_eq!(
        never.admit(&hdr, datagram.len(), peer(), 8, 8, &tokens, now),
        Admission::Drop(Refused::HalfOpenFull)
    );
    assert_eq!(
        never.admit(&hdr, datagram.len(), peer(), 16, 0, &tokens, now),
        Admission::Drop(Refused::ConnectionsFull)
    );
}

#[test]
fn version_negotiation_answers_only_full_datagrams_at_a_bounded_rate() {
    let rng = SystemRandom::new();
    let now = Instant::now();
    let tokens = RetryTokens::new(&rng, now);
    let (mut datagram, _) = initial();
    datagram[1..5].copy_from_slice(&0x1a2a_3a4a_u32.to_be_bytes());
    let hdr = header(&datagram);
    let mut gate = Gate::new(policy(RetryMode::Never), 2, now);
    assert_eq!(
        gate.admit(&hdr, 9, peer(), 0, 0, &tokens, now),
        Admission::Drop(Refused::NoVersionNegotiation)
    );
    let answered = (0..10)
        .filter(|_| {
            gate.admit(&hdr, datagram.len(), peer(), 0, 0, &tokens, now)
                == Admission::VersionNegotiation
        })
        .count();
    assert_eq!(answered, 2, "the bucket holds 2");
    let later = now + Duration::from_secs(1);
    assert_eq!(
        gate.admit(&hdr, datagram.len(), peer(), 0, 0, &tokens, later),
        Admission::VersionNegotiation,
        "refilled after a second"
    );
}

#[test]
fn short_headers_for_unknown_ids_draw_rate_limited_resets_and_other_packets_nothing() {
    let rng = SystemRandom::new();
    let now = Instant::now();
    let tokens = RetryTokens::new(&rng, now);
    let mut short = vec![0x40u8];
    short.extend_from_slice(&[0x11; CID_LEN]);
    short.extend_from_slice(&[0; 30]);
    let hdr = header(&short);
    let mut gate = Gate::new(policy(RetryMode::Never), 3, now);
    let resets = (0..10)
        .filter(|_| gate.admit(&hdr, short.len(), peer(), 0, 0, &tokens, now) == Admission::Reset)
        .count();
    assert_eq!(resets, 3);
    let mut fresh = Gate::new(policy(RetryMode::Never), 3, now);
    assert_eq!(
        fresh.admit(&hdr, MIN_RESET_LEN, peer(), 0, 0, &tokens, now),
        Admission::Drop(Refused::NoReset),
        "a reset must be smaller than its trigger and at least 21 bytes"
    );

    // A Handshake packet for no connection: nothing.
    let (mut datagram, _) = initial();
    datagram[0] = (datagram[0] & 0xcf) | 0x20;
    let hs = header(&datagram);
    assert_eq!(hs.ty, quiche::Type::Handshake);
    assert_eq!(
        fresh.admit(&hs, datagram.len(), peer(), 0, 0, &tokens, now),
        Admission::Drop(Refused::NotInitial)
    );
}

#[test]
fn the_rate_limit_refills_at_its_rate_up_to_one_second_of_tokens() {
    let t0 = Instant::now();
    let mut limit = RateLimit::new(100, t0);
    assert_eq!((0..1000).filter(|_| limit.allow(t0)).count(), 100);
    let t1 = t0 + Duration::from_millis(50);
    assert_eq!((0..1000).filter(|_| limit.allow(t1)).count(), 5);
    let t2 = t1 + Duration::from_secs(10);
    assert_eq!((0..1000).filter(|_| limit.allow(t2)).count(), 100);
    let mut zero = RateLimit::new(0, t0);
    assert!(!zero.allow(t0), "0: never");
    assert!(!zero.allow(t0 + Duration::from_secs(5)));
}

#[test]
fn a_client_answering_a_retry_is_accepted_and_completes_its_handshake() {
    let rng = SystemRandom::new();
    let now = Instant::now();
    let tokens = RetryTokens::new(&rng, now);
    let mut gate = Gate::new(policy(RetryMode::Always), 10, now);
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
    let cert = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert.0, ck.cert.pem()).unwrap();
    std::fs::write(&cert.1, ck.signing_key.serialize_pem()).unwrap();
    // The proxy's own transport settings on both sides (connection IDs of 20 bytes, a
    // stateless reset token, datagrams).
    let settings = crate::quic::QuicSettings::default();
    let mut ccfg = settings
        .transport_config(crate::quic::Tls::Client { ca: None })
        .unwrap();
    let mut scfg = settings
        .transport_config(crate::quic::Tls::Server {
            cert: &cert.0,
            key: &cert.1,
        })
        .unwrap();
    scfg.set_stateless_reset_token(Some(u128::MAX));
    let server: SocketAddr = "203.0.113.1:443".parse().unwrap();
    let cscid = quiche::ConnectionId::from_ref(&[3; CID_LEN]);
    let mut client = quiche::connect(None, &cscid, peer(), server, &mut ccfg).unwrap();
    let mut buf = vec![0u8; 1500];
    let (len, _) = client.send(&mut buf).unwrap();
    let hdr = quiche::Header::from_slice(&mut buf[..len], CID_LEN).unwrap();
    assert_eq!(
        gate.admit(&hdr, len, peer(), 0, 0, &tokens, now),
        Admission::Retry
    );
    let new_scid = quiche::ConnectionId::from_ref(&[4; CID_LEN]);
    let token = tokens.mint(peer(), &hdr.dcid, &new_scid, now);
    let mut retry = vec![0u8; 1500];
    let n = quiche::retry(
        &hdr.scid,
        &hdr.dcid,
        &new_scid,
        &token,
        hdr.version,
        &mut retry,
    )
    .unwrap();
    let info = quiche::RecvInfo {
        from: server,
        to: peer(),
    };
    client.recv(&mut retry[..n], info).unwrap();
    let (len, _) = client.send(&mut buf).unwrap();
    let hdr = quiche::Header::from_slice(&mut buf[..len], CID_LEN).unwrap();
    let Admission::Accept { odcid: Some(odcid) } =
        gate.admit(&hdr, len, peer(), 0, 0, &tokens, now)
    else {
        panic!("the Initial with the token is accepted");
    };
    let odcid = quiche::ConnectionId::from_vec(odcid);
    let mut conn = quiche::accept(&hdr.dcid, Some(&odcid), server, peer(), &mut scfg).unwrap();
    let to_server = quiche::RecvInfo {
        from: peer(),
        to: server,
    };
    conn.recv(&mut buf[..len], to_server).unwrap();
    for _ in 0..10 {
        while let Ok((n, _)) = conn.send(&mut buf) {
            let _ = client.recv(&mut buf[..n], info);
        }
        while let Ok((n, _)) = client.send(&mut buf) {
            let _ = conn.recv(&mut buf[..n], to_server);
        }
    }
    assert!(client.is_established() && conn.is_established());
    assert_eq!(client.peer_error(), None);
}
