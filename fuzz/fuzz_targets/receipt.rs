//! Proof of Neural Work on any bytes a peer can send: a receipt, a countersignature (alone and
//! in a batch) and a credit pass. None panics; a receipt that reads back writes the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neuroshard_base::PublicKey;
use neuroshard_proof::{Countersignature, CreditPass, Receipt};

fuzz_target!(|data: &[u8]| {
    if let Ok(receipt) = Receipt::from_wire(data) {
        let again = Receipt::from_wire(&receipt.to_wire()).expect("its own bytes read back");
        assert_eq!(again.id(), receipt.id());
    }
    let worker = PublicKey([7; 32]);
    let _ = Countersignature::from_wire(data, &worker);
    let halves = data.split_at(data.len() / 2);
    let _ = Countersignature::from_wire_batch(&[halves.0.to_vec(), halves.1.to_vec()], &worker);
    let _ = CreditPass::from_wire(data, 1_800_000_000_000);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = CreditPass::from_text(text, 1_800_000_000_000);
    }
});
