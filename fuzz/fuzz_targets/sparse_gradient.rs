//! The sparse pseudo-gradient codec on any bytes a replica can send: decoding never panics,
//! and what it accepts is within its length and encodes back to what decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neuroshard_train::sparse::Sparse;

const MAX_LEN: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(sparse) = Sparse::decode(data, MAX_LEN) {
        assert!(sparse.len <= MAX_LEN);
        assert_eq!(sparse.to_dense().len() as u64, sparse.len);
        let again = Sparse::decode(&sparse.encode(), MAX_LEN).expect("its own encoding decodes");
        assert_eq!(again, sparse);
    }
});
