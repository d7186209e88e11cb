//! manifest.json parsing and self-validation on arbitrary text: an error or a manifest, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama3v::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::parse(text) {
        // What the runtime derives from a validated manifest must not panic either.
        let _ = manifest.float_dtype();
        let _ = manifest.image.preprocess_config();
    }
});
