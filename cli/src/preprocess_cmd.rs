//! `llama3v preprocess`: one image to the vision tower's `pixel_values`, saved as `.npy`.
//!
//! The output is what `SiglipImageProcessorPil` returns for the same file, so the two can
//! be compared directly with numpy.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use llama3v::manifest::MiniCpmvSettings;
use llama3v::manifest::MAX_IMAGE_SIDE;
use llama3v::minicpmv::image_batch;
use llama3v::preprocess::{
    load_image, load_image_timed, pixel_values_timed, preprocess_file, DecodeLimits,
    PreprocessConfig, StageTimes,
};

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
    /// After writing the output, run the whole preprocessing (read, decode, convert,
    /// resize, normalize) this many more times in this process and print the median
    /// time of each stage.
    #[arg(long, default_value_t = 0)]
    pub repeat: usize,
    /// With --repeat: print the timings as one JSON object instead of a table.
    #[arg(long, requires = "repeat")]
    pub json: bool,
    /// Threads for preprocessing: the resize's row bands, and decoding beside resizing
    /// (0 = one per core).
    #[arg(long, default_value_t = 0, value_parser = parse_preprocess_threads)]
    pub threads: usize,
    /// Decode the whole image, then resize it (the path `check` takes), instead of resizing
    /// rows as they are decoded (the default, and the path `generate` and `serve` take).
    /// The values are the same.
    #[arg(long)]
    pub whole_image: bool,
    /// Slice as MiniCPM-Llama3-V 2.5 does, at this scale resolution (448 in 2.5), instead of
    /// resizing to `--size`: the output is every slice's [3, h, w] values (overview first, then the
    /// grid row by row) in one flat array, and stdout gets `{"slices": [[3, h, w], ...]}`. Pixels
    /// are level / 255 normalized with --mean / --std (--rescale does not apply).
    #[arg(long)]
    pub slice_scale: Option<u32>,
    /// With --slice-scale: the most slices of the grid.
    #[arg(long, default_value_t = 9, requires = "slice_scale")]
    pub max_slices: u32,
    /// With --slice-scale: the patch size every slice side is a multiple of.
    #[arg(long, default_value_t = 14, requires = "slice_scale")]
    pub patch: u32,
}

/// 0 (one per core) or 1 up to the number of cores, as `--threads` of the other commands.
fn parse_preprocess_threads(value: &str) -> Result<usize, String> {
    if value.trim() == "0" {
        return Ok(0);
    }
    crate::model_args::parse_threads(value)
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
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .context("starting the preprocessing threads")?;
    pool.install(|| run_in_pool(args))
}

fn run_in_pool(args: &PreprocessArgs) -> anyhow::Result<()> {
    let (height, width) = args.size;
    if args.std.contains(&0.0) {
        bail!("--std must not contain 0");
    }
    if let Some(scale) = args.slice_scale {
        return write_slices(args, scale);
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
    let limits = DecodeLimits::default();
    let preprocess = |times: &mut StageTimes| -> anyhow::Result<Vec<f32>> {
        if args.whole_image {
            let img = load_image_timed(&args.image, &limits, times)?;
            Ok(pixel_values_timed(&img, &cfg, times))
        } else {
            Ok(preprocess_file(&args.image, &cfg, &limits, times)?)
        }
    };
    let mut first = StageTimes::default();
    let values = preprocess(&mut first)?;
    let write_start = Instant::now();
    write_npy(&args.out, &[3, height as usize, width as usize], &values)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let write = write_start.elapsed();
    drop(values);
    if args.repeat > 0 {
        let mut runs = Vec::with_capacity(args.repeat);
        for _ in 0..args.repeat {
            let mut times = StageTimes::default();
            preprocess(&mut times)?;
            runs.push(times);
        }
        print_timings(&runs, &first, write, args.json);
    }
    Ok(())
}

/// Median of the values `stage` picks out of each run, in milliseconds.
fn median_ms(runs: &[StageTimes], stage: impl Fn(&StageTimes) -> Duration) -> f64 {
    let mut ms: Vec<f64> = runs.iter().map(|t| stage(t).as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    match ms.len() {
        0 => 0.0,
        n if n % 2 == 1 => ms[n / 2],
        n => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
    }
}

/// Prints the medians of `runs`, and apart the first run of the process (`first`, cold
/// caches and fresh memory, as a one-off command sees it) and the time to write the .npy.
/// The fastest run's total, in milliseconds: on a shared machine, the least disturbed.
fn min_total_ms(runs: &[StageTimes]) -> f64 {
    runs.iter()
        .map(|t| t.total().as_secs_f64() * 1e3)
        .min_by(f64::total_cmp)
        .unwrap_or(0.0)
}

fn print_timings(runs: &[StageTimes], first: &StageTimes, write: Duration, json: bool) {
    type Stage = (&'static str, fn(&StageTimes) -> Duration);
    let stages: [Stage; 6] = [
        ("read", |t| t.read),
        ("decode", |t| t.decode),
        ("convert", |t| t.convert),
        ("resize", |t| t.resize),
        ("normalize", |t| t.normalize),
        ("total", StageTimes::total),
    ];
    if json {
        let medians: serde_json::Map<String, serde_json::Value> = stages
            .iter()
            .map(|(name, f)| (name.to_string(), median_ms(runs, f).into()))
            .collect();
        let report = serde_json::json!({
            "runs": runs.len(),
            "threads": rayon::current_num_threads(),
            "median_ms": medians,
            "min_total_ms": min_total_ms(runs),
            "first_run_ms": first.total().as_secs_f64() * 1e3,
            "write_npy_ms": write.as_secs_f64() * 1e3,
        });
        println!("{report}");
    } else {
        println!(
            "median of {} runs, {} thread(s):",
            runs.len(),
            rayon::current_num_threads()
        );
        for (name, f) in stages {
            println!("  {name:<10} {:>9.3} ms", median_ms(runs, f));
        }
        println!("fastest run {:.3} ms", min_total_ms(runs));
        println!(
            "first run of the process {:.3} ms, writing the .npy {:.3} ms",
            first.total().as_secs_f64() * 1e3,
            write.as_secs_f64() * 1e3
        );
    }
}

/// Writes a little-endian float32 C-order array in NumPy's `.npy` format (version 1.0).
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> anyhow::Result<()> {
    let mut bytes = npy_header(shape);
    bytes.reserve(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    File::create(path)?.write_all(&bytes)?;
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

/// `--slice-scale`: MiniCPM-V's slices of the image, flat, with their shapes on stdout.
fn write_slices(args: &PreprocessArgs, scale: u32) -> anyhow::Result<()> {
    let settings = MiniCpmvSettings {
        query_num: 1,
        max_slice_nums: args.max_slices,
        scale_resolution: scale,
        patch_size: args.patch,
        image_start_token: String::new(),
        image_start_token_id: 0,
        image_end_token: String::new(),
        image_end_token_id: 0,
        slice_start_token: String::new(),
        slice_start_token_id: 0,
        slice_end_token: String::new(),
        slice_end_token_id: 0,
    };
    settings
        .validate(MAX_IMAGE_SIDE)
        .map_err(|reason| anyhow::anyhow!("--slice-scale, --max-slices, --patch: {reason}"))?;
    let img = load_image(&args.image, &DecodeLimits::default())?;
    let batch = image_batch(&[img], &settings, args.mean, args.std);
    write_npy(&args.out, &[batch.len()], &batch)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let shapes: Vec<[u32; 3]> = batch
        .runs
        .iter()
        .flat_map(|run| std::iter::repeat_n([3, run.height, run.width], run.count))
        .collect();
    println!("{}", serde_json::json!({ "slices": shapes }));
    Ok(())
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
