//! The tensor codec on any tensor a peer can send: dtype, lz4 flag, shape, declared raw
//! length and payload all taken from the input. Decoding never panics, never allocates past
//! the cap, and what it accepts has exactly the shape's element count.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/neuroshard-model/src/codec.rs"]
#[allow(dead_code)]
mod codec;

use codec::{WireDType, WireTensor};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let dtype = [
        WireDType::F32,
        WireDType::F16,
        WireDType::BF16,
        WireDType::Int8Block,
    ][head[0] as usize % 4];
    let lz4 = head[1] & 1 == 1;
    let rank = head[2] as usize % (codec::MAX_RANK + 2);
    let mut rest = rest;
    let mut shape = Vec::with_capacity(rank);
    for _ in 0..rank {
        let Some((dim, tail)) = rest.split_first_chunk::<4>() else {
            return;
        };
        shape.push(u32::from_le_bytes(*dim) as usize);
        rest = tail;
    }
    let Some((raw_len, payload)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let tensor = WireTensor {
        dtype,
        shape: shape.clone(),
        payload: bytes::Bytes::copy_from_slice(payload),
        lz4,
        raw_len: u32::from_le_bytes(*raw_len) as usize,
    };
    if let Ok(values) = codec::decode(&tensor) {
        assert_eq!(values.len(), shape.iter().product::<usize>());
    }
});
