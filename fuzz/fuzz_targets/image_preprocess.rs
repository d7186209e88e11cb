//! The two preprocessing paths on arbitrary bytes: `preprocess_image` (rows resized as they are decoded,
//! the PNG fast path) must give exactly the values of `decode_image` + `pixel_values` (decode, then resize),
//! or both must fail.
//!
//! PNG chunk checksums are recomputed before decoding: a mutated chunk with a stale CRC is declined by the
//! fast path at once, so without this the fuzzer would rarely get past the checksums into inflating and
//! unfiltering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama3v::preprocess::{
    decode_image, pixel_values, preprocess_image, DecodeLimits, PreprocessConfig, StageTimes,
};

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Rewrites the CRC of every complete chunk of a PNG; other bytes are returned as they are.
fn with_fixed_png_crcs(data: &[u8]) -> Vec<u8> {
    let mut bytes = data.to_vec();
    if !bytes.starts_with(PNG_SIGNATURE) {
        return bytes;
    }
    let mut at = PNG_SIGNATURE.len();
    while at + 12 <= bytes.len() {
        let len =
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let Some(end) = (at + 8)
            .checked_add(len)
            .filter(|end| end + 4 <= bytes.len())
        else {
            break;
        };
        let crc = crc32(&bytes[at + 4..end]);
        bytes[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
    bytes
}

/// CRC-32 as PNG defines it (ISO 3309, reflected, polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fuzz_target!(|data: &[u8]| {
    let bytes = with_fixed_png_crcs(data);
    let limits = DecodeLimits {
        max_width: 2048,
        max_height: 2048,
        max_alloc_bytes: 64 * 1024 * 1024,
    };
    let config = PreprocessConfig::siglip(28, 28);
    let streamed = preprocess_image(&bytes, "fuzz", &config, &limits, &mut StageTimes::default());
    let whole = decode_image(&bytes, "fuzz", &limits).map(|img| pixel_values(&img, &config));
    match (streamed, whole) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.len(), b.len());
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "the streamed and the whole-image paths give different values"
            );
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "one path failed and the other did not: streamed {:?}, whole image {:?}",
            a.err().map(|e| e.to_string()),
            b.err().map(|e| e.to_string())
        ),
    }
});
