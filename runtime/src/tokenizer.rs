//! Text tokenization: a thin wrapper over Hugging Face `tokenizers` that reads the model directory's
//! `tokenizer.json`, plus [`StreamDecoder`] for streaming detokenization.
//!
//! Parity target: `transformers`' `PreTrainedTokenizerFast(tokenizer_file=...)` with
//! `add_special_tokens=False` for encoding and `clean_up_tokenization_spaces=False` for decoding.
//! `tests/python/test_text.py` checks encoding against both transformers and tiktoken on the real
//! Llama-3 vocabulary.

use std::path::Path;

use tokenizers::{
    DecodeStream, DecodeStreamError, DecoderWrapper, ModelWrapper, NormalizerWrapper,
    PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
};

use crate::error::{Error, Result};
use crate::read_limit::read_capped;

/// Largest `tokenizer.json` parsed: 64 MiB (Llama-3's is 9 MiB, the largest common ones about 33 MiB).
/// Parsing holds several times the file in memory, so the size is checked before a byte is read.
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// A text tokenizer loaded from a `tokenizer.json`.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Cached: `tokenizers` computes it by building the whole vocabulary map on every call.
    vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json` (the Hugging Face `tokenizers` serialization).
    pub fn from_file(path: &Path) -> Result<Self> {
        // Read the file ourselves so a missing file is an `Error::Io` naming the path, not an opaque
        // message from `tokenizers`, and a huge one is refused before parsing.
        let bytes = read_capped(path, MAX_TOKENIZER_BYTES, "tokenizer file")?;
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        drop(bytes);
        // Parsing frees far more than the tokenizer keeps (see `heap`).
        crate::heap::release_free_heap();
        Ok(Self::from_tokenizer(inner))
    }

    /// Wraps an already-built `tokenizers::Tokenizer` (tests build small ones in code).
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        Self { inner, vocab_size }
    }

    /// Encodes `text` to token ids.
    ///
    /// No special tokens are *added* (no BOS): the chat template writes BOS itself. Special tokens that
    /// are *spelled* in the text (`<|eot_id|>`, `<image>`, ...) are parsed as those special tokens, as
    /// transformers does with its defaults (`split_special_tokens=False`). So text from an untrusted
    /// user can inject control tokens; callers that care must filter it before rendering.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // `encode_fast` skips offset tracking, which nothing here needs; the ids are identical.
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes many texts at once (in parallel where `tokenizers` can); same ids as [`Self::encode`].
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.to_vec();
        let encodings = self
            .inner
            .encode_batch_fast(inputs, false)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Decodes ids to text. Byte sequences that are not valid UTF-8 become U+FFFD (as transformers).
    ///
    /// Ids outside the vocabulary are skipped, as `tokenizers` (and so transformers) does. No
    /// "clean up tokenization spaces" pass is applied: decoding stays lossless and streamable.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// A copy that reads special tokens spelled in text as plain text, as transformers does with
    /// `split_special_tokens=True` (`serve --plain-special-tokens`, see `user_text`).
    pub fn with_special_tokens_as_text(&self) -> TextTokenizer {
        let mut inner = self.inner.clone();
        inner.set_encode_special_tokens(true);
        Self::from_tokenizer(inner)
    }

    /// The special added tokens (`<|eot_id|>`, `<image>`, ...) as (text, id).
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, token)| (token.content, id))
            .collect()
    }

    /// The id of a token (vocabulary entry or added token), e.g. `"<|eot_id|>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (byte-level tokens are in their mapped form, e.g. `"Ġthe"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of distinct tokens, added tokens included (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// `tokenizers`' streaming decoder over the runtime's tokenizer type.
type TokenizerStream<'a> = DecodeStream<
    'a,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Incremental detokenization for streaming output: `tokenizers`' [`DecodeStream`], plus the two
/// things it lacks.
///
/// Each [`push`](Self::push) returns the text that became final with that token; the concatenation of
/// every `push` result and [`finish`](Self::finish) equals `decode(all ids)` exactly. `DecodeStream`
/// holds back a character split across byte-level tokens until it is complete (no U+FFFD from the
/// split itself), but it has no end of stream: what it still holds when generation stops (an
/// incomplete character, which `decode` turns into U+FFFD) comes out of `finish` here. And where a
/// decoder rewrites text it already emitted, `DecodeStream` errors; here the text waits for `finish`.
pub struct StreamDecoder<'a> {
    tok: &'a TextTokenizer,
    skip_special_tokens: bool,
    stream: TokenizerStream<'a>,
    /// The ids of the last chunk emitted: the context `finish` decodes the held-back ids after.
    emitted: Vec<u32>,
    /// Ids pushed since the last chunk, not yet emitted.
    held: Vec<u32>,
}

impl std::fmt::Debug for StreamDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("emitted", &self.emitted)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a TextTokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tok,
            skip_special_tokens,
            stream: tok.inner.decode_stream(skip_special_tokens),
            emitted: Vec::new(),
            held: Vec::new(),
        }
    }

    /// Adds one token; returns the text that became final with it (`""` while a character is
    /// incomplete, or when the token decodes to nothing, e.g. a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.held.push(id);
        match self.stream.step(id) {
            Ok(Some(text)) => {
                self.emitted = std::mem::take(&mut self.held);
                Ok(text)
            }
            Ok(None) => Ok(String::new()),
            // The decoder changed text it had emitted: nothing can be streamed exactly past this
            // point, so the rest waits for `finish` (the text is not lost).
            Err(e) if e.downcast_ref::<DecodeStreamError>().is_some() => Ok(String::new()),
            Err(e) => Err(Error::Tokenizer(format!("decode: {e}"))),
        }
    }

    /// Returns whatever is still held back (an incomplete character decodes to U+FFFD here, as it
    /// does in `decode`) and resets the decoder for a new stream.
    pub fn finish(&mut self) -> Result<String> {
        let prefix = self.tok.decode(&self.emitted, self.skip_special_tokens)?;
        let mut ids = std::mem::take(&mut self.emitted);
        ids.append(&mut self.held);
        let text = self.tok.decode(&ids, self.skip_special_tokens)?;
        self.stream = self.tok.inner.decode_stream(self.skip_special_tokens);
        Ok(match text.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_owned(),
            // Only for a decoder that rewrites earlier text (see `push`): emit what differs, cut at a
            // character boundary so slicing cannot panic.
            None => {
                let mut common = text
                    .bytes()
                    .zip(prefix.bytes())
                    .take_while(|(a, b)| a == b)
                    .count();
                while !text.is_char_boundary(common) {
                    common -= 1;
                }
                text[common..].to_owned()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;

    /// GPT-2's byte-to-unicode table, so the test vocabulary is in byte-level form.
    fn byte_to_char() -> Vec<char> {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut table = vec!['\0'; 256];
        for (b, c) in bs.iter().zip(cs) {
            table[*b as usize] = char::from_u32(c).unwrap_or('\0');
        }
        table
    }

    fn mapped(bytes: &[u8], table: &[char]) -> String {
        bytes.iter().map(|b| table[*b as usize]).collect()
    }

    /// A byte-level BPE tokenizer with all 256 bytes plus merged tokens that end or start in the
    /// middle of a multi-byte character (so emoji/CJK split across tokens in awkward places), and two
    /// special tokens.
    fn test_tokenizer() -> TextTokenizer {
        let table = byte_to_char();
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for b in 0..=255u8 {
            vocab.insert(mapped(&[b], &table), b as u32);
        }
        // (left, right) byte pieces; merges build these multi-byte tokens.
        let pieces: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"h".to_vec(), b"i".to_vec()),
            (vec![0xF0], vec![0x9F]),       // first half of a 4-byte emoji
            (vec![0x98], vec![0x80]),       // second half of 😀 (F0 9F 98 80)
            (vec![0xE4], vec![0xBD]),       // first two bytes of 你 (E4 BD A0)
            (vec![0xA0], vec![0x20]),       // last byte of 你 + space
            (vec![0xE2], vec![0x80]),       // ZWJ / general punctuation prefix
            (vec![0xE2, 0x80], vec![0x8D]), // ZWJ (E2 80 8D)
            (vec![0x20], b"w".to_vec()),    // " w"
            (vec![0xC3], vec![0xA9]),       // é
        ];
        let mut merges = Vec::new();
        let mut next = 256u32;
        for (l, r) in pieces {
            let (ls, rs) = (mapped(&l, &table), mapped(&r, &table));
            let joined = format!("{ls}{rs}");
            if let std::collections::hash_map::Entry::Vacant(slot) = vocab.entry(joined) {
                slot.insert(next);
                next += 1;
            }
            merges.push((ls, rs));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .unwrap_or_else(|e| panic!("test BPE: {e}"));
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, false, true)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        tok.add_special_tokens(&[
            AddedToken::from("<|eot_id|>", true),
            AddedToken::from("<image>", true),
        ]);
        TextTokenizer::from_tokenizer(tok)
    }

    fn stream(tok: &TextTokenizer, ids: &[u32], skip: bool) -> Vec<String> {
        let mut dec = StreamDecoder::new(tok, skip);
        let mut chunks: Vec<String> = ids
            .iter()
            .map(|id| dec.push(*id).unwrap_or_else(|e| panic!("push: {e}")))
            .collect();
        chunks.push(dec.finish().unwrap_or_else(|e| panic!("finish: {e}")));
        chunks
    }

    fn check_invariant(tok: &TextTokenizer, ids: &[u32]) {
        for skip in [false, true] {
            let chunks = stream(tok, ids, skip);
            let whole = tok
                .decode(ids, skip)
                .unwrap_or_else(|e| panic!("decode: {e}"));
            // Equality also rules out U+FFFD from a split character: the whole text has none there.
            assert_eq!(chunks.concat(), whole, "ids {ids:?} skip {skip}");
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let tok = test_tokenizer();
        for text in [
            "",
            "hi",
            "hi 😀 你 world",
            "👩‍👩‍👧‍👦 and 🇫🇷 and 1️⃣",
            "café\r\n\t  x",
            "a<|eot_id|>b<image>",
        ] {
            let ids = tok.encode(text).unwrap_or_else(|e| panic!("encode: {e}"));
            assert_eq!(tok.decode(&ids, false).ok().as_deref(), Some(text));
            check_invariant(&tok, &ids);
        }
    }

    #[test]
    fn special_tokens_in_text_are_parsed() {
        let tok = test_tokenizer();
        let eot = tok.token_to_id("<|eot_id|>");
        let img = tok.token_to_id("<image>");
        assert!(eot.is_some() && img.is_some());
        let ids = tok.encode("a<|eot_id|><image>").unwrap_or_default();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1..], [eot.unwrap_or(0), img.unwrap_or(0)]);
        // Skipping special tokens drops them from the text.
        assert_eq!(tok.decode(&ids, true).ok().as_deref(), Some("a"));
        assert_eq!(tok.vocab_size(), 256 + 9 + 2);
    }

    #[test]
    fn emoji_is_held_until_complete() {
        let tok = test_tokenizer();
        // 😀 = F0 9F 98 80: with single-byte ids the first three pushes must emit nothing.
        let mut dec = StreamDecoder::new(&tok, false);
        let out: Vec<String> = [0xF0u32, 0x9F, 0x98, 0x80]
            .iter()
            .map(|b| dec.push(*b).unwrap_or_default())
            .collect();
        assert_eq!(out, ["", "", "", "😀"]);
        assert_eq!(dec.finish().ok().as_deref(), Some(""));
    }

    #[test]
    fn incomplete_tail_comes_out_of_finish() {
        let tok = test_tokenizer();
        let mut dec = StreamDecoder::new(&tok, false);
        assert_eq!(dec.push(u32::from(b'a')).ok().as_deref(), Some("a"));
        assert_eq!(dec.push(0xF0).ok().as_deref(), Some(""));
        assert_eq!(dec.finish().ok().as_deref(), Some("\u{FFFD}"));
        // The decoder is reusable after finish.
        assert_eq!(dec.push(u32::from(b'b')).ok().as_deref(), Some("b"));
    }

    /// Random id sequences, including invalid byte sequences, special tokens, ids outside the
    /// vocabulary and real U+FFFD characters: the invariant holds for all of them.
    #[test]
    fn stream_invariant_on_random_sequences() {
        let tok = test_tokenizer();
        let n = tok.vocab_size() as u32;
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rand = move || {
            // xorshift64*: deterministic, no dependency.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let texts = [
            "😀你好 wörld 👩‍👩‍👧‍👦 🇯🇵 é\u{FFFD}x",
            "日本語のテキスト and عربى and हिन्दी",
            "a<|eot_id|>😀<image>你",
        ];
        let mut tokens_of_text: Vec<u32> = Vec::new();
        for t in texts {
            tokens_of_text.extend(tok.encode(t).unwrap_or_default());
        }
        for case in 0..3000 {
            let len = (rand() % 24) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| match rand() % 4 {
                    // Mostly well-formed text tokens, sometimes any id (invalid UTF-8 too), and
                    // sometimes ids past the vocabulary (skipped by decode).
                    0 | 1 => tokens_of_text[(rand() as usize) % tokens_of_text.len()],
                    2 => (rand() % u64::from(n)) as u32,
                    _ => {
                        if case % 7 == 0 {
                            n + (rand() % 5) as u32
                        } else {
                            0x80 + (rand() % 0x80) as u32
                        }
                    }
                })
                .collect();
            check_invariant(&tok, &ids);
        }
    }

    #[test]
    fn missing_file_is_io_error() {
        let err = TextTokenizer::from_file(Path::new("/nonexistent/tokenizer.json"));
        assert!(matches!(err, Err(Error::Io { .. })));
    }

    #[test]
    fn malformed_file_is_tokenizer_error() {
        let dir = std::env::temp_dir().join(format!("llama3v-tok-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("tokenizer.json");
        let _ = std::fs::write(&path, b"{not json");
        let err = TextTokenizer::from_file(&path);
        assert!(matches!(err, Err(Error::Tokenizer(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
