//! Checkpoint transfers on anything a peer can send: a manifest (sizes and hashes), then
//! chunks by index. Nothing panics or allocates past the assembly's cap, and an assembly
//! finishes only with every chunk matching the manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use neuroshard_train::checkpoint::{Assembly, Manifest};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<14>() else {
        return;
    };
    let total_bytes = u64::from(u32::from_le_bytes(head[..4].try_into().unwrap()));
    let chunk_bytes = u32::from_le_bytes(head[4..8].try_into().unwrap());
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
        // The hashes here are made up, so no chunk can have matched them.
        let _ = assembly.finish();
    }
});
