//! The node's identity on disk: one ed25519 key per install, in the data directory, readable
//! by its owner only. The node id is the key's hash, so a copied data directory makes a clone,
//! which the tracker reports; `neuroshard identity --regenerate` gives the copy a key of its own.

use std::io::Write;
use std::path::{Path, PathBuf};

use neuroshard_base::NodeKey;

use neuroshard_net::NodeError;

/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Where a node keeps its key and ledger unless told otherwise: `$NEUROSHARD_HOME`, else
/// `$XDG_DATA_HOME/neuroshard`, else `~/.local/share/neuroshard`, else `./neuroshard-data`.
pub fn default_data_dir() -> PathBuf {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("NEUROSHARD_HOME")
        .or_else(|| env("XDG_DATA_HOME").map(|d| d.join("neuroshard")))
        .or_else(|| env("HOME").map(|h| h.join(".local/share/neuroshard")))
        .unwrap_or_else(|| PathBuf::from("neuroshard-data"))
}

/// Path of the key in `dir`.
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join(KEY_FILE)
}

/// Reads the key in `dir`, making one on first start. A file that is not a key is an error
/// naming it, and is left as it is.
pub fn load_or_create(dir: &Path) -> Result<NodeKey, NodeError> {
    let path = key_path(dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeKey::generate();
            write(dir, &key)?;
            tracing::info!(id = %key.id(), path = %path.display(), "made a new node identity");
            Ok(key)
        }
        Err(e) => Err(NodeError::io(format!("reading {}", path.display()), e)),
    }
}

/// Replaces the key in `dir` with a new one; the old file is kept as `node.key.replaced-<ms>`.
pub fn regenerate(dir: &Path) -> Result<NodeKey, NodeError> {
    let path = key_path(dir);
    if path.exists() {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let old = dir.join(format!("{KEY_FILE}.replaced-{ms}"));
        std::fs::rename(&path, &old)
            .map_err(|e| NodeError::io(format!("moving {} aside", path.display()), e))?;
    }
    let key = NodeKey::generate();
    write(dir, &key)?;
    Ok(key)
}

fn parse(path: &Path, text: &str) -> Result<NodeKey, NodeError> {
    let mut secret = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut secret).map_err(|e| {
        NodeError::Config(format!(
            "{} is not a node key (64 hex digits): {e}; move it away to make a new identity",
            path.display()
        ))
    })?;
    Ok(NodeKey::from_bytes(&secret))
}

/// Writes the key to a temporary file created owner-only, syncs it, then renames it in place.
fn write(dir: &Path, key: &NodeKey) -> Result<(), NodeError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::io(format!("creating {}", dir.display()), e))?;
    let path = key_path(dir);
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let io = |what: &str| {
        let what = format!("{what} {}", tmp.display());
        move |e| NodeError::io(what, e)
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io("creating"))?;
    writeln!(file, "{}", hex::encode(key.to_bytes())).map_err(io("writing"))?;
    file.sync_all().map_err(io("syncing"))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_owner_only_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(load_or_create(dir.path()).unwrap().id(), key.id());
        let fresh = regenerate(dir.path()).unwrap();
        assert_ne!(fresh.id(), key.id());
        assert_eq!(load_or_create(dir.path()).unwrap().id(), fresh.id());
    }

    #[test]
    fn a_corrupt_key_file_is_named_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(key_path(dir.path()), "not a key").unwrap();
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("node.key") && err.contains("not a node key"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(key_path(dir.path())).unwrap(),
            "not a key"
        );
    }
}
