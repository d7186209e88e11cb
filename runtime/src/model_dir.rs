//! A model directory on disk, checked before any ONNX Runtime session exists: the files the manifest
//! names (plain relative names inside the directory, not links, sha256), each graph's external-data
//! references (inside the directory, listed in the manifest, within their file) and declared inputs
//! and outputs (the manifest's dtypes and fixed dims), and the tokenizer and chat template against the
//! manifest's numbers. `onnx_file` reads the graphs; the policy of what is allowed is here.

use std::collections::HashSet;
use std::fs;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::chat_template::ChatTemplate;
use crate::error::{Error, Result};
use crate::manifest::{
    resolve_inside, Dim, GraphSpec, LoadOptions, Manifest, TensorDtype, TensorSpec, MANIFEST_FILE,
};
use crate::onnx_file::{self, OnnxInfo, ValueInfo};
use crate::read_limit::read_capped;
use crate::tokenizer::TextTokenizer;

/// Largest `manifest.json` read (a 32-layer export's is about 30 KiB, its chat template included).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

impl Manifest {
    /// Reads and validates `<dir>/manifest.json` and checks every file it names (see the module doc).
    pub fn load(dir: &Path, options: LoadOptions) -> Result<Manifest> {
        if !dir.is_dir() {
            return Err(Error::Model {
                dir: dir.to_path_buf(),
                reason: "not a directory (export a checkpoint with llama3v-export first)".into(),
            });
        }
        let path = dir.join(MANIFEST_FILE);
        let bytes = read_capped(&path, MAX_MANIFEST_BYTES, "manifest")?;
        let text = String::from_utf8(bytes).map_err(|_| Error::Manifest {
            path: path.clone(),
            reason: "not UTF-8 text".into(),
        })?;
        let manifest = Manifest::parse(&text).map_err(|reason| Error::Manifest { path, reason })?;
        check_files(&manifest, dir, options)?;
        Ok(manifest)
    }
}

/// The tokenizer and chat template a manifest names, checked against the manifest: the tokenizer's
/// vocabulary fits in the logits, and the image, BOS and stop tokens are the tokenizer's.
pub fn load_text(dir: &Path, manifest: &Manifest) -> Result<(TextTokenizer, ChatTemplate)> {
    let model_error = |reason: String| Error::Model {
        dir: dir.to_path_buf(),
        reason,
    };
    let tokenizer = TextTokenizer::from_file(&resolve_inside(dir, &manifest.text.tokenizer_file)?)?;
    if tokenizer.vocab_size() > manifest.model.vocab_size {
        return Err(model_error(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            tokenizer.vocab_size(),
            manifest.model.vocab_size
        )));
    }
    let text = &manifest.text;
    let named = [
        (
            "image.image_token",
            &manifest.image.image_token,
            manifest.image.image_token_id,
        ),
        ("text.bos_token", &text.bos_token, text.bos_token_id),
    ];
    for (field, token, id) in named {
        let found = tokenizer.token_to_id(token);
        if found != Some(id) {
            return Err(model_error(format!(
                "the tokenizer maps {field} {token:?} to {found:?}, the manifest says {id}"
            )));
        }
    }
    // An id the tokenizer does not know is never sampled as that token: generation would not stop.
    if let Some(id) = text
        .stop_token_ids
        .iter()
        .find(|&&id| tokenizer.id_to_token(id).is_none())
    {
        return Err(model_error(format!(
            "text.stop_token_ids has {id}, which is not a token of the tokenizer ({} tokens)",
            tokenizer.vocab_size()
        )));
    }
    let template = ChatTemplate::new(&text.chat_template, &text.bos_token, &text.eos_token)?;
    Ok((tokenizer, template))
}

/// Every file the manifest names must be a plain relative name inside `dir`, exist, and (optionally)
/// match its sha256; then each graph's external data and declared inputs/outputs are checked.
fn check_files(manifest: &Manifest, dir: &Path, options: LoadOptions) -> Result<()> {
    let graphs = manifest.graphs.named();
    let mut files: Vec<(&str, Option<&str>)> = vec![(manifest.text.tokenizer_file.as_str(), None)];
    for (_, graph) in graphs {
        files.push((&graph.file, Some(&graph.sha256)));
        for ext in &graph.external_data {
            files.push((&ext.file, Some(&ext.sha256)));
        }
    }
    let model_error = |reason: String| Error::Model {
        dir: dir.to_path_buf(),
        reason,
    };
    let canonical_dir = fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    for (name, digest) in files {
        let path = resolve_inside(dir, name)?;
        if !path.is_file() {
            return Err(model_error(format!("{name} is missing")));
        }
        // A symlink or hard link inside the directory could still name a file outside it.
        check_plain_file(&canonical_dir, &path).map_err(model_error)?;
        if let (true, Some(expected)) = (options.verify_hashes, digest) {
            let found = sha256_file(&path)?;
            if !found.eq_ignore_ascii_case(expected) {
                return Err(model_error(format!(
                    "{name}: sha256 is {found}, the manifest says {expected}"
                )));
            }
        }
    }
    // Before any session exists: external-data references, then declared inputs and outputs.
    for (name, graph) in graphs {
        let path = resolve_inside(dir, &graph.file)?;
        let listed: Vec<&str> = graph
            .external_data
            .iter()
            .map(|f| f.file.as_str())
            .collect();
        let info = check_graph_file(dir, &path, &listed).map_err(model_error)?;
        check_graph_io(graph, &info).map_err(|reason| Error::Graph {
            graph: name.into(),
            reason: format!("{}: {reason}", graph.file),
        })?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks a graph file before ONNX Runtime opens it: every external-data reference stays inside
/// `model_dir`, is listed in the manifest, and fits in its file; returns the declared inputs/outputs.
///
/// `listed` are the manifest's external-data file names for this graph (already checked to be plain
/// relative names).
fn check_graph_file(
    model_dir: &Path,
    graph_file: &Path,
    listed: &[&str],
) -> Result<OnnxInfo, String> {
    let dir = fs::canonicalize(model_dir)
        .map_err(|e| format!("cannot resolve the model directory: {e}"))?;
    let graph_len = check_plain_file(&dir, graph_file)?;
    let file = fs::File::open(graph_file).map_err(|e| format!("{}: {e}", graph_file.display()))?;
    let info = onnx_file::inspect(BufReader::new(file), graph_len)
        .map_err(|e| format!("{}: {e}", graph_file.display()))?;
    if info.external.is_empty() {
        return Ok(info);
    }
    let base = graph_file.parent().unwrap_or(model_dir);
    let listed: HashSet<PathBuf> = listed
        .iter()
        .filter_map(|name| fs::canonicalize(model_dir.join(name)).ok())
        .collect();
    for ext in &info.external {
        let context = |reason: String| {
            format!(
                "{}: tensor {:?} has external data {:?}: {reason}",
                graph_file.display(),
                ext.tensor,
                ext.location
            )
        };
        let path = check_location(base, &ext.location).map_err(context)?;
        let size = check_plain_file(&dir, &path).map_err(context)?;
        let canonical = fs::canonicalize(&path).map_err(|e| context(e.to_string()))?;
        if !listed.contains(&canonical) {
            return Err(context(
                "the file is not listed in the manifest's external_data (so its sha256 is not verified)"
                    .into(),
            ));
        }
        let end = match ext.length {
            Some(length) => ext.offset.checked_add(length),
            None => Some(ext.offset),
        };
        if end.is_none_or(|end| end > size) {
            return Err(context(format!(
                "offset {} + length {} is beyond the file's {size} bytes",
                ext.offset,
                ext.length.map_or("(rest)".into(), |l| l.to_string())
            )));
        }
    }
    Ok(info)
}

/// A location must be a plain relative path: no root, drive prefix, `..`, NUL or backslash.
fn check_location(base: &Path, location: &str) -> Result<PathBuf, String> {
    if location.is_empty() {
        return Err("the location is empty".into());
    }
    if location.contains('\0') || location.contains('\\') {
        return Err("the location contains a NUL byte or a backslash".into());
    }
    let rel = Path::new(location);
    for component in rel.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("the location contains a \"..\" component".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("the location is an absolute path".into())
            }
        }
    }
    Ok(base.join(rel))
}

/// A file the runtime reads from a model directory must be a regular file (not a symlink), have a single
/// link (a hard link can alias a file outside), and resolve to a path inside `canonical_dir` with no
/// symlinked directory on the way. Returns its size.
fn check_plain_file(canonical_dir: &Path, path: &Path) -> Result<u64, String> {
    let meta = fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.file_type().is_symlink() {
        return Err(format!("{} is a symbolic link", path.display()));
    }
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.nlink() > 1 {
            return Err(format!(
                "{} has {} hard links (a hard link can alias a file outside the model directory)",
                path.display(),
                meta.nlink()
            ));
        }
    }
    let canonical = fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !canonical.starts_with(canonical_dir) {
        return Err(format!(
            "{} resolves to {}, outside the model directory {}",
            path.display(),
            canonical.display(),
            canonical_dir.display()
        ));
    }
    Ok(meta.len())
}

/// ONNX `TensorProto.DataType` of a manifest dtype.
fn onnx_elem_type(dtype: TensorDtype) -> u64 {
    match dtype {
        TensorDtype::Float32 => 1,
        TensorDtype::Int64 => 7,
        TensorDtype::Float16 => 10,
    }
}

fn onnx_type_name(elem_type: u64) -> String {
    match elem_type {
        1 => "float32".into(),
        7 => "int64".into(),
        10 => "float16".into(),
        11 => "float64".into(),
        6 => "int32".into(),
        16 => "bfloat16".into(),
        other => format!("ONNX type {other}"),
    }
}

/// The manifest's tensors against the graph's declared inputs and outputs: every listed name must be
/// declared, with the same dtype and rank, and every dim fixed on both sides must agree.
fn check_graph_io(spec: &GraphSpec, info: &OnnxInfo) -> Result<(), String> {
    let sides = [
        ("input", &spec.inputs, &info.inputs),
        ("output", &spec.outputs, &info.outputs),
    ];
    for (side, expected, declared) in sides {
        for tensor in expected {
            let Some(found) = declared.iter().find(|v| v.name == tensor.name) else {
                return Err(format!(
                    "the manifest lists {side} {:?}, the graph declares no {side} of that name",
                    tensor.name
                ));
            };
            check_value(side, tensor, found)?;
        }
    }
    Ok(())
}

fn check_value(side: &str, tensor: &TensorSpec, found: &ValueInfo) -> Result<(), String> {
    let name = &tensor.name;
    let want = onnx_elem_type(tensor.dtype);
    if let Some(elem) = found.elem_type {
        if elem != want {
            return Err(format!(
                "{side} {name:?}: the manifest says {}, the graph declares {}",
                tensor.dtype,
                onnx_type_name(elem)
            ));
        }
    }
    let Some(dims) = &found.shape else {
        return Ok(());
    };
    let show = |dims: &[Option<i64>]| {
        let parts: Vec<String> = dims
            .iter()
            .map(|d| d.map_or("?".into(), |n| n.to_string()))
            .collect();
        format!("[{}]", parts.join(", "))
    };
    let manifest_shape = || {
        let parts: Vec<String> = tensor.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", parts.join(", "))
    };
    if dims.len() != tensor.shape.len() {
        return Err(format!(
            "{side} {name:?}: the manifest's shape {} has rank {}, the graph declares {} (rank {})",
            manifest_shape(),
            tensor.shape.len(),
            show(dims),
            dims.len()
        ));
    }
    for (axis, (expected, declared)) in tensor.shape.iter().zip(dims).enumerate() {
        if let (Dim::Fixed(e), Some(d)) = (expected, declared) {
            if e != d {
                return Err(format!(
                    "{side} {name:?}: dim {axis} is {e} in the manifest ({}), {d} in the graph ({})",
                    manifest_shape(),
                    show(dims)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx_file::proto_builder::{bytes_field, external_tensor, model_with_graph};

    /// A temporary model directory with one graph file referencing `location`.
    struct Fixture {
        root: PathBuf,
        dir: PathBuf,
    }

    impl Fixture {
        fn new(tag: &str) -> Fixture {
            let root = std::env::temp_dir()
                .join(format!("llama3v-model-dir-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            let dir = root.join("model");
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
            fs::write(dir.join("w.data"), [0u8; 64]).unwrap_or_else(|e| panic!("{e}"));
            fs::write(root.join("secret"), [7u8; 64]).unwrap_or_else(|e| panic!("{e}"));
            Fixture { root, dir }
        }

        fn check(&self, entries: &[(&str, &str)], listed: &[&str]) -> Result<OnnxInfo, String> {
            let model = model_with_graph(&bytes_field(5, &external_tensor("w", entries)));
            let graph = self.dir.join("g.onnx");
            fs::write(&graph, model).unwrap_or_else(|e| panic!("{e}"));
            check_graph_file(&self.dir, &graph, listed)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn references_outside_the_directory_are_refused() {
        let fx = Fixture::new("outside");
        let secret = fx.root.join("secret");
        std::os::unix::fs::symlink(&secret, fx.dir.join("link.data"))
            .unwrap_or_else(|e| panic!("{e}"));
        fs::hard_link(&secret, fx.dir.join("hard.data")).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&fx.root, fx.dir.join("up")).unwrap_or_else(|e| panic!("{e}"));
        let abs = secret.display().to_string();
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![("location", abs.as_str())], "absolute path"),
            (vec![("location", "../secret")], "\"..\" component"),
            (vec![("location", "sub/../../secret")], "\"..\" component"),
            (vec![("location", "link.data")], "symbolic link"),
            (vec![("location", "hard.data")], "hard links"),
            (
                vec![("location", "up/secret")],
                "outside the model directory",
            ),
            (vec![("location", "missing.data")], "No such file"),
            (
                vec![("location", "w.data"), ("offset", "60"), ("length", "8")],
                "beyond the file's 64 bytes",
            ),
            (
                vec![("location", "w.data"), ("offset", "65")],
                "beyond the file's 64 bytes",
            ),
            (
                vec![
                    ("location", "w.data"),
                    ("offset", "18446744073709551615"),
                    ("length", "2"),
                ],
                "beyond",
            ),
            (vec![("location", "w.data\\..\\x")], "backslash"),
        ];
        let listed = ["w.data", "link.data", "hard.data", "up/secret"];
        for (entries, message) in cases {
            match fx.check(&entries, &listed) {
                Err(e) => assert!(e.contains(message), "{entries:?}: {e}"),
                Ok(_) => panic!("{entries:?} accepted"),
            }
        }
        // An unlisted file inside the directory is refused too: its hash would not be verified.
        fs::write(fx.dir.join("other.data"), [0u8; 8]).unwrap_or_else(|e| panic!("{e}"));
        let err = fx.check(&[("location", "other.data")], &listed).err();
        assert!(
            err.as_deref().is_some_and(|e| e.contains("not listed")),
            "{err:?}"
        );
        // The well-formed reference passes.
        let ok = fx.check(
            &[("location", "w.data"), ("offset", "32"), ("length", "32")],
            &listed,
        );
        assert!(ok.is_ok(), "{ok:?}");
    }
}
