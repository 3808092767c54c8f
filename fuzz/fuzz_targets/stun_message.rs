//! STUN on any datagram: the server's answer to a request, and the client's reading of a
//! response for the transaction in the first 12 bytes. Neither panics; an answer is a
//! Binding response the client reads back as the requester's address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neuroshard_nat::stun::{answer, parse_binding_response};

fuzz_target!(|data: &[u8]| {
    let peer = "198.51.100.7:40000".parse().unwrap();
    if let Ok(response) = answer(data, peer)
        && data.len() >= 20
    {
        let tid: [u8; 12] = data[8..20].try_into().unwrap();
        let tid = stun_rs::TransactionId::from(tid);
        assert_eq!(parse_binding_response(&response, &tid), Ok(peer));
    }
    if let Some((tid, datagram)) = data.split_first_chunk::<12>() {
        let _ = parse_binding_response(datagram, &stun_rs::TransactionId::from(*tid));
    }
});
