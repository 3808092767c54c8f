//! The codec against the RFC 5769 test vectors, malformed datagrams, and a client and server
//! talking over loopback.

use std::net::SocketAddr;

use stun_rs::attributes::stun::{Nonce, Realm, Software, UserName};
use stun_rs::error::StunErrorLevel;
use stun_rs::{
    Algorithm, AlgorithmId, DecoderContextBuilder, HMACKey, MessageClass, MessageDecoder,
    MessageDecoderBuilder, StunErrorType, TransactionId,
};

use super::*;

/// The short-term password of the RFC 5769 samples.
const PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";

// RFC 5769 §2.1–2.4, byte for byte.
static SAMPLE_REQUEST: [u8; 108] = [
    0x00, 0x01, 0x00, 0x58, // Request type and message length
    0x21, 0x12, 0xa4, 0x42, // Magic cookie
    0xb7, 0xe7, 0xa7, 0x01, // }
    0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
    0xfa, 0x87, 0xdf, 0xae, // }
    0x80, 0x22, 0x00, 0x10, // SOFTWARE attribute header
    0x53, 0x54, 0x55, 0x4e, // }
    0x20, 0x74, 0x65, 0x73, // }  User-agent...
    0x74, 0x20, 0x63, 0x6c, // }  ...name
    0x69, 0x65, 0x6e, 0x74, // }
    0x00, 0x24, 0x00, 0x04, // PRIORITY attribute header
    0x6e, 0x00, 0x01, 0xff, // } ICE priority value
    0x80, 0x29, 0x00, 0x08, // ICE-CONTROLLED attribute header
    0x93, 0x2f, 0xf9, 0xb1, // }  Pseudo-random tie breaker...
    0x51, 0x26, 0x3b, 0x36, // }   ...for ICE control
    0x00, 0x06, 0x00, 0x09, // USERNAME attribute header
    0x65, 0x76, 0x74, 0x6a, // }
    0x3a, 0x68, 0x36, 0x76, // }  Username (9 bytes) and padding (3 bytes)
    0x59, 0x20, 0x20, 0x20, // }
    0x00, 0x08, 0x00, 0x14, // MESSAGE-INTEGRITY attribute header
    0x9a, 0xea, 0xa7, 0x0c, // }
    0xbf, 0xd8, 0xcb, 0x56, // }
    0x78, 0x1e, 0xf2, 0xb5, // }  HMAC-SHA1 fingerprint
    0xb2, 0xd3, 0xf2, 0x49, // }
    0xc1, 0xb5, 0x71, 0xa2, // }
    0x80, 0x28, 0x00, 0x04, // FINGERPRINT attribute header
    0xe5, 0x7a, 0x3b, 0xcf, // CRC32 fingerprint
];
static SAMPLE_IPV4_RESPONSE: [u8; 80] = [
    0x01, 0x01, 0x00, 0x3c, // Response type and message length
    0x21, 0x12, 0xa4, 0x42, // Magic cookie
    0xb7, 0xe7, 0xa7, 0x01, // }
    0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
    0xfa, 0x87, 0xdf, 0xae, // }
    0x80, 0x22, 0x00, 0x0b, // SOFTWARE attribute header
    0x74, 0x65, 0x73, 0x74, // }
    0x20, 0x76, 0x65, 0x63, // }  UTF-8 server name
    0x74, 0x6f, 0x72, 0x20, // }
    0x00, 0x20, 0x00, 0x08, // XOR-MAPPED-ADDRESS attribute header
    0x00, 0x01, 0xa1, 0x47, // Address family (IPv4) and xor'd mapped port number
    0xe1, 0x12, 0xa6, 0x43, // Xor'd mapped IPv4 address
    0x00, 0x08, 0x00, 0x14, // MESSAGE-INTEGRITY header
    0x2b, 0x91, 0xf5, 0x99, // }
    0xfd, 0x9e, 0x90, 0xc3, // }
    0x8c, 0x74, 0x89, 0xf9, // } HMAC-SHA1 fingerprint
    0x2a, 0xf9, 0xba, 0x53, // }
    0xf0, 0x6b, 0xe7, 0xd7, // }
    0x80, 0x28, 0x00, 0x04, // FINGERPRINT attribute header
    0xc0, 0x7d, 0x4c, 0x96, // CRC32 fingerprint
];
static SAMPLE_IPV6_RESPONSE: [u8; 92] = [
    0x01, 0x01, 0x00, 0x48, // Response type and message length
    0x21, 0x12, 0xa4, 0x42, // Magic cookie
    0xb7, 0xe7, 0xa7, 0x01, // }
    0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
    0xfa, 0x87, 0xdf, 0xae, // }
    0x80, 0x22, 0x00, 0x0b, // SOFTWARE attribute header
    0x74, 0x65, 0x73, 0x74, // }
    0x20, 0x76, 0x65, 0x63, // }  UTF-8 server name
    0x74, 0x6f, 0x72, 0x20, // }
    0x00, 0x20, 0x00, 0x14, // XOR-MAPPED-ADDRESS attribute header
    0x00, 0x02, 0xa1, 0x47, // Address family (IPv6) and xor'd mapped port number
    0x01, 0x13, 0xa9, 0xfa, // }
    0xa5, 0xd3, 0xf1, 0x79, // }  Xor'd mapped IPv6 address
    0xbc, 0x25, 0xf4, 0xb5, // }
    0xbe, 0xd2, 0xb9, 0xd9, // }
    0x00, 0x08, 0x00, 0x14, // MESSAGE-INTEGRITY attribute header
    0xa3, 0x82, 0x95, 0x4e, // }
    0x4b, 0xe6, 0x7b, 0xf1, // }
    0x17, 0x84, 0xc9, 0x7c, // }  HMAC-SHA1 fingerprint
    0x82, 0x92, 0xc2, 0x75, // }
    0xbf, 0xe3, 0xed, 0x41, // }
    0x80, 0x28, 0x00, 0x04, // FINGERPRINT attribute header
    0xc8, 0xfb, 0x0b, 0x4c, // CRC32 fingerprint
];
static SAMPLE_REQUEST_LONG_TERM_AUTH: [u8; 116] = [
    0x00, 0x01, 0x00, 0x60, // Request type and message length
    0x21, 0x12, 0xa4, 0x42, // Magic cookie
    0x78, 0xad, 0x34, 0x33, // }
    0xc6, 0xad, 0x72, 0xc0, // }  Transaction ID
    0x29, 0xda, 0x41, 0x2e, // }
    0x00, 0x06, 0x00, 0x12, // USERNAME attribute header
    0xe3, 0x83, 0x9e, 0xe3, // }
    0x83, 0x88, 0xe3, 0x83, // }
    0xaa, 0xe3, 0x83, 0x83, // } Username value (18 bytes) and padding (2 bytes)
    0xe3, 0x82, 0xaf, 0xe3, // }
    0x82, 0xb9, 0x00, 0x00, // }
    0x00, 0x15, 0x00, 0x1c, // NONCE attribute header
    0x66, 0x2f, 0x2f, 0x34, // }
    0x39, 0x39, 0x6b, 0x39, // }
    0x35, 0x34, 0x64, 0x36, // }
    0x4f, 0x4c, 0x33, 0x34, // } Nonce value
    0x6f, 0x4c, 0x39, 0x46, // }
    0x53, 0x54, 0x76, 0x79, // }
    0x36, 0x34, 0x73, 0x41, // }
    0x00, 0x14, 0x00, 0x0b, // REALM attribute header
    0x65, 0x78, 0x61, 0x6d, // }
    0x70, 0x6c, 0x65, 0x2e, // }  Realm value (11 bytes) and padding (1 byte)
    0x6f, 0x72, 0x67, 0x00, // }
    0x00, 0x08, 0x00, 0x14, // MESSAGE-INTEGRITY header
    0xf6, 0x70, 0x24, 0x65, // }
    0x6d, 0xd6, 0x4a, 0x3e, // }
    0x02, 0xb8, 0xe0, 0x71, // } HMAC-SHA1 fingerprint
    0x2e, 0x85, 0xc9, 0xa2, // }
    0x8c, 0xa8, 0x96, 0x66, // }
];

fn short_term() -> MessageDecoder {
    let key = HMACKey::new_short_term(PASSWORD).unwrap();
    MessageDecoderBuilder::default()
        .with_context(
            DecoderContextBuilder::default()
                .with_key(key)
                .with_validation()
                .build(),
        )
        .build()
}

fn sample_tid() -> TransactionId {
    TransactionId::from([
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ])
}

#[test]
fn rfc5769_sample_request_decodes_with_its_integrity_and_fingerprint() {
    let (message, size) = short_term().decode(&SAMPLE_REQUEST).unwrap();
    assert_eq!(size, SAMPLE_REQUEST.len());
    assert_eq!(
        (message.class(), message.method()),
        (MessageClass::Request, BINDING)
    );
    let user = message.get::<UserName>().unwrap().as_user_name().unwrap();
    assert_eq!(user.as_str(), "evtj:h6vY");
    let software = message.get::<Software>().unwrap().as_software().unwrap();
    assert_eq!(software.as_str(), "STUN test client");
    // Our server answers it with the requester's address, under the same transaction.
    let peer: SocketAddr = "192.0.2.1:32853".parse().unwrap();
    let response = answer(&SAMPLE_REQUEST, peer).unwrap();
    assert_eq!(parse_binding_response(&response, &sample_tid()), Ok(peer));
}

#[test]
fn rfc5769_sample_responses_carry_the_mapped_addresses() {
    for (bytes, mapped) in [
        (&SAMPLE_IPV4_RESPONSE[..], "192.0.2.1:32853"),
        (
            &SAMPLE_IPV6_RESPONSE[..],
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
        ),
    ] {
        let mapped = mapped.parse::<SocketAddr>().unwrap();
        // With the integrity key, as a client holding the credential would check it.
        let (message, _) = short_term().decode(bytes).unwrap();
        assert_eq!(message.class(), MessageClass::SuccessResponse);
        let xor = message.get::<XorMappedAddress>().unwrap();
        assert_eq!(
            *xor.as_xor_mapped_address().unwrap().socket_address(),
            mapped
        );
        // Our client, which holds none: the FINGERPRINT is checked, the address read.
        assert_eq!(parse_binding_response(bytes, &sample_tid()), Ok(mapped));
        // One flipped bit of the address breaks the FINGERPRINT, and is refused by name.
        let mut flipped = bytes.to_vec();
        flipped[47] ^= 1;
        let err = parse_binding_response(&flipped, &sample_tid()).unwrap_err();
        assert!(err.to_string().contains("FINGERPRINT"), "{err}");
    }
}

#[test]
fn rfc5769_long_term_request_decodes_with_its_key() {
    let user = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    let key = HMACKey::new_long_term(
        user,
        "example.org",
        "TheMatrIX",
        Algorithm::from(AlgorithmId::MD5),
    )
    .unwrap();
    let decoder = MessageDecoderBuilder::default()
        .with_context(
            DecoderContextBuilder::default()
                .with_key(key)
                .with_validation()
                .build(),
        )
        .build();
    let (message, size) = decoder.decode(&SAMPLE_REQUEST_LONG_TERM_AUTH).unwrap();
    assert_eq!(size, SAMPLE_REQUEST_LONG_TERM_AUTH.len());
    let realm = message.get::<Realm>().unwrap().as_realm().unwrap();
    assert_eq!(realm.as_str(), "example.org");
    let nonce = message.get::<Nonce>().unwrap().as_nonce().unwrap();
    assert_eq!(nonce.as_str(), "f//499k954d6OL34oL9FSTvy64sA");
}

#[test]
fn a_wrong_password_a_broken_fingerprint_and_a_short_datagram_are_refused() {
    let wrong = MessageDecoderBuilder::default()
        .with_context(
            DecoderContextBuilder::default()
                .with_key(HMACKey::new_short_term("wrong").unwrap())
                .with_validation()
                .build(),
        )
        .build();
    let err = wrong.decode(&SAMPLE_IPV4_RESPONSE).unwrap_err();
    assert!(
        matches!(&err.0, StunErrorLevel::Attribute(e) if e.error == StunErrorType::ValidationFailed),
        "{err:?}"
    );
    let mut tampered = SAMPLE_IPV4_RESPONSE;
    tampered[79] ^= 1;
    assert!(short_term().decode(&tampered).is_err());
    let err = answer(&SAMPLE_REQUEST[..15], "192.0.2.1:1".parse().unwrap()).unwrap_err();
    assert!(err.to_string().contains("not a STUN message"), "{err}");
}

#[test]
fn malformed_and_unexpected_datagrams_get_named_errors() {
    let peer: SocketAddr = "198.51.100.7:4000".parse().unwrap();
    let (tid, request) = binding_request();
    // Garbage, an empty datagram, a request whose length field lies.
    for bytes in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[][..]] {
        let err = answer(bytes, peer).unwrap_err();
        assert!(err.to_string().contains("not a STUN message"), "{err}");
    }
    let mut lying = request.clone();
    lying[3] = 0xf0;
    assert!(
        answer(&lying, peer)
            .unwrap_err()
            .to_string()
            .contains("not a STUN message")
    );
    // A response sent to a server, and a request where a response belongs.
    let response = answer(&request, peer).unwrap();
    assert!(
        answer(&response, peer)
            .unwrap_err()
            .to_string()
            .contains("Binding request")
    );
    let err = parse_binding_response(&request, &tid).unwrap_err();
    assert!(
        err.to_string().contains("where a response belongs"),
        "{err}"
    );
    // An answer to another transaction, and one without an address.
    let (other, _) = binding_request();
    assert_eq!(
        parse_binding_response(&response, &other),
        Err(StunFault::OtherTransaction)
    );
    let bare = encode(
        &StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(tid)
            .build(),
    );
    let err = parse_binding_response(&bare, &tid).unwrap_err();
    assert!(matches!(err, StunFault::NoAddress(_)), "{err}");
    assert_eq!(parse_binding_response(&response, &tid), Ok(peer));
}

#[test]
fn mappings_are_classified_from_the_answers() {
    let a: SocketAddr = "11.0.0.10:3478".parse().unwrap();
    let b: SocketAddr = "11.0.0.11:3478".parse().unwrap();
    let local: SocketAddr = "192.168.1.5:5000".parse().unwrap();
    let out: SocketAddr = "11.0.0.1:5000".parse().unwrap();
    let other: SocketAddr = "11.0.0.1:6001".parse().unwrap();
    assert_eq!(classify(local, &[(a, local)]), Some(Mapping::None));
    assert_eq!(classify(local, &[(a, out)]), None, "one server cannot tell");
    assert_eq!(
        classify(local, &[(a, out), (b, out)]),
        Some(Mapping::EndpointIndependent)
    );
    assert_eq!(
        classify(local, &[(a, out), (b, other)]),
        Some(Mapping::EndpointDependent)
    );
}

#[tokio::test]
async fn a_client_learns_its_address_from_two_servers_on_loopback() {
    let cancel = CancellationToken::new();
    let servers = [
        Server::start("127.0.0.1:0".parse().unwrap(), cancel.clone())
            .await
            .unwrap(),
        Server::start("127.0.0.2:0".parse().unwrap(), cancel.clone())
            .await
            .unwrap(),
    ];
    let report = probe(
        &servers.iter().map(Server::addr).collect::<Vec<_>>(),
        Retransmit::default(),
    )
    .await
    .unwrap();
    // No NAT on loopback: both servers see the socket's own address.
    assert_eq!(report.mapped.len(), 2, "{report:?}");
    assert!(report.mapped.iter().all(|(_, m)| *m == report.local));
    assert_eq!(report.mapping, Some(Mapping::None));
    assert_eq!(report.external(), Some(report.local));
    // Junk sent to a server is dropped and counted; it keeps answering.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(b"junk", servers[0].addr()).await.unwrap();
    let mapped = query(&socket, servers[0].addr(), Retransmit::default())
        .await
        .unwrap();
    assert_eq!(mapped, socket.local_addr().unwrap());
    assert_eq!((servers[0].answered(), servers[0].refused()), (2, 1));
    cancel.cancel();
    for server in servers {
        server.stopped().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_times_out_after_the_retransmissions() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let err = query(&socket, silent.local_addr().unwrap(), Retransmit::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, NatError::StunTimeout { waited, .. } if waited == Duration::from_millis(7750)),
        "{err}"
    );
    // The five requests did arrive.
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        silent.recv_from(&mut buf).await.unwrap();
    }
}

#[tokio::test]
async fn a_flood_from_one_source_is_answered_at_its_rate_and_others_still_are() {
    let cancel = CancellationToken::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), cancel.clone())
        .await
        .unwrap();
    let flooder = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let (_, request) = binding_request();
    for _ in 0..1000 {
        flooder.send_to(&request, server.addr()).await.unwrap();
    }
    // Another source is answered once the flood has been read.
    let socket = UdpSocket::bind("127.0.0.4:0").await.unwrap();
    let mapped = query(&socket, server.addr(), Retransmit::default())
        .await
        .unwrap();
    assert_eq!(mapped, socket.local_addr().unwrap());
    // The burst and a few seconds' rate at most, however long the flood took to read.
    let answered = server.answered() - 1;
    assert!(answered <= 30, "{answered} of 1000 answered");
    // The kernel may drop some of the flood before the server reads it.
    assert!(server.refused() >= 500, "{} refused", server.refused());
    cancel.cancel();
}
