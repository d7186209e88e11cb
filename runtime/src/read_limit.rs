//! Reading a file of the model directory whose size is checked before a byte of it is parsed.

use std::fs;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Reads `path` whole when it is a regular file of at most `limit` bytes; `what` names it in the error.
/// A FIFO or device is refused (it could block or never end), and a file that grows while it is read
/// is cut at `limit + 1` bytes and refused.
pub(crate) fn read_capped(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::FileLimit {
            path: path.to_path_buf(),
            reason: format!("the {what} is not a regular file"),
        });
    }
    let too_big = |size: u64| Error::FileLimit {
        path: path.to_path_buf(),
        reason: format!("the {what} is {size} bytes, over the limit of {limit}"),
    };
    if meta.len() > limit {
        return Err(too_big(meta.len()));
    }
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}
