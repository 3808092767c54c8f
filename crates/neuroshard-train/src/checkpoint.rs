//! Checkpoints in transit: a shard's bytes cut into chunks of a few MiB, each hashed, under a
//! manifest that also hashes the whole.
//!
//! The receiver keeps an [`Assembly`]: it takes chunks in any order, checks each against the
//! manifest as it arrives (a corrupted one is refused by number and asked for again), says which
//! are still missing (so a cut transfer resumes from there instead of from the start), and hands
//! the bytes over only once every chunk is in and the whole matches.

use sha2::{Digest, Sha256};

/// Chunk size: 4 MiB, a few round trips' worth on a home uplink and well under the 100 MiB
/// message cap.
pub const CHUNK_BYTES: u32 = 4 << 20;

/// Longest a checkpoint stream may go without moving a chunk, either way, before it is cut:
/// 2 minutes, a 4 MiB chunk at 35 KB/s. A cut transfer resumes with the missing chunks.
pub const CHUNK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Most chunks in one checkpoint: what the wire codec reads of a manifest's chunk hashes or a
/// request's chunk list (`neuroshard_proto::checked::MAX_CHUNKS`).
pub const MAX_CHUNKS: usize = 1 << 16;

/// Largest chunk a manifest may name: 64 MiB, under the 100 MiB message cap.
pub const MAX_CHUNK_BYTES: u32 = 64 << 20;

/// Largest checkpoint an assembly accepts: 64 GiB (a 7B model's fp32 weights with room).
pub const MAX_CHECKPOINT_BYTES: u64 = 64 << 30;

/// Why a checkpoint transfer failed; each names what it was checking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The manifest does not describe a checkpoint of a size it can have.
    #[error("checkpoint manifest: {0}")]
    BadManifest(String),
    /// A chunk number past the last.
    #[error("chunk {index} does not exist: the checkpoint has {chunks} chunks")]
    NoSuchChunk {
        /// The chunk named.
        index: usize,
        /// Chunks in all.
        chunks: usize,
    },
    /// A chunk of the wrong size.
    #[error("chunk {index} has {got} bytes, the manifest says {expected}")]
    ChunkSize {
        /// Which chunk.
        index: usize,
        /// What arrived.
        got: usize,
        /// What it should be.
        expected: usize,
    },
    /// A chunk whose hash is not the manifest's.
    #[error("chunk {index} (bytes {start}..{end}) does not match its hash: corrupted in transit")]
    ChunkHash {
        /// Which chunk.
        index: usize,
        /// Its first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// Chunks still missing when the whole was asked for.
    #[error("checkpoint incomplete: {missing} of {chunks} chunks missing, the first is {first}")]
    Incomplete {
        /// How many are missing.
        missing: usize,
        /// Chunks in all.
        chunks: usize,
        /// The first missing one, where a transfer resumes.
        first: usize,
    },
    /// Every chunk checked out but the whole does not match.
    #[error("the assembled checkpoint does not match its hash")]
    WholeHash,
}

/// What a checkpoint is: its size, its chunking and the hashes to check it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Bytes in all.
    pub total_bytes: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_bytes: u32,
    /// SHA-256 of each chunk, in order.
    pub chunk_hashes: Vec<[u8; 32]>,
    /// SHA-256 of the whole.
    pub hash: [u8; 32],
}

/// SHA-256 of a whole checkpoint's bytes: its manifest's `hash`.
pub fn whole_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Manifest {
    /// The manifest of `bytes` cut into chunks of `chunk_bytes`.
    pub fn of(bytes: &[u8], chunk_bytes: u32) -> Manifest {
        let chunk_bytes = chunk_bytes.max(1);
        Manifest {
            total_bytes: bytes.len() as u64,
            chunk_bytes,
            chunk_hashes: bytes
                .chunks(chunk_bytes as usize)
                .map(|c| Sha256::digest(c).into())
                .collect(),
            hash: whole_hash(bytes),
        }
    }

    /// Chunks in all.
    pub fn chunks(&self) -> usize {
        self.chunk_hashes.len()
    }

    /// The byte range of chunk `index`.
    pub fn range(&self, index: usize) -> Result<std::ops::Range<u64>, CheckpointError> {
        if index >= self.chunks() {
            return Err(CheckpointError::NoSuchChunk {
                index,
                chunks: self.chunks(),
            });
        }
        let start = index as u64 * u64::from(self.chunk_bytes);
        Ok(start..(start + u64::from(self.chunk_bytes)).min(self.total_bytes))
    }

    /// Checks that the manifest can describe a checkpoint: a size under the cap and as many
    /// chunk hashes as its size and chunking make.
    pub fn check(&self) -> Result<(), CheckpointError> {
        let bad = |why: String| Err(CheckpointError::BadManifest(why));
        if self.chunk_bytes == 0 || self.chunk_bytes > MAX_CHUNK_BYTES {
            return bad(format!(
                "chunk size {} is not in 1..={MAX_CHUNK_BYTES}",
                self.chunk_bytes
            ));
        }
        if self.total_bytes > MAX_CHECKPOINT_BYTES {
            return bad(format!(
                "{} bytes, more than the {MAX_CHECKPOINT_BYTES} accepted",
                self.total_bytes
            ));
        }
        let expected = self.total_bytes.div_ceil(u64::from(self.chunk_bytes));
        if expected > MAX_CHUNKS as u64 {
            return bad(format!(
                "{expected} chunks of {} bytes; at most {MAX_CHUNKS} (larger chunks, then)",
                self.chunk_bytes
            ));
        }
        if self.chunk_hashes.len() as u64 != expected {
            return bad(format!(
                "{} chunk hashes for {} bytes in chunks of {}, expected {expected}",
                self.chunk_hashes.len(),
                self.total_bytes,
                self.chunk_bytes
            ));
        }
        Ok(())
    }
}

/// A checkpoint being received.
#[derive(Debug)]
pub struct Assembly {
    manifest: Manifest,
    data: Vec<u8>,
    have: Vec<bool>,
}

impl Assembly {
    /// Starts receiving the checkpoint `manifest` describes, if it is at most `max_bytes` (the
    /// size the receiver expects of the shard, so a peer's manifest cannot make it allocate
    /// more).
    pub fn new(manifest: Manifest, max_bytes: u64) -> Result<Assembly, CheckpointError> {
        manifest.check()?;
        if manifest.total_bytes > max_bytes {
            return Err(CheckpointError::BadManifest(format!(
                "{} bytes, more than the {max_bytes} expected of this shard",
                manifest.total_bytes
            )));
        }
        let mut data = Vec::new();
        data.try_reserve_exact(manifest.total_bytes as usize)
            .map_err(|e| CheckpointError::BadManifest(format!("no memory for it: {e}")))?;
        data.resize(manifest.total_bytes as usize, 0);
        Ok(Assembly {
            data,
            have: vec![false; manifest.chunks()],
            manifest,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Takes chunk `index`, checked against its hash; a chunk already in is checked again and
    /// kept. A refused chunk leaves what was received untouched.
    pub fn accept(&mut self, index: usize, bytes: &[u8]) -> Result<(), CheckpointError> {
        let range = self.manifest.range(index)?;
        let expected = (range.end - range.start) as usize;
        if bytes.len() != expected {
            return Err(CheckpointError::ChunkSize {
                index,
                got: bytes.len(),
                expected,
            });
        }
        let hash: [u8; 32] = Sha256::digest(bytes).into();
        if hash != self.manifest.chunk_hashes[index] {
            return Err(CheckpointError::ChunkHash {
                index,
                start: range.start,
                end: range.end,
            });
        }
        self.data[range.start as usize..range.end as usize].copy_from_slice(bytes);
        self.have[index] = true;
        Ok(())
    }

    /// The chunks not yet received, in order: what a resumed transfer asks for.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.have.len()).filter(|&i| !self.have[i]).collect()
    }

    /// Bytes received so far, for progress.
    pub fn received_bytes(&self) -> u64 {
        (0..self.have.len())
            .filter(|&i| self.have[i])
            .map(|i| {
                let r = self.manifest.range(i).expect("index in range");
                r.end - r.start
            })
            .sum()
    }

    /// The checkpoint's bytes, once every chunk is in and the whole matches its hash.
    pub fn finish(self) -> Result<Vec<u8>, CheckpointError> {
        let missing = self.missing();
        if let Some(&first) = missing.first() {
            return Err(CheckpointError::Incomplete {
                missing: missing.len(),
                chunks: self.have.len(),
                first,
            });
        }
        let hash: [u8; 32] = Sha256::digest(&self.data).into();
        if hash != self.manifest.hash {
            return Err(CheckpointError::WholeHash);
        }
        Ok(self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn chunks_arrive_in_any_order_and_assemble_to_the_whole() {
        let bytes = shard(10_000);
        let manifest = Manifest::of(&bytes, 1024);
        assert_eq!(manifest.chunks(), 10);
        assert_eq!(manifest.range(9).unwrap(), 9216..10_000);
        let mut assembly = Assembly::new(manifest.clone(), u64::MAX).unwrap();
        for i in (0..10).rev() {
            let r = manifest.range(i).unwrap();
            assembly
                .accept(i, &bytes[r.start as usize..r.end as usize])
                .unwrap();
        }
        assert_eq!(assembly.received_bytes(), 10_000);
        assert_eq!(assembly.finish().unwrap(), bytes);
    }

    #[test]
    fn a_corrupted_chunk_is_refused_by_number_and_fetched_again() {
        let bytes = shard(5000);
        let manifest = Manifest::of(&bytes, 1000);
        let mut assembly = Assembly::new(manifest, u64::MAX).unwrap();
        assembly.accept(0, &bytes[..1000]).unwrap();
        let mut corrupted = bytes[2000..3000].to_vec();
        corrupted[17] ^= 0x40;
        let err = assembly.accept(2, &corrupted).unwrap_err();
        assert_eq!(
            err,
            CheckpointError::ChunkHash {
                index: 2,
                start: 2000,
                end: 3000
            }
        );
        assert!(err.to_string().contains("chunk 2"), "{err}");
        // What was in stays in; the chunk is asked for again and taken.
        assert_eq!(assembly.missing(), [1, 2, 3, 4]);
        assembly.accept(2, &bytes[2000..3000]).unwrap();
        assert_eq!(assembly.missing(), [1, 3, 4]);
    }

    #[test]
    fn a_cut_transfer_resumes_from_the_first_missing_chunk() {
        let bytes = shard(7000);
        let manifest = Manifest::of(&bytes, 1000);
        let mut assembly = Assembly::new(manifest.clone(), u64::MAX).unwrap();
        // The connection drops after three chunks.
        for i in 0..3 {
            assembly
                .accept(i, &bytes[i * 1000..(i + 1) * 1000])
                .unwrap();
        }
        let resume = assembly.missing();
        assert_eq!(resume.first(), Some(&3));
        assert_eq!(assembly.received_bytes(), 3000);
        for i in resume {
            let r = manifest.range(i).unwrap();
            assembly
                .accept(i, &bytes[r.start as usize..r.end as usize])
                .unwrap();
        }
        assert_eq!(assembly.finish().unwrap(), bytes);
    }

    #[test]
    fn incomplete_or_inconsistent_checkpoints_are_never_handed_over() {
        let bytes = shard(3000);
        let manifest = Manifest::of(&bytes, 1000);
        let mut assembly = Assembly::new(manifest.clone(), u64::MAX).unwrap();
        assembly.accept(0, &bytes[..1000]).unwrap();
        assert_eq!(
            assembly.finish().unwrap_err(),
            CheckpointError::Incomplete {
                missing: 2,
                chunks: 3,
                first: 1
            }
        );
        // Chunk hashes that agree with the chunks but not with the whole.
        let mut lying = manifest.clone();
        lying.hash = [0; 32];
        let mut assembly = Assembly::new(lying, u64::MAX).unwrap();
        for i in 0..3 {
            assembly
                .accept(i, &bytes[i * 1000..(i + 1) * 1000])
                .unwrap();
        }
        assert_eq!(assembly.finish().unwrap_err(), CheckpointError::WholeHash);
        let mut assembly = Assembly::new(manifest.clone(), u64::MAX).unwrap();
        assert_eq!(
            assembly.accept(3, &[]).unwrap_err(),
            CheckpointError::NoSuchChunk {
                index: 3,
                chunks: 3
            }
        );
        assert_eq!(
            assembly.accept(1, &bytes[..999]).unwrap_err(),
            CheckpointError::ChunkSize {
                index: 1,
                got: 999,
                expected: 1000
            }
        );
        let mut huge = manifest.clone();
        huge.total_bytes = MAX_CHECKPOINT_BYTES + 1;
        assert!(matches!(
            Assembly::new(huge, u64::MAX),
            Err(CheckpointError::BadManifest(_))
        ));
        assert!(matches!(
            Assembly::new(manifest.clone(), 2999),
            Err(CheckpointError::BadManifest(_))
        ));
        let mut wide = manifest.clone();
        wide.chunk_bytes = u32::MAX;
        assert!(matches!(
            Assembly::new(wide, u64::MAX),
            Err(CheckpointError::BadManifest(_))
        ));
        let mut short = manifest;
        short.chunk_hashes.pop();
        let err = Assembly::new(short, u64::MAX).unwrap_err().to_string();
        assert!(
            err.contains("2 chunk hashes") && err.contains("expected 3"),
            "{err}"
        );
    }
}
