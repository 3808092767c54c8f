//! Text to token ids and back: `tokenizer.json` through the tokenizers crate, or bytes.

use std::path::Path;

use crate::ModelError;

/// Id of the beginning-of-sequence token of the byte-level tokenizer.
pub const BYTE_BOS: u32 = 256;
/// Id of the end-of-sequence token of the byte-level tokenizer.
pub const BYTE_EOS: u32 = 257;
/// Vocabulary of the byte-level tokenizer: 256 bytes, BOS and EOS.
pub const BYTE_VOCAB: usize = 258;

/// The tokenizer of a model directory.
#[derive(Debug, Clone)]
pub enum TextTokenizer {
    /// A Hugging Face `tokenizer.json`.
    HuggingFace(Box<tokenizers::Tokenizer>),
    /// One token per byte (the built-in model has no `tokenizer.json`).
    Bytes,
}

impl TextTokenizer {
    /// `tokenizer.json` in `dir` when present, otherwise the byte-level tokenizer.
    pub fn for_model_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(Self::Bytes);
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::HuggingFace(Box::new(tokenizer)))
    }

    /// Token ids of `text` (without special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        match self {
            Self::HuggingFace(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
            Self::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// Text of `ids`; bytes that are not valid UTF-8 show as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        match self {
            Self::HuggingFace(t) => t
                .decode(ids, true)
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
            Self::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_skip_special_tokens() {
        let t = TextTokenizer::Bytes;
        let ids = t.encode("héllo").unwrap();
        assert_eq!(ids.len(), 6);
        let mut with_special = vec![BYTE_BOS];
        with_special.extend(&ids);
        with_special.push(BYTE_EOS);
        assert_eq!(t.decode(&with_special).unwrap(), "héllo");
    }

    #[test]
    fn reads_a_hugging_face_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel",
            "vocab":{"[UNK]":0,"hello":1,"swarm":2},"unk_token":"[UNK]"}}"#;
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
        let t = TextTokenizer::for_model_dir(dir.path()).unwrap();
        assert!(matches!(t, TextTokenizer::HuggingFace(_)));
        assert_eq!(t.encode("hello swarm nope").unwrap(), vec![1, 2, 0]);
        assert_eq!(t.decode(&[1, 2]).unwrap(), "hello swarm");
        std::fs::write(dir.path().join("tokenizer.json"), "{broken").unwrap();
        let err = TextTokenizer::for_model_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
