//! Streaming detokenization of arbitrary token sequences: the concatenated stream must equal a
//! one-shot decode of the same ids (the documented invariant), and out-of-range ids must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama3v::tokenizer::{StreamDecoder, TextTokenizer};
use std::sync::OnceLock;

/// A small byte-level BPE (Llama-3's pre-tokenizer and decoder, a 512-token vocabulary trained on
/// multilingual text and emoji, and special tokens), made by `data/make_tokenizer.py`.
const TOKENIZER_JSON: &[u8] = include_bytes!("../data/tokenizer.json");

fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| match tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON) {
        Ok(t) => TextTokenizer::from_tokenizer(t),
        Err(e) => panic!("data/tokenizer.json: {e}"),
    })
}

fuzz_target!(|data: &[u8]| {
    let tok = tokenizer();
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let skip_special = flags & 1 != 0;
    // Two bytes per id; a few ids past the vocabulary are reachable on purpose.
    let limit = tok.vocab_size() as u32 + 8;
    let ids: Vec<u32> = rest
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % limit)
        .collect();
    let mut stream = StreamDecoder::new(tok, skip_special);
    let mut streamed = String::new();
    for id in &ids {
        match stream.push(*id) {
            Ok(piece) => streamed.push_str(&piece),
            Err(_) => return,
        }
    }
    let Ok(rest) = stream.finish() else {
        return;
    };
    streamed.push_str(&rest);
    if let Ok(whole) = tok.decode(&ids, skip_special) {
        assert_eq!(streamed, whole, "ids {ids:?}");
    }
});
