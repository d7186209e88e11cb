//! Finding and loading ONNX Runtime's shared library, and the process-wide environment.
//!
//! The library comes from the `onnxruntime` (or `onnxruntime-gpu`) wheel that setup installs into `.venv`;
//! `ORT_DYLIB_PATH` overrides the search. `ort`'s download-binaries feature is not used: deployment
//! machines are often air-gapped.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::error::{Error, Result};

pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// The ONNX Runtime environment, created on first use from the library [`find_library`] picks.
pub fn environment() -> Result<&'static Environment> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = find_library().map_err(|e| e.to_string())?;
            let builder = ort::init_from(&path).map_err(|e| {
                format!(
                    "could not load ONNX Runtime from {}: {e} (set {DYLIB_ENV} to a libonnxruntime of version >= 1.{})",
                    path.display(),
                    ort::MINOR_VERSION
                )
            })?;
            builder
                .with_name("llama3v")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|reason| Error::OrtLibrary(reason.clone()))
}

/// `ORT_DYLIB_PATH`, else the newest `libonnxruntime` inside a `.venv` next to the current directory,
/// next to the executable or one of its ancestors (a cargo build in the repository), or `$VIRTUAL_ENV`.
pub fn find_library() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(DYLIB_ENV) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(Error::OrtLibrary(format!(
            "{DYLIB_ENV}={} does not name a file",
            path.display()
        )));
    }
    let mut venvs = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        venvs.push(PathBuf::from(v));
    }
    if let Ok(cwd) = std::env::current_dir() {
        venvs.push(cwd.join(".venv"));
    }
    if let Ok(exe) = std::env::current_exe() {
        venvs.extend(exe.ancestors().skip(1).map(|dir| dir.join(".venv")));
    }
    for venv in &venvs {
        if let Some(lib) = library_in_venv(venv) {
            return Ok(lib);
        }
    }
    Err(Error::OrtLibrary(format!(
        "ONNX Runtime's shared library was not found: looked for libonnxruntime.so* under \
         lib/python*/site-packages/onnxruntime/capi in {}. Run ./scripts/setup.sh (installs the \
         onnxruntime wheel into .venv) or set {DYLIB_ENV}",
        venvs
            .iter()
            .map(|v| v.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn library_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
        .map(|e| e.path().join("site-packages/onnxruntime/capi"))
        .filter_map(|capi| std::fs::read_dir(capi).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib")
        })
        .collect();
    found.sort();
    found.pop()
}
