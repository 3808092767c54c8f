//! The node's identity on disk: one ed25519 key per install, in the data directory, readable
//! by its owner only. The node id is the key's hash, so a copied data directory makes a clone,
//! which the tracker reports; `neuroshard identity --regenerate` gives the copy a key of its own.
//!
//! The directory is kept owner-only (0700) and the key file 0600, through rotation too: a
//! looser directory or key file found at start is tightened, and a key is written to a fresh
//! owner-only file, synced, renamed into place, and the directory synced, so a crash leaves
//! either the old key or the new one.

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
    prepare_data_dir(dir)?;
    let path = key_path(dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = parse(&path, &text)?;
            owner_only(&path, 0o600)?;
            Ok(key)
        }
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
    prepare_data_dir(dir)?;
    let path = key_path(dir);
    if path.exists() {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let old = dir.join(format!("{KEY_FILE}.replaced-{ms}"));
        std::fs::rename(&path, &old)
            .map_err(|e| NodeError::io(format!("moving {} aside", path.display()), e))?;
        owner_only(&old, 0o600)?;
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

/// Creates the data directory owner-only (0700), or tightens an existing one to that.
pub fn prepare_data_dir(dir: &Path) -> Result<(), NodeError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| NodeError::io(format!("creating {}", dir.display()), e))?;
    owner_only(dir, 0o700)
}

/// Narrows `path` to `mode` if its group or others may read, write or enter it.
fn owner_only(path: &Path, mode: u32) -> Result<(), NodeError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |e| NodeError::io(what, e)
        };
        let now = std::fs::metadata(path).map_err(io("reading the mode of"))?;
        if now.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "{} was readable by others (mode {:o}): narrowed to {mode:o}",
                path.display(),
                now.permissions().mode() & 0o777
            );
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io("narrowing the mode of"))?;
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Writes the key to a fresh temporary file created owner-only (a stale one, whatever its
/// mode, is removed first), syncs it, renames it in place, and syncs the directory so the
/// rename survives a crash.
fn write(dir: &Path, key: &NodeKey) -> Result<(), NodeError> {
    prepare_data_dir(dir)?;
    let path = key_path(dir);
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let io = |what: &str| {
        let what = format!("{what} {}", tmp.display());
        move |e| NodeError::io(what, e)
    };
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("removing")(e)),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io("creating"))?;
    writeln!(file, "{}", hex::encode(key.to_bytes())).map_err(io("writing"))?;
    file.sync_all().map_err(io("syncing"))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming"))?;
    sync_dir(dir)
}

/// Makes the directory's entries (a rename into it) durable.
fn sync_dir(dir: &Path) -> Result<(), NodeError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| NodeError::io(format!("syncing {}", dir.display()), e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
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

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The directory and every key file in it stay owner-only: made so, narrowed when found
    /// looser, through a stale world-readable temporary file and through rotation.
    #[cfg(unix)]
    #[test]
    fn the_directory_and_the_keys_stay_owner_only_through_rotation() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let key = load_or_create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&key_path(&dir)), 0o600);

        // Loosened by hand (a copy, a restore from backup): narrowed at the next start.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(key_path(&dir), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create(&dir).unwrap().id(), key.id());
        assert_eq!((mode(&dir), mode(&key_path(&dir))), (0o700, 0o600));

        // A stale temporary file anyone may read does not become the new key's file.
        let tmp = dir.join(format!("{KEY_FILE}.tmp"));
        std::fs::write(&tmp, "stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(key_path(&dir), std::fs::Permissions::from_mode(0o644)).unwrap();
        let fresh = regenerate(&dir).unwrap();
        assert_ne!(fresh.id(), key.id());
        assert_eq!(mode(&key_path(&dir)), 0o600);
        assert!(!tmp.exists());
        let replaced: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".replaced-"))
            .collect();
        assert_eq!(replaced.len(), 1);
        assert_eq!(mode(&replaced[0]), 0o600, "the old key stays owner-only");
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
