//! Chat template rendering with hostile message content: jinja syntax, control characters and special
//! tokens inside messages must render as text (or give a typed error), never panic or run away.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama3v::chat_template::{ChatMessage, ChatTemplate, ContentPart};

/// The LLaVA Llama-3 template the exporter writes into manifest.json.
const TEMPLATE: &str = include_str!("../../tests/data/llava_llama3.jinja");

fuzz_target!(|data: &[u8]| {
    let Ok(template) = ChatTemplate::new(TEMPLATE, "<|begin_of_text|>", "<|eot_id|>") else {
        panic!("the LLaVA template must compile");
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if mode % 2 == 0 {
        // Messages given as JSON, passed to the template as they are (arbitrary shapes and keys).
        let _ = template.render_json(&text, mode % 4 == 0);
        return;
    }
    // Structured messages: fields separated by NUL; role, then content parts ("\u{1}" = an image).
    let fields: Vec<&str> = text.split('\0').collect();
    let messages: Vec<ChatMessage> = fields
        .chunks(2)
        .map(|pair| ChatMessage {
            role: pair[0].to_string(),
            content: pair
                .get(1)
                .map(|c| {
                    c.split('\u{1}')
                        .enumerate()
                        .flat_map(|(i, t)| {
                            let image = (i > 0).then_some(ContentPart::Image);
                            image.into_iter().chain([ContentPart::Text(t.to_string())])
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    if let Ok(rendered) = template.render(&messages, mode & 2 != 0) {
        // Message text is data: whatever it contains is copied (trimmed), never evaluated.
        for message in &messages {
            for part in &message.content {
                if let ContentPart::Text(t) = part {
                    // The template trims like Python's str.strip; trimming whitespace and control
                    // characters (a superset) leaves a substring of what was rendered.
                    let core = t.trim_matches(|c: char| c.is_whitespace() || c.is_control());
                    assert!(rendered.contains(core), "{t:?} missing from {rendered:?}");
                }
            }
        }
    }
});
