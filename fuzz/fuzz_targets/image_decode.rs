//! Image decode + preprocessing on arbitrary bytes: every input must give an image or a typed error,
//! within the decode limits, and a decoded image must preprocess to finite values of the right length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama3v::preprocess::{decode_image, pixel_values, DecodeLimits, PreprocessConfig};

fuzz_target!(|data: &[u8]| {
    // Small limits keep each run fast; the limits themselves are what is under test.
    let limits = DecodeLimits {
        max_width: 2048,
        max_height: 2048,
        max_alloc_bytes: 64 * 1024 * 1024,
    };
    let Ok(img) = decode_image(data, "fuzz", &limits) else {
        return;
    };
    assert!(img.width() <= limits.max_width && img.height() <= limits.max_height);
    let config = PreprocessConfig::siglip(28, 28);
    let values = pixel_values(&img, &config);
    assert_eq!(values.len(), 3 * 28 * 28);
    assert!(values.iter().all(|v| v.is_finite()));
});
