//! A failed command as the page receives it, from every error the core meets.

use neuroshard_api::ApiError;
use neuroshard_net::NodeError;
use neuroshard_proof::ledger::LedgerError;
use neuroshard_settings::SettingsError;
use serde::Serialize;

/// A failed command, as the front end receives it: a stable code, a sentence, and for a bad
/// setting the dotted path of the field, so the form can show the message beside it.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    /// `invalid_setting`, `settings_unreadable`, `io`, `node`, `bad_request`.
    pub code: &'static str,
    /// What is wrong, for people.
    pub message: String,
    /// The setting at fault, such as `bandwidth.upload_kbps`.
    pub field: Option<String>,
}

impl CommandError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A request the app cannot act on (an unknown snooze, a page too large).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new("bad_request", message)
    }
}

impl From<SettingsError> for CommandError {
    fn from(e: SettingsError) -> Self {
        match &e {
            SettingsError::Invalid { field, message } => Self {
                code: "invalid_setting",
                message: message.clone(),
                field: Some(field.clone()),
            },
            SettingsError::Unreadable { .. } => Self::new("settings_unreadable", e.to_string()),
            SettingsError::Io { .. } => Self::new("io", e.to_string()),
        }
    }
}

impl From<NodeError> for CommandError {
    fn from(e: NodeError) -> Self {
        Self::new("node", e.to_string())
    }
}

impl From<LedgerError> for CommandError {
    fn from(e: LedgerError) -> Self {
        Self::new("ledger", e.to_string())
    }
}

impl From<ApiError> for CommandError {
    fn from(e: ApiError) -> Self {
        CommandError {
            code: e.code.unwrap_or("chat"),
            message: e.message,
            field: e.param,
        }
    }
}

/// A model that could not be read, fetched or served.
pub(crate) fn model_error(message: impl Into<String>) -> CommandError {
    CommandError::new("model", message)
}
