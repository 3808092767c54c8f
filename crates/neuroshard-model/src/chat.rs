//! A model's chat template, rendered as transformers' `apply_chat_template` renders it.
//!
//! The template comes from `chat_template.jinja` (transformers 5) or the `chat_template` field of
//! `tokenizer_config.json` (older files). It runs in minijinja with Python's string and dict
//! methods (minijinja-contrib's pycompat), `trim_blocks` and `lstrip_blocks`, and the helpers
//! transformers defines: `raise_exception`, `strftime_now` and a `tojson` that writes JSON as
//! Python's `json.dumps` does (no HTML escaping, `", "` and `": "` separators).

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or `tool`).
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A compiled chat template and the special-token strings it is given.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ...: the named special tokens of `tokenizer_config.json`.
    special: BTreeMap<String, String>,
}

/// Names of the special tokens transformers passes to a template, when set.
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

fn template_error(what: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("chat template: {what}"))
}

impl ChatTemplate {
    /// The template of the model in `dir`, or `None` when it has none.
    pub fn for_model_dir(dir: &Path) -> Result<Option<Self>, ModelError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", config_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(ModelError::io(&config_path, e)),
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                template_in_config(&config, &config_path)?
            }
            Err(e) => return Err(ModelError::io(&jinja_path, e)),
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let special = SPECIAL_TOKENS
            .iter()
            .filter_map(|&name| Some((name.to_string(), token_text(config.get(name)?)?)))
            .collect();
        Self::new(&source, special).map(Some)
    }

    /// Compiles `source`; a syntax error is named here, not at the first chat.
    pub fn new(source: &str, special: BTreeMap<String, String>) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(template_error)?;
        Ok(Self { env, special })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`. `extra` adds variables (such as Llama 3's `date_string`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &BTreeMap<String, serde_json::Value>,
    ) -> Result<String, ModelError> {
        let template = self.env.get_template("chat").map_err(template_error)?;
        let mut context: BTreeMap<String, Value> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        context.insert("messages".into(), Value::from_serialize(messages));
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        // transformers always passes these, as None when not given.
        context.insert("tools".into(), Value::from(()));
        context.insert("documents".into(), Value::from(()));
        for (k, v) in extra {
            context.insert(k.clone(), Value::from_serialize(v));
        }
        template.render(context).map_err(template_error)
    }
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of named templates (the one
/// named "default" is used).
fn template_in_config(
    config: &serde_json::Value,
    path: &Path,
) -> Result<Option<String>, ModelError> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => Ok(list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string))),
        Some(_) => Err(ModelError::Tokenizer(format!(
            "{}: chat_template is neither text nor a list of templates",
            path.display()
        ))),
    }
}

/// A special token as `tokenizer_config.json` writes it: text, or `{"content": text, ...}`.
fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn python_json(value: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(key.clone()).to_string());
                out.push_str(": ");
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_template_is_named_at_load() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("chat template"), "{err}");
        let raising = ChatTemplate::new(
            "{{ raise_exception('Conversation roles must alternate') }}",
            BTreeMap::new(),
        )
        .unwrap();
        let err = raising.render(&[], true, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn tojson_writes_as_python_does() {
        let template = ChatTemplate::new(
            "{{ tools | tojson }}|{{ tools | tojson(indent=2) }}",
            BTreeMap::new(),
        )
        .unwrap();
        let extra = BTreeMap::from([(
            "tools".to_string(),
            serde_json::json!([{"args": {"x": 1, "é": [true, null]}, "name": "<f>"}]),
        )]);
        let text = template.render(&[], false, &extra).unwrap();
        assert_eq!(
            text,
            "[{\"args\": {\"x\": 1, \"é\": [true, null]}, \"name\": \"<f>\"}]|[\n  {\n    \"args\": {\n      \"x\": 1,\n      \"é\": [\n        true,\n        null\n      ]\n    },\n    \"name\": \"<f>\"\n  }\n]"
        );
    }
}
