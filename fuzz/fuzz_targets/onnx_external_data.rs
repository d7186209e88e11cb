//! The ONNX file walker on arbitrary bytes (a hostile `.onnx` file): external-data references and
//! declared inputs/outputs, or an error; never a panic, unbounded recursion or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama3v::onnx_file::inspect_bytes;

fuzz_target!(|data: &[u8]| {
    let _ = inspect_bytes(data);
});
