//! Checkpoint transfers on anything a peer can send: a manifest (sizes and hashes), then
//! chunks by index. Nothing panics or allocates past the assembly's cap; half the time the
//! manifest is of real bytes whose chunks then arrive, one maybe corrupted, and the assembly
//! finishes exactly when none was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neuroshard_train::checkpoint::{Assembly, Manifest};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<14>() else {
        return;
    };
    let total_bytes = u64::from(u32::from_le_bytes(head[..4].try_into().unwrap()));
    let chunk_bytes = u32::from_le_bytes(head[4..8].try_into().unwrap());
    if head[9] & 1 == 1 && chunk_bytes > 0 {
        real_transfer(rest, chunk_bytes.min(1 << 12), head[10] as usize);
        return;
    }
    let chunks = u16::from_le_bytes(head[8..10].try_into().unwrap()) as usize % 64;
    let hash_seed = u32::from_le_bytes(head[10..14].try_into().unwrap());
    let hash = |i: usize| {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&(hash_seed ^ i as u32).to_le_bytes());
        h
    };
    let manifest = Manifest {
        total_bytes,
        chunk_bytes,
        chunk_hashes: (0..chunks).map(hash).collect(),
        hash: hash(usize::MAX),
    };
    if manifest.check().is_err() {
        return;
    }
    let Ok(mut assembly) = Assembly::new(manifest, 1 << 20) else {
        return;
    };
    let mut rest = rest;
    while let Some((chunk, tail)) = rest.split_first_chunk::<3>() {
        let len = u16::from_le_bytes([chunk[1], chunk[2]]) as usize;
        let (bytes, tail) = tail.split_at(len.min(tail.len()));
        let _ = assembly.accept(chunk[0] as usize, bytes);
        rest = tail;
    }
    if assembly.missing().is_empty() {
        let _ = assembly.finish();
    }
});

/// The chunks of `bytes` sent in order under their own manifest, chunk `corrupt` (if there is
/// one) with a byte flipped: refused by number, and the assembly finishes only without it.
fn real_transfer(bytes: &[u8], chunk_bytes: u32, corrupt: usize) {
    let manifest = Manifest::of(bytes, chunk_bytes);
    if manifest.check().is_err() {
        return;
    }
    let mut assembly = Assembly::new(manifest, 1 << 20).expect("a manifest of real bytes");
    let mut corrupted = false;
    for (i, chunk) in bytes.chunks(chunk_bytes as usize).enumerate() {
        let mut chunk = chunk.to_vec();
        if i == corrupt {
            chunk[0] ^= 1;
            corrupted = true;
            assert!(
                assembly.accept(i, &chunk).is_err(),
                "a corrupted chunk is refused"
            );
        } else {
            assembly
                .accept(i, &chunk)
                .expect("a real chunk is accepted");
        }
    }
    assert_eq!(assembly.missing().is_empty(), !corrupted);
    if !corrupted {
        assert_eq!(assembly.finish().expect("every chunk matched"), bytes);
    }
}
