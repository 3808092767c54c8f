//! Settings files: reading, patching, migrating, and refusing what is wrong without losing
//! what is stored.

use super::*;
use serde_json::json;

fn store() -> (tempfile::TempDir, SettingsStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SettingsStore::open(dir.path().join(SETTINGS_FILE)).unwrap();
    (dir, store)
}

#[test]
fn defaults_are_valid_and_start_unonboarded() {
    let s = Settings::default();
    assert_eq!(s.validate().map_err(|e| e.to_string()), Ok(()));
    assert!(!s.profile.onboarded);
    for preset in [Preset::Light, Preset::Medium, Preset::Full] {
        assert!(
            s.clone().with_preset(preset).validate().is_ok(),
            "{preset:?}"
        );
    }
}

#[test]
fn a_model_choice_replaces_the_one_before_whole() {
    let (_dir, mut store) = store();
    let swarm = json!({"model": {"source": "swarm", "id": "0123456789abcdef"}});
    let chosen = store.update(&swarm).unwrap().model.clone();
    assert_eq!(
        chosen,
        ModelChoice::Swarm {
            id: "0123456789abcdef".into()
        }
    );
    let back = store.update(&json!({"model": {"source": "demo"}})).unwrap();
    assert_eq!(back.model, ModelChoice::Demo);
    let api = store.update(&json!({"api": {"enabled": true}})).unwrap();
    assert_eq!((api.api.enabled, api.api.port), (true, 8000));
}

#[test]
fn bad_values_name_their_field_and_change_nothing() {
    let (_dir, mut store) = store();
    store
        .update(&json!({"compute": {"gpu_share_percent": 30}}))
        .unwrap();
    let on_disk = std::fs::read_to_string(store.path()).unwrap();
    let cases = [
        (
            json!({"compute": {"gpu_share_percent": 0}}),
            "compute.gpu_share_percent",
        ),
        (
            json!({"compute": {"gpu_share_percent": 300}}),
            "compute.gpu_share_percent",
        ),
        (
            json!({"bandwidth": {"upload_kbps": -5}}),
            "bandwidth.upload_kbps",
        ),
        (
            json!({"bandwidth": {"upload_kbps": "fast"}}),
            "bandwidth.upload_kbps",
        ),
        (
            json!({"bandwidth": {"transfer_cap": {"gigabytes": 10, "every_days": 0}}}),
            "bandwidth.transfer_cap.every_days",
        ),
        (
            json!({"layers": {"mode": "range", "start": 4, "end": 2}}),
            "layers.end",
        ),
        (
            json!({"layers": {"mode": "count", "count": 0}}),
            "layers.count",
        ),
        (
            json!({"profile": {"display_name": "  "}}),
            "profile.display_name",
        ),
        (
            json!({"schedule": {"weekly": [{"day": "mon", "start_minute": 600, "end_minute": 60}]}}),
            "schedule.weekly[0].end_minute",
        ),
        (
            json!({"network": {"tracker": "not a url"}}),
            "network.tracker",
        ),
        (
            json!({"network": {"bootstrap": ["nohost"]}}),
            "network.bootstrap[0]",
        ),
        (
            json!({"model": {"source": "swarm", "id": "../../etc"}}),
            "model.id",
        ),
        (
            json!({"model": {"source": "local", "dir": "models/qwen"}}),
            "model.dir",
        ),
        (json!({"model": {"source": "cloud"}}), "model.source"),
        (json!({"api": {"port": 0}}), "api.port"),
        (
            json!({"thermal": {"cpu_limit_c": 30}}),
            "thermal.cpu_limit_c",
        ),
        (
            json!({"thermal": {"gpu_limit_c": 120}}),
            "thermal.gpu_limit_c",
        ),
        (
            json!({"thermal": {"gpu_limit_c": "hot"}}),
            "thermal.gpu_limit_c",
        ),
        (
            json!({"thermal": {"min_hold_secs": 7200}}),
            "thermal.min_hold_secs",
        ),
        (
            json!({"gaming": {"programs": ["steam", " "]}}),
            "gaming.programs[1]",
        ),
        (
            json!({"gaming": {"programs": ["/usr/bin/steam"]}}),
            "gaming.programs[0]",
        ),
        (
            json!({"gaming": {"programs": vec!["x"; 101]}}),
            "gaming.programs",
        ),
        (json!({"compute": {"turbo": true}}), "compute.turbo"),
        (json!([1, 2]), "settings"),
    ];
    for (patch, field) in cases {
        let err = store.update(&patch).unwrap_err();
        assert_eq!(err.field(), Some(field), "{patch}: {err}");
        assert_eq!(store.get().compute.gpu_share_percent, 30, "{patch}");
        assert_eq!(std::fs::read_to_string(store.path()).unwrap(), on_disk);
    }
}

#[test]
fn patches_merge_persist_and_reopen() {
    let (dir, mut store) = store();
    store
        .update(&json!({
            "profile": {"display_name": "Ada", "onboarded": true},
            "bandwidth": {"upload_kbps": 512, "transfer_cap": {"gigabytes": 100, "every_days": 30}},
            "layers": {"mode": "range", "start": 2, "end": 4},
        }))
        .unwrap();
    // `null` clears an option; untouched fields keep their values.
    store
        .update(&json!({"bandwidth": {"transfer_cap": null}}))
        .unwrap();
    let reopened = SettingsStore::open(dir.path().join(SETTINGS_FILE)).unwrap();
    let s = reopened.get();
    assert_eq!(s, store.get());
    assert_eq!(s.bandwidth.upload_kbps, 512);
    assert_eq!(s.bandwidth.transfer_cap, None);
    assert_eq!(s.profile.display_name.as_deref(), Some("Ada"));
    assert_eq!(s.layers.range(), LayerRange::new(2, 4).ok());
    // Another shape of layer choice replaces the range whole.
    let s = store
        .update(&json!({"layers": {"mode": "count", "count": 3}}))
        .unwrap();
    assert_eq!(s.layers, LayerChoice::Count { count: 3 });
}

#[test]
fn older_files_migrate_and_newer_or_corrupt_ones_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SETTINGS_FILE);
    // Unversioned, partial: what someone writes by hand for a headless node.
    std::fs::write(&path, r#"{"bandwidth": {"download_kbps": 2000}}"#).unwrap();
    let store = SettingsStore::open(&path).unwrap();
    assert_eq!(store.get().bandwidth.download_kbps, 2000);
    assert_eq!(store.get().compute, ComputeSettings::default());
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        written["version"],
        json!(SETTINGS_VERSION),
        "written back migrated"
    );

    // Version 1, before the temperature limits and the programs list: theirs are the defaults,
    // and what the file set stays.
    std::fs::write(
        &path,
        r#"{"version": 1, "schedule": {"pause_on_battery": false}}"#,
    )
    .unwrap();
    let store = SettingsStore::open(&path).unwrap();
    assert!(!store.get().schedule.pause_on_battery);
    assert_eq!(store.get().thermal, ThermalSettings::default());
    assert_eq!(store.get().gaming, GamingSettings::default());
    assert_eq!(store.get().notifications, NotificationSettings::default());
    assert_eq!(store.get().storage.cap_mib, None);
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(written["version"], json!(2));
    assert_eq!(written["thermal"]["min_hold_secs"], json!(120));

    for text in [
        r#"{"version": 99}"#,
        "{not json",
        r#"{"compute": {"gpu_share_percent": 0}}"#,
    ] {
        std::fs::write(&path, text).unwrap();
        let err = SettingsStore::open(&path).unwrap_err();
        assert!(
            matches!(err, SettingsError::Unreadable { .. }),
            "{text}: {err}"
        );
        assert!(err.to_string().contains(SETTINGS_FILE), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text,
            "left as it was"
        );
    }
}
