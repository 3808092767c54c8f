//! Every request message a node, tracker or DHT server decodes, through the same wire check
//! its service runs before prost: the first byte picks the type. Neither panics, and a
//! message the check passes decodes with its repeated fields within their caps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neuroshard_proto::checked::{MAX_SHAPE, MAX_SUBMITTED, MAX_TOKEN_IDS, check};
use neuroshard_proto::{self as pb, forward_request::Input};
use prost::Message;

/// Checks and decodes `bytes` as a `T`, as the service's codec does.
fn read<T: Message + Default + 'static>(bytes: &[u8]) -> Option<T> {
    check::<T>(bytes).ok()?;
    T::decode(bytes).ok()
}

fn tensor_ok(t: &pb::Tensor) -> bool {
    t.shape.len() <= MAX_SHAPE
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    match pick % 16 {
        0 => {
            if let Some(r) = read::<pb::ForwardRequest>(bytes) {
                match r.input {
                    Some(Input::Hidden(t)) => assert!(tensor_ok(&t)),
                    Some(Input::Tokens(t)) => assert!(t.ids.len() <= MAX_TOKEN_IDS),
                    None => {}
                }
            }
        }
        1 => {
            if let Some(r) = read::<pb::BackwardRequest>(bytes) {
                assert!(r.grad_output.as_ref().is_none_or(tensor_ok));
            }
        }
        2 => {
            if let Some(r) = read::<pb::SubmitReceiptsRequest>(bytes) {
                assert!(r.countersigned.len() <= MAX_SUBMITTED);
            }
        }
        3 => drop(read::<pb::CheckpointRequest>(bytes)),
        4 => drop(read::<pb::CheckpointChunk>(bytes)),
        5 => drop(read::<pb::EndSessionRequest>(bytes)),
        6 => drop(read::<pb::PingRequest>(bytes)),
        7 => drop(read::<pb::GetPeersRequest>(bytes)),
        8 => drop(read::<pb::DialBackRequest>(bytes)),
        9 => drop(read::<pb::ExchangeGradientRequest>(bytes)),
        10 => drop(read::<pb::ModelFileRequest>(bytes)),
        11 => drop(read::<pb::StoreRequest>(bytes)),
        12 => drop(read::<pb::FindValueRequest>(bytes)),
        13 => drop(read::<pb::FindNodeRequest>(bytes)),
        14 => drop(read::<pb::RegisterRequest>(bytes)),
        _ => drop(read::<pb::HeartbeatRequest>(bytes)),
    }
});
