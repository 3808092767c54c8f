//! The disk the app keeps, under the owner's cap (`storage.cap_mib`): the models fetched from
//! peers (`models/<id>/` under the data dir) and the receipt ledger. Before a fetch, the models
//! used longest ago make room, never the one being served or fetched, nor the shipped demo
//! model; where that cannot make room the fetch is refused, naming the cap.

use std::path::Path;

use serde::Serialize;

/// The file in a model's directory that says when it was last served (ms since the epoch).
const LAST_USED_FILE: &str = "last-used";

/// A model kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Kept {
    /// Its id (its directory's name).
    pub id: String,
    /// Bytes its files take.
    pub bytes: u64,
    /// When it was last served, ms since the epoch (0: never).
    pub last_used_ms: u64,
}

/// What the app keeps against the cap, for the settings page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Bytes of every kept model and the ledger.
    pub used_bytes: u64,
    /// The cap; none for no cap.
    pub cap_bytes: Option<u64>,
    /// The models kept, used most recently first.
    pub models: Vec<Kept>,
}

/// Bytes of every file under `path` (a missing one takes none).
fn bytes_under(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| bytes_under(&entry.path()))
        .sum()
}

/// The models kept under `data_dir/models`, the shipped demo model aside, used most recently
/// first.
pub fn kept_models(data_dir: &Path) -> Vec<Kept> {
    let mut kept: Vec<Kept> = std::fs::read_dir(data_dir.join("models"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().is_dir() && entry.file_name() != "demo")
        .map(|entry| {
            let dir = entry.path();
            let last_used_ms = std::fs::read_to_string(dir.join(LAST_USED_FILE))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            Kept {
                id: entry.file_name().to_string_lossy().into_owned(),
                bytes: bytes_under(&dir),
                last_used_ms,
            }
        })
        .collect();
    kept.sort_by(|a, b| b.last_used_ms.cmp(&a.last_used_ms).then(a.id.cmp(&b.id)));
    kept
}

/// What the app keeps under `data_dir` against `cap_bytes`.
pub fn usage(data_dir: &Path, cap_bytes: Option<u64>) -> Usage {
    let models = kept_models(data_dir);
    let ledger = bytes_under(&data_dir.join(neuroshard_node::node::LEDGER_FILE));
    let demo = bytes_under(&data_dir.join("models").join("demo"));
    Usage {
        used_bytes: models.iter().map(|m| m.bytes).sum::<u64>() + ledger + demo,
        cap_bytes,
        models,
    }
}

/// The models to remove, used longest ago first, so that `need` more bytes fit under `cap`
/// beside `used`; never one of `keep`. The bytes still missing where removing every other
/// model would not make room.
pub fn evictions(
    models: &[Kept],
    keep: &[&str],
    used: u64,
    need: u64,
    cap: u64,
) -> Result<Vec<String>, u64> {
    let mut over = (used + need).saturating_sub(cap);
    let mut out = Vec::new();
    let mut oldest_first: Vec<&Kept> = models.iter().filter(|m| !keep.contains(&&*m.id)).collect();
    oldest_first.sort_by_key(|m| m.last_used_ms);
    for model in oldest_first {
        if over == 0 {
            break;
        }
        over = over.saturating_sub(model.bytes);
        out.push(model.id.clone());
    }
    if over > 0 { Err(over) } else { Ok(out) }
}

/// Makes room under `data_dir` for `need` more bytes under `cap_bytes` (none: no cap) by
/// removing the models used longest ago, never those in `keep`; the ids removed. Where that
/// cannot make room, nothing is removed and the error says what the cap holds.
pub fn make_room(
    data_dir: &Path,
    keep: &[&str],
    need: u64,
    cap_bytes: Option<u64>,
) -> Result<Vec<String>, String> {
    let Some(cap) = cap_bytes else {
        return Ok(Vec::new());
    };
    let usage = usage(data_dir, Some(cap));
    let mib = |b: u64| b.div_ceil(1 << 20);
    let gone = evictions(&usage.models, keep, usage.used_bytes, need, cap).map_err(|short| {
        format!(
            "{} MiB more are needed than the disk cap of {} MiB leaves, with every model not \
             in use removed; raise the cap or serve fewer layers",
            mib(short),
            mib(cap)
        )
    })?;
    for id in &gone {
        let dir = data_dir.join("models").join(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!("removed model {id} to stay under the disk cap"),
            Err(e) => return Err(format!("removing {} to make room: {e}", dir.display())),
        }
    }
    Ok(gone)
}

/// Marks the model in `dir` as served at `now_ms`, so the cap removes others first.
pub fn mark_used(dir: &Path, now_ms: u64) {
    if let Err(e) = std::fs::write(dir.join(LAST_USED_FILE), now_ms.to_string()) {
        tracing::warn!("{}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(data: &Path, id: &str, bytes: usize, used: Option<u64>) {
        let dir = data.join("models").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), vec![0u8; bytes]).unwrap();
        if let Some(ms) = used {
            mark_used(&dir, ms);
        }
    }

    /// Over the cap, the model used longest ago goes first and the served one never; where no
    /// removal makes room, nothing is removed and the cap is named.
    #[test]
    fn the_cap_removes_the_model_used_longest_ago_and_never_the_served_one() {
        let data = tempfile::tempdir().unwrap();
        let data = data.path();
        model(data, "aaaaaaaaaaaaaaaa", 400_000, Some(1_000));
        model(data, "bbbbbbbbbbbbbbbb", 400_000, Some(5_000));
        model(data, "cccccccccccccccc", 400_000, None);
        model(data, "demo", 100_000, None);
        std::fs::write(data.join(neuroshard_node::node::LEDGER_FILE), [0u8; 50_000]).unwrap();
        let before = usage(data, None);
        let (marks, models) = (3 * 10, 3 * 400_000);
        assert!(
            before.used_bytes >= models + 150_000 && before.used_bytes <= models + 150_000 + marks
        );
        let ids: Vec<_> = before.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(
            ids,
            ["bbbbbbbbbbbbbbbb", "aaaaaaaaaaaaaaaa", "cccccccccccccccc"]
        );

        // "c" was never served, but it is served now: "a", used longest ago, makes room.
        let served = ["cccccccccccccccc", "dddddddddddddddd"];
        let cap = Some(before.used_bytes + 300_000);
        let gone = make_room(data, &served, 600_000, cap).unwrap();
        assert_eq!(gone, ["aaaaaaaaaaaaaaaa"]);
        assert!(!data.join("models/aaaaaaaaaaaaaaaa").exists());
        assert!(data.join("models/cccccccccccccccc").exists());
        assert!(data.join("models/demo").exists());

        // More than removing "b" frees: refused, and "b" stays.
        let err = make_room(data, &served, 5_000_000, cap).unwrap_err();
        assert!(err.contains("than the disk cap of"), "{err}");
        assert!(data.join("models/bbbbbbbbbbbbbbbb").exists());
        assert_eq!(make_room(data, &served, 5_000_000, None), Ok(vec![]));
    }
}
