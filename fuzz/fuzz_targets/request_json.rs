//! A chat-completions request body through the server's own request path, with no model: JSON ->
//! request (errors name the field), the field table, messages, limits, sampling -> a job; its images'
//! data URLs -> bytes -> header dimensions -> the pixel budget; its messages -> the chat template ->
//! token ids, with special tokens parsed (the default) and read as text (`--plain-special-tokens`).
//! Nothing may panic; plain-text ids must spell the same prompt and hold no more special tokens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama3v::chat_template::ChatTemplate;
use llama3v::manifest::GenerationDefaults;
use llama3v::preprocess::{image_dimensions, DecodeLimits};
use llama3v::request_limits::RequestLimits;
use llama3v::tokenizer::TextTokenizer;
use llama3v::user_text::PlainUserText;
use std::sync::OnceLock;

/// The server's request modules, compiled here as they are in `llama3v serve`.
#[allow(dead_code)]
#[path = "../../cli/src/serve"]
mod serve {
    #[path = "api.rs"]
    pub mod api;
    #[path = "errors.rs"]
    pub mod errors;
    #[path = "fields.rs"]
    pub mod fields;
    #[path = "images.rs"]
    pub mod images;
    #[path = "request.rs"]
    pub mod request;
}

use serve::images::ImagePolicy;
use serve::request::{parse_request, validate, Limits};

const TEMPLATE: &str = include_str!("../../tests/data/llava_llama3.jinja");
const TOKENIZER_JSON: &[u8] = include_bytes!("../data/tokenizer.json");

struct Text {
    template: ChatTemplate,
    tokenizer: TextTokenizer,
    plain: PlainUserText,
}

fn text() -> &'static Text {
    static TEXT: OnceLock<Text> = OnceLock::new();
    TEXT.get_or_init(|| {
        let inner = tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON)
            .unwrap_or_else(|e| panic!("fuzz tokenizer: {e}"));
        let tokenizer = TextTokenizer::from_tokenizer(inner);
        let plain = PlainUserText::new(&tokenizer);
        let template = ChatTemplate::new(TEMPLATE, "<|begin_of_text|>", "<|eot_id|>")
            .unwrap_or_else(|e| panic!("the LLaVA template must compile: {e}"));
        Text {
            template,
            tokenizer,
            plain,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_tokens: 1024,
        max_body_bytes: 1 << 20,
        request: RequestLimits {
            max_prompt_bytes: 4096,
            max_request_pixels: 1 << 24,
        },
    };
    let Ok(request) = parse_request(data) else {
        return;
    };
    let sampling_defaults = GenerationDefaults {
        do_sample: Some(data.len() % 2 == 0),
        ..GenerationDefaults::default()
    };
    let Ok(job) = validate(request, &limits, &sampling_defaults) else {
        return;
    };
    assert!(job
        .max_tokens
        .is_none_or(|n| (1..=limits.max_tokens).contains(&n)));
    assert!(job.sampling.validate().is_ok());

    // Local paths are refused without --allowed-image-dir: no file is touched here.
    let policy = ImagePolicy {
        allowed_dir: None,
        limits: DecodeLimits {
            max_width: 2048,
            max_height: 2048,
            max_alloc_bytes: 64 << 20,
        },
    };
    let mut dims = Vec::new();
    for (i, url) in job.image_urls.iter().enumerate() {
        let Ok(image) = policy.fetch(i, url) else {
            return;
        };
        let Ok(d) = image_dimensions(&image.bytes, &image.name, &policy.limits) else {
            return;
        };
        dims.push(d);
    }
    let _ = limits.request.check_pixels(&dims);

    let text = text();
    let Ok(rendered) = text.template.render(&job.messages, true) else {
        return;
    };
    let Ok(parsed) = text.tokenizer.encode(&rendered) else {
        return;
    };
    let Ok(plain) = text.plain.encode(
        &|m| text.template.render(m, true),
        &text.tokenizer,
        &job.messages,
        &rendered,
    ) else {
        return;
    };
    let specials = |ids: &[u32]| ids.iter().filter(|&&id| id <= 2).count();
    assert!(
        specials(&plain) <= specials(&parsed),
        "plain-text mode parsed more special tokens than the default"
    );
    let spelled = text.tokenizer.decode(&plain, false).unwrap_or_default();
    assert_eq!(spelled, rendered, "plain-text ids spell another prompt");
});
