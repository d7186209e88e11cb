//! Turning a message's `image_url` into pixels: data URLs always; local files only inside the directory
//! the operator named; remote URLs never (the server must not fetch addresses its clients choose).

use std::path::{Component, Path, PathBuf};

use base64::Engine;
use image::RgbImage;
use llama3v::preprocess::{decode_image, load_image, DecodeLimits};

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
        param: Some("messages"),
        ..ApiError::bad_request(format!("image {index}: {reason}"))
    }
}

impl ImagePolicy {
    /// Decodes the `index`-th image of a request (the index only labels errors).
    pub fn load(&self, index: usize, url: &str) -> Result<RgbImage, ApiError> {
        // The runtime labels it "image {name}".
        let name = index.to_string();
        if let Some(rest) = url.strip_prefix("data:") {
            let bytes = decode_data_url(rest).map_err(|reason| image_error(index, reason))?;
            return decode_image(&bytes, &name, &self.limits).map_err(ApiError::from);
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
        load_image(&path, &self.limits).map_err(|err| match err {
            // Read failures name the resolved path, which the client gave: its error, not ours.
            llama3v::Error::Io { .. } => image_error(index, err),
            other => ApiError::from(other),
        })
    }

    /// The canonical path of a local image, if it lies inside the allowed directory.
    ///
    /// `..` is refused outright; canonicalizing then resolves every symlink, so a link inside the
    /// directory that points outside it is caught by the prefix check.
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
        let joined = dir.join(path);
        let canonical = joined
            .canonicalize()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if !canonical.starts_with(dir) {
            return Err(format!(
                "path {} resolves outside the allowed image directory",
                path.display()
            ));
        }
        Ok(canonical)
    }
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
        let err = policy.resolve(&root.join("secret.png")).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("secret.png"), allowed.join("link.png")).unwrap();
            let err = policy.resolve(Path::new("link.png")).unwrap_err();
            assert!(err.contains("outside"), "{err}");
        }
        let closed = ImagePolicy {
            allowed_dir: None,
            ..policy
        };
        assert!(closed.resolve(Path::new("in.png")).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
