//! DHT records on anything a peer can send: a key's text form, and a record's key, value,
//! publisher, expiry and signature, verified and offered to a store. Nothing panics, and a
//! store holds only what verified.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neuroshard_base::PublicKey;
use neuroshard_dht::store::{RecordStore, StoreLimits};
use neuroshard_dht::{Record, RecordKey};

const NOW: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((fixed, rest)) = data.split_first_chunk::<106>() else {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = text.parse::<RecordKey>();
        }
        return;
    };
    let publisher = PublicKey(fixed[..32].try_into().unwrap());
    let signature: [u8; 64] = fixed[32..96].try_into().unwrap();
    let ahead = u64::from_le_bytes(fixed[96..104].try_into().unwrap()) % (48 * 3_600_000);
    let key_len = u16::from_le_bytes([fixed[104], fixed[105]]) as usize;
    let (key, value) = rest.split_at(key_len.min(rest.len()));
    let Ok(key) = std::str::from_utf8(key).map(str::parse::<RecordKey>) else {
        return;
    };
    let Ok(key) = key else {
        return;
    };
    let record = match fixed[0] & 1 {
        // Signed for real half the time, so the store's limits are reached too.
        1 => {
            let signer = neuroshard_base::NodeKey::from_bytes(&[fixed[1]; 32]);
            match Record::sign(key, value.to_vec(), NOW + ahead, &signer) {
                Ok(record) => record,
                Err(_) => return,
            }
        }
        _ => Record {
            key,
            value: value.to_vec(),
            publisher,
            expires_ms: NOW + ahead,
            signature,
        },
    };
    let verified = record.verify(NOW).is_ok();
    let mut store = RecordStore::new(StoreLimits::default());
    assert_eq!(store.put(record, None, NOW).is_ok(), verified);
});
