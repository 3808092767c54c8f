//! The CPU threads a node's compute may use. burn's CPU backend multiplies matrices with gemm
//! on the current rayon pool, so each node runs its compute inside a pool of its own, sized by
//! its owner's setting and rebuilt when the setting changes.

use neuroshard_base::sync::RwLockExt;
use std::sync::{Arc, RwLock};

use neuroshard_net::NodeError;

/// Threads for a setting: the number itself, or for 0 every core but one (at least one), so
/// the machine stays usable while it serves.
pub fn resolve(setting: u16) -> usize {
    if setting > 0 {
        return usize::from(setting);
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

fn build(setting: u16) -> Result<Arc<rayon::ThreadPool>, NodeError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(resolve(setting))
        .thread_name(|i| format!("compute-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| NodeError::Config(format!("cpu_threads: starting the compute threads: {e}")))
}

/// The node's compute pool.
#[derive(Debug)]
pub struct ComputeThreads {
    pool: RwLock<(u16, Arc<rayon::ThreadPool>)>,
}

impl ComputeThreads {
    /// A pool for `setting` (0: all cores but one).
    pub fn new(setting: u16) -> Result<Self, NodeError> {
        Ok(Self {
            pool: RwLock::new((setting, build(setting)?)),
        })
    }

    /// Changes the setting; calls that start from now on use the new pool, calls computing now
    /// finish on the old one.
    pub fn set(&self, setting: u16) -> Result<(), NodeError> {
        if self.setting() == setting {
            return Ok(());
        }
        let pool = build(setting)?;
        *self.pool.write_or_recover() = (setting, pool);
        Ok(())
    }

    /// The setting in force.
    pub fn setting(&self) -> u16 {
        self.pool.read_or_recover().0
    }

    /// Runs `f` on the pool, so the compute inside uses its threads; blocks until done.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let pool = self.pool.read_or_recover().1.clone();
        pool.install(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neuroshard_model::init::{ModelSpec, write_model};
    use neuroshard_model::{KvCache, Shard, ShardInput, ShardOutput};

    #[test]
    fn compute_runs_on_as_many_threads_as_set_and_the_setting_changes_live() {
        let threads = ComputeThreads::new(2).unwrap();
        assert_eq!(threads.install(rayon::current_num_threads), 2);
        threads.set(1).unwrap();
        assert_eq!(threads.install(rayon::current_num_threads), 1);
        threads.set(0).unwrap();
        assert_eq!(threads.install(rayon::current_num_threads), resolve(0));
        assert!(resolve(0) >= 1);
    }

    #[test]
    fn outputs_do_not_depend_on_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &ModelSpec::demo()).unwrap();
        let shard = Shard::load(dir.path(), 0..2, &neuroshard_model::default_device()).unwrap();
        let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 200).collect();
        let run = |n: u16| {
            ComputeThreads::new(n).unwrap().install(|| {
                match shard
                    .forward(
                        &mut KvCache::new(),
                        0,
                        0..2,
                        ShardInput::Tokens(ids.clone()),
                    )
                    .unwrap()
                {
                    ShardOutput::Hidden(h) | ShardOutput::Logits(h) => h,
                }
            })
        };
        assert_eq!(
            run(1),
            run(2),
            "replicas with other settings must agree bit for bit"
        );
    }
}
