//! Turning a message's `image_url` into encoded image bytes: data URLs always; local files only inside
//! the directory the operator named; remote URLs never (the server must not fetch addresses its
//! clients choose). Decoding happens afterwards, under the request's pixel budget
//! (`llama3v::request_limits::load_images`).
//!
//! A local path that is not a readable regular file inside the directory gets one message whatever
//! the reason (missing, outside, a symlink out, unreadable), so errors never tell a client whether a
//! file outside the directory exists. Files with several hard links are refused, as model files are
//! (a hard link inside the directory can alias a file outside it).

use std::path::{Component, Path, PathBuf};

use base64::Engine;
use llama3v::preprocess::{read_image_file_checked, DecodeLimits};
use llama3v::request_limits::EncodedImage;

use super::errors::ApiError;

#[derive(Debug, Clone)]
pub struct ImagePolicy {
    /// Canonical (symlink-free) path of `--allowed-image-dir`; `None` refuses every local path.
    pub allowed_dir: Option<PathBuf>,
    pub limits: DecodeLimits,
}

fn image_error(index: usize, reason: impl std::fmt::Display) -> ApiError {
    ApiError {
        code: Some("invalid_image"),
        param: Some("messages".into()),
        ..ApiError::bad_request(format!("image {index}: {reason}"))
    }
}

impl ImagePolicy {
    /// The encoded bytes of the `index`-th image of a request (the index labels errors and is the
    /// name the decoder's errors carry).
    pub fn fetch(&self, index: usize, url: &str) -> Result<EncodedImage, ApiError> {
        let name = index.to_string();
        if let Some(rest) = url.strip_prefix("data:") {
            let bytes = decode_data_url(rest).map_err(|reason| image_error(index, reason))?;
            return Ok(EncodedImage { name, bytes });
        }
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Err(image_error(
                index,
                "remote image URLs are not fetched by this server; send the image as a data: URL",
            ));
        }
        let path = match url.strip_prefix("file://") {
            Some(path) => path,
            None if url.contains("://") => {
                return Err(image_error(
                    index,
                    "unsupported URL scheme (expected data:, file:// or a path)",
                ))
            }
            None => url,
        };
        let path = self
            .resolve(Path::new(path))
            .map_err(|r| image_error(index, r))?;
        let single_link = |meta: &std::fs::Metadata| single_link(meta);
        let bytes = read_image_file_checked(&path, &self.limits, single_link).map_err(|err| {
            match err {
                // A file that vanished or cannot be read: the same words as any path not allowed.
                llama3v::Error::Io { .. } => image_error(index, not_allowed(Path::new(url))),
                other => image_error(index, other),
            }
        })?;
        Ok(EncodedImage { name, bytes })
    }

    /// The canonical path of a local image, if it lies inside the allowed directory.
    ///
    /// `..` is refused outright; canonicalizing then resolves every symlink, so a link inside the
    /// directory that points outside it is caught by the prefix check. Every failure past the first
    /// two checks reads the same (see the module documentation).
    fn resolve(&self, path: &Path) -> Result<PathBuf, String> {
        let Some(dir) = &self.allowed_dir else {
            return Err(
                "local image paths are disabled (the server was started without --allowed-image-dir)"
                    .into(),
            );
        };
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(format!("path {} contains `..`", path.display()));
        }
        match dir.join(path).canonicalize() {
            Ok(canonical) if canonical.starts_with(dir) => Ok(canonical),
            _ => Err(not_allowed(path)),
        }
    }
}

fn not_allowed(path: &Path) -> String {
    format!(
        "{} is not a readable file inside the allowed image directory",
        path.display()
    )
}

#[cfg(unix)]
fn single_link(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if meta.nlink() > 1 {
        return Err(format!(
            "the file has {} hard links (a hard link can alias a file outside the allowed image \
             directory)",
            meta.nlink()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn single_link(_: &std::fs::Metadata) -> Result<(), String> {
    Ok(())
}

/// The bytes of a data URL's payload (`rest` is what follows `data:`): `<mediatype>;base64,<data>`.
fn decode_data_url(rest: &str) -> Result<Vec<u8>, String> {
    let Some((meta, data)) = rest.split_once(',') else {
        return Err("data URL without a comma".into());
    };
    if !meta.to_ascii_lowercase().ends_with(";base64") {
        return Err(format!(
            "data URL must be base64-encoded (data:image/...;base64,...), got `data:{meta},...`"
        ));
    }
    if !meta.to_ascii_lowercase().starts_with("image/") {
        return Err(format!(
            "data URL media type must be image/*, got `{}`",
            meta.split(';').next().unwrap_or_default()
        ));
    }
    // Some clients wrap base64 at 76 columns.
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("invalid base64 in data URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_decode_and_malformed_ones_are_refused() {
        assert_eq!(decode_data_url("image/png;base64,AAEC").unwrap(), [0, 1, 2]);
        assert_eq!(
            decode_data_url("image/png;base64,AA\nEC").unwrap(),
            [0, 1, 2]
        );
        assert!(decode_data_url("image/png;base64").is_err());
        assert!(decode_data_url("image/png,AAEC").is_err());
        assert!(decode_data_url("text/plain;base64,AAEC").is_err());
        assert!(decode_data_url("image/png;base64,@@@").is_err());
    }

    #[test]
    fn local_paths_stay_inside_the_allowed_directory() {
        let root =
            std::env::temp_dir().join(format!("llama3v-serve-images-{}", std::process::id()));
        let allowed = root.join("allowed");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::write(allowed.join("in.png"), b"x").unwrap();
        std::fs::write(root.join("secret.png"), b"x").unwrap();
        let policy = ImagePolicy {
            allowed_dir: Some(allowed.canonicalize().unwrap()),
            limits: DecodeLimits::default(),
        };
        assert!(policy.resolve(Path::new("in.png")).is_ok());
        let err = policy.resolve(Path::new("../secret.png")).unwrap_err();
        assert!(err.contains("`..`"), "{err}");
        // A file outside that exists and one that does not read the same.
        let exists = policy.resolve(&root.join("secret.png")).unwrap_err();
        let missing = policy.resolve(&root.join("nothing.png")).unwrap_err();
        assert!(exists.contains("not a readable file inside"), "{exists}");
        assert_eq!(
            exists.replace("secret", "X"),
            missing.replace("nothing", "X")
        );
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("secret.png"), allowed.join("link.png")).unwrap();
            std::os::unix::fs::symlink(root.join("nothing.png"), allowed.join("dead.png")).unwrap();
            let to_file = policy.resolve(Path::new("link.png")).unwrap_err();
            let to_nothing = policy.resolve(Path::new("dead.png")).unwrap_err();
            assert_eq!(
                to_file.replace("link", "X"),
                to_nothing.replace("dead", "X")
            );
            std::fs::hard_link(root.join("secret.png"), allowed.join("hard.png")).unwrap();
            let err = policy.fetch(0, "hard.png").unwrap_err();
            assert!(err.message.contains("2 hard links"), "{}", err.message);
            let made = std::process::Command::new("mkfifo")
                .arg(allowed.join("fifo.png"))
                .status()
                .unwrap();
            assert!(made.success());
            let err = policy.fetch(0, "fifo.png").unwrap_err();
            assert!(
                err.message.contains("not a regular file"),
                "{}",
                err.message
            );
        }
        let closed = ImagePolicy {
            allowed_dir: None,
            ..policy
        };
        assert!(closed.resolve(Path::new("in.png")).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
