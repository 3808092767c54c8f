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

    /// Token ids of a prompt as transformers' tokenizer gives them (`tokenizer(text)`): with
    /// the special tokens the tokenizer's own post-processor adds, such as Llama's BOS. (A
    /// `tokenizer.json` decides this alone: transformers 5 ignores `add_bos_token` in
    /// `tokenizer_config.json` when there is one.) The byte-level tokenizer adds `bos`.
    pub fn encode_prompt(&self, text: &str, bos: Option<u32>) -> Result<Vec<u32>, ModelError> {
        match self {
            Self::HuggingFace(t) => t
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
            Self::Bytes => Ok(bos.into_iter().chain(text.bytes().map(u32::from)).collect()),
        }
    }

    /// Token ids of text that already holds its special tokens (a rendered chat template):
    /// nothing is added, as transformers' `apply_chat_template` encodes it.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode(text)
    }

    /// Text of `ids`, keeping special tokens when `skip_special` is false.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        match self {
            Self::HuggingFace(t) => t
                .decode(ids, skip_special)
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
            Self::Bytes => self.decode(ids),
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

impl TextTokenizer {
    /// The bytes one token stands for on its own, as OpenAI's logprobs report them: a
    /// byte-level vocabulary's token mapped back to its bytes (which may end inside a
    /// character), a byte-fallback token (`<0x0A>`) its byte, a SentencePiece token with `▁` as
    /// a space. A special token is its name; an id outside the vocabulary has no bytes.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let t = match self {
            Self::HuggingFace(t) => t,
            Self::Bytes => return u8::try_from(id).map(|b| vec![b]).unwrap_or_default(),
        };
        let Some(token) = t.id_to_token(id) else {
            return Vec::new();
        };
        if byte_level(t.get_decoder())
            && let Some(bytes) = token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>()
        {
            return bytes;
        }
        let fallback = token
            .strip_prefix("<0x")
            .and_then(|t| t.strip_suffix('>'))
            .filter(|hex| hex.len() == 2)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match fallback {
            Some(byte) => vec![byte],
            None => token.replace('\u{2581}', " ").into_bytes(),
        }
    }
}

/// Whether a tokenizer decodes byte-level tokens (GPT-2's byte-to-character table), alone or
/// in a sequence of decoders.
fn byte_level(decoder: Option<&tokenizers::DecoderWrapper>) -> bool {
    use tokenizers::DecoderWrapper;
    match decoder {
        Some(DecoderWrapper::ByteLevel(_)) => true,
        Some(DecoderWrapper::Sequence(s)) => s.get_decoders().iter().any(|d| byte_level(Some(d))),
        _ => false,
    }
}

/// The byte GPT-2's byte-level table shows as `c`: printable Latin-1 bytes as themselves, the
/// other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) in order as U+0100 onwards. (The
/// tokenizers crate keeps its table private.)
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let code = u32::from(c);
    match u8::try_from(code) {
        Ok(b) if printable(b) => Some(b),
        Ok(_) => None,
        Err(_) => {
            let n = usize::try_from(code.checked_sub(256)?).ok()?;
            (0..=255u8).filter(|&b| !printable(b)).nth(n)
        }
    }
}

/// Turns generated tokens into text as they arrive, never splitting a character: a token that
/// ends inside a multi-byte UTF-8 character (byte-level vocabularies have them) is held until
/// the character is whole. Decodes a short window of recent tokens (as text-generation servers
/// do), so a step costs the same however long the text is.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    /// Where the window decoded for context starts.
    prefix: usize,
    /// Tokens whose text has been given out.
    read: usize,
}

impl<'a> TextStream<'a> {
    /// A stream of the text of tokens generated after a prompt.
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds `id`; returns the text it completes (empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') || !now.starts_with(&before) {
            return Ok(String::new());
        }
        let text = now[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(text)
    }

    /// Text still held back at the end (an incomplete character, shown as U+FFFD).
    pub fn finish(&mut self) -> Result<String, ModelError> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        // Later tokens may have changed how the earlier ones read (a decoder's cleanup): then
        // the text past what was given out is still given, never dropped.
        Ok(match now.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_string(),
            None if now.is_char_boundary(before.len().min(now.len())) => {
                now[before.len().min(now.len())..].to_string()
            }
            None => now,
        })
    }
}

/// Finds stop strings in streamed text: text that may be the start of a stop string is held
/// back until it is known not to be one, so a stop string is never shown.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds streamed `text`; returns the text safe to show, and whether a stop string ended
    /// the generation (the text before it is shown, the stop string and what follows are not).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min();
        if let Some(at) = first {
            let shown = self.pending[..at].to_string();
            self.pending.clear();
            return (shown, true);
        }
        let held = self
            .stops
            .iter()
            .map(|stop| longest_prefix_suffix(&self.pending, stop))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - held;
        let shown = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (shown, false)
    }

    /// The text held back when generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest end of `text` that begins `stop` (at a character boundary).
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
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

    #[test]
    fn a_token_stands_for_its_own_bytes() {
        let fixture = |name: &str| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/reference/tokenizers")
                .join(name);
            TextTokenizer::for_model_dir(&dir).unwrap()
        };
        // Byte-level (Llama 3): every byte of a text comes back, a character split over two
        // tokens included, and a leading space is the token's own.
        let llama3 = fixture("llama3");
        for text in [" the café ☃ swarm", "naïve\n\tend"] {
            let ids = llama3.encode(text).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| llama3.token_bytes(id)).collect();
            assert_eq!(bytes, text.as_bytes(), "{ids:?}");
        }
        let ids = llama3.encode(" be").unwrap();
        assert_eq!(llama3.token_bytes(ids[0]), b" be");
        // SentencePiece with byte fallback (Llama 2): a newline is its byte token, `▁` a space.
        let llama2 = fixture("llama2");
        let ids = llama2.encode("a\nb").unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| llama2.token_bytes(id)).collect();
        assert_eq!(
            String::from_utf8(bytes).unwrap().trim_start(),
            "a\nb",
            "{ids:?}"
        );
        assert_eq!(llama2.token_bytes(2), b"</s>");
        assert!(llama2.token_bytes(1 << 30).is_empty());
        assert_eq!(TextTokenizer::Bytes.token_bytes(0xC3), vec![0xC3]);
        assert!(TextTokenizer::Bytes.token_bytes(BYTE_EOS).is_empty());
    }

    #[test]
    fn streamed_text_never_splits_a_character() {
        let t = TextTokenizer::Bytes;
        let text = "a é 😀 b";
        let mut stream = TextStream::new(&t);
        let mut out = String::new();
        for id in t.encode(text).unwrap() {
            let piece = stream.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&stream.finish().unwrap());
        assert_eq!(out, text);
        let mut cut = TextStream::new(&t);
        assert_eq!(cut.push(0xF0).unwrap(), "");
        assert_eq!(cut.finish().unwrap(), "\u{FFFD}");
    }

    #[test]
    fn a_stop_string_ends_the_text_without_being_shown() {
        let mut stops = StopStrings::new(&["END".to_string(), "\n\n".to_string()]);
        let mut shown = String::new();
        let mut stopped = false;
        for piece in ["Hello E", "N", "ough. ", "The E", "ND is near"] {
            let (text, stop) = stops.push(piece);
            shown.push_str(&text);
            if stop {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(shown, "Hello ENough. The ");
        let mut none = StopStrings::new(&["STOP".to_string()]);
        let (text, stop) = none.push("all ST");
        assert_eq!((text.as_str(), stop), ("all ", false));
        assert_eq!(none.finish(), "ST");
    }
}
