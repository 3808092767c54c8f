//! Relay frames on any bytes a peer can send: the type byte, then the payload. Decoding never
//! panics, and a decoded frame encodes back to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neuroshard_nat::relay::Frame;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    if payload.len() > u16::MAX as usize {
        return;
    }
    if let Ok(frame) = Frame::decode(kind, payload) {
        let bytes = frame.encode();
        assert_eq!(bytes[0], kind);
        assert_eq!(&bytes[3..], payload);
    }
});
