//! `llama3v preprocess`: one image to the vision tower's `pixel_values`, saved as `.npy`.
//!
//! The output is what `SiglipImageProcessorPil` returns for the same file, so the two can
//! be compared directly with numpy.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use llama3v::preprocess::{load_image, pixel_values, DecodeLimits, PreprocessConfig};

#[derive(clap::Args, Debug)]
pub struct PreprocessArgs {
    /// Image file (PNG, JPEG, WebP, GIF or BMP).
    #[arg(long)]
    pub image: PathBuf,
    /// Target size: `N` for N x N, or `HxW` (height first, as transformers' `size`).
    #[arg(long, value_parser = parse_size, default_value = "384")]
    pub size: (u32, u32),
    /// Output file: float32 array of shape [3, H, W].
    #[arg(long)]
    pub out: PathBuf,
    /// Per-channel mean: one value, or three separated by commas.
    #[arg(long, value_parser = parse_triple, default_value = "0.5")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation: one value, or three separated by commas.
    #[arg(long, value_parser = parse_triple, default_value = "0.5")]
    pub std: [f32; 3],
    /// Factor applied to the 0..255 levels before normalizing.
    #[arg(long, default_value_t = 1.0 / 255.0)]
    pub rescale: f32,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let parse = |v: &str| -> Result<u32, String> {
        match v.trim().parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("expected a positive integer, got {v:?}")),
        }
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    let values = s
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .map_err(|_| format!("expected a number, got {v:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match values[..] {
        [v] => Ok([v; 3]),
        [a, b, c] => Ok([a, b, c]),
        _ => Err(format!("expected 1 or 3 values, got {}", values.len())),
    }
}

pub fn run(args: &PreprocessArgs) -> anyhow::Result<()> {
    let (height, width) = args.size;
    if args.std.contains(&0.0) {
        bail!("--std must not contain 0");
    }
    let cfg = PreprocessConfig {
        height,
        width,
        do_convert_rgb: true,
        do_rescale: true,
        rescale_factor: args.rescale,
        do_normalize: true,
        mean: args.mean,
        std: args.std,
    };
    let img = load_image(&args.image, &DecodeLimits::default())?;
    let values = pixel_values(&img, &cfg);
    write_npy(&args.out, &[3, height as usize, width as usize], &values)
        .with_context(|| format!("writing {}", args.out.display()))
}

/// Writes a little-endian float32 C-order array in NumPy's `.npy` format (version 1.0).
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> anyhow::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    out.write_all(&npy_header(shape))?;
    for v in data {
        out.write_all(&v.to_le_bytes())?;
    }
    out.flush()?;
    Ok(())
}

fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + dict + '\n' must be a multiple of 64 so the
    // data that follows is aligned.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("384"), Ok((384, 384)));
        assert_eq!(parse_size("224x448"), Ok((224, 448)));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12x").is_err());
        assert!(parse_size("abc").is_err());
    }

    #[test]
    fn triples() {
        assert_eq!(parse_triple("0.5"), Ok([0.5; 3]));
        assert_eq!(parse_triple("0.1, 0.2,0.3"), Ok([0.1, 0.2, 0.3]));
        assert!(parse_triple("0.1,0.2").is_err());
    }

    #[test]
    fn header_is_aligned() {
        let h = npy_header(&[3, 384, 384]);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(h.last(), Some(&b'\n'));
        assert!(String::from_utf8_lossy(&h).contains("'shape': (3, 384, 384)"));
    }
}
