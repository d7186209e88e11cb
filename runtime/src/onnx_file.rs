//! What the runtime reads out of an `.onnx` file itself, before ONNX Runtime ever opens it: every
//! external-data reference and the main graph's declared inputs and outputs. What is allowed (the file
//! policy, the comparison with the manifest) lives in `model_dir`; this module only reads.
//!
//! ONNX Runtime follows a tensor's external-data `location` wherever it points and reads
//! `offset`/`length` bytes from it; a hostile model directory can use that to read files outside it
//! (CVE-2022-25882, CVE-2024-27318 and the later bypasses through symlinks and hard links). So every
//! tensor with external data is found: initializers, tensors in node attributes, in subgraphs of any
//! depth, in functions and in sparse initializers.
//!
//! The walker reads protobuf wire format directly for the few fields it needs (protoc and generated
//! code would be a build dependency for ~20 field numbers). It is bounded: nesting depth, string
//! lengths and reference counts are capped, every length is checked against its enclosing message,
//! and it never allocates more than it has read. It streams through the file, seeking over payloads
//! (weights are never held in memory).

use std::io::{Read, Seek};

/// Deeper than protobuf's own default recursion limit (100) is refused.
const MAX_DEPTH: usize = 100;
/// Names, locations and entry values longer than this are refused (paths are short).
const MAX_STRING: u64 = 64 * 1024;
/// Cap on references and declared inputs/outputs collected from one file.
const MAX_ITEMS: usize = 1_000_000;

/// `TensorProto.DataLocation.EXTERNAL`.
const DATA_LOCATION_EXTERNAL: u64 = 1;

/// One tensor whose data lives in another file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    pub tensor: String,
    pub location: String,
    pub offset: u64,
    pub length: Option<u64>,
}

/// A declared graph input or output: name, ONNX element type and dims (`None` for a symbolic or unknown
/// dim). `shape` is `None` when the graph gives no shape at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: Option<u64>,
    pub shape: Option<Vec<Option<i64>>>,
}

/// What [`inspect`] finds in a model file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnnxInfo {
    pub external: Vec<ExternalRef>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

/// Walks an ONNX ModelProto in memory; see [`inspect`].
pub fn inspect_bytes(bytes: &[u8]) -> Result<OnnxInfo, String> {
    inspect(std::io::Cursor::new(bytes), bytes.len() as u64)
}

/// Walks an ONNX ModelProto of `len` bytes from `reader`: every external-data reference and the main
/// graph's declared inputs and outputs. Malformed protobuf is an error naming the byte offset.
pub fn inspect<R: Read + Seek>(reader: R, len: u64) -> Result<OnnxInfo, String> {
    let mut walker = Walker {
        reader,
        pos: 0,
        info: OnnxInfo::default(),
    };
    walker.model(len)?;
    Ok(walker.info)
}

struct Walker<R> {
    reader: R,
    pos: u64,
    info: OnnxInfo,
}

/// Which declared-value list a ValueInfoProto goes to (only the main graph's count).
#[derive(Clone, Copy)]
enum Side {
    Input,
    Output,
}

struct Field {
    number: u64,
    wire: u8,
}

impl<R: Read + Seek> Walker<R> {
    fn error(&self, what: &str) -> String {
        format!("malformed ONNX protobuf at byte {}: {what}", self.pos)
    }

    fn byte(&mut self, end: u64) -> Result<u8, String> {
        if self.pos >= end {
            return Err(self.error("field runs past the end of its message"));
        }
        let mut b = [0u8; 1];
        self.reader
            .read_exact(&mut b)
            .map_err(|e| self.error(&format!("read failed: {e}")))?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self, end: u64) -> Result<u64, String> {
        let mut value = 0u64;
        for i in 0..10 {
            let b = self.byte(end)?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error("varint longer than 10 bytes"))
    }

    /// The next field's tag, or `None` at the end of the message.
    fn field(&mut self, end: u64) -> Result<Option<Field>, String> {
        if self.pos == end {
            return Ok(None);
        }
        let tag = self.varint(end)?;
        let number = tag >> 3;
        if number == 0 {
            return Err(self.error("field number 0"));
        }
        Ok(Some(Field {
            number,
            wire: (tag & 7) as u8,
        }))
    }

    /// Reads a length prefix; returns where the length-delimited payload ends.
    fn payload_end(&mut self, end: u64) -> Result<u64, String> {
        let len = self.varint(end)?;
        match self.pos.checked_add(len) {
            Some(payload_end) if payload_end <= end => Ok(payload_end),
            _ => Err(self.error(&format!("length {len} runs past the end of its message"))),
        }
    }

    fn seek_to(&mut self, target: u64) -> Result<(), String> {
        if target != self.pos {
            // Relative seeks keep a BufReader's buffer when the target is inside it.
            let delta = i64::try_from(i128::from(target) - i128::from(self.pos))
                .map_err(|_| self.error("seek out of range"))?;
            self.reader
                .seek_relative(delta)
                .map_err(|e| self.error(&format!("seek failed: {e}")))?;
            self.pos = target;
        }
        Ok(())
    }

    fn skip(&mut self, wire: u8, end: u64) -> Result<(), String> {
        let target = match wire {
            0 => return self.varint(end).map(|_| ()),
            1 => self.pos.saturating_add(8),
            2 => self.payload_end(end)?,
            5 => self.pos.saturating_add(4),
            _ => return Err(self.error(&format!("unsupported wire type {wire}"))),
        };
        if target > end {
            return Err(self.error("fixed-width field runs past the end of its message"));
        }
        self.seek_to(target)
    }

    fn string(&mut self, end: u64) -> Result<String, String> {
        let payload_end = self.payload_end(end)?;
        let len = payload_end - self.pos;
        if len > MAX_STRING {
            return Err(self.error(&format!("string of {len} bytes (limit {MAX_STRING})")));
        }
        let mut buf = vec![0u8; len as usize];
        self.reader
            .read_exact(&mut buf)
            .map_err(|e| self.error(&format!("read failed: {e}")))?;
        self.pos = payload_end;
        String::from_utf8(buf).map_err(|_| self.error("string is not UTF-8"))
    }

    /// Calls `visit` for each field of the message ending at `end`; `visit` returns `false` for a field
    /// it did not consume, which is then skipped.
    fn message(
        &mut self,
        end: u64,
        depth: usize,
        mut visit: impl FnMut(&mut Self, &Field, u64, usize) -> Result<bool, String>,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(self.error(&format!("messages nested deeper than {MAX_DEPTH}")));
        }
        while let Some(field) = self.field(end)? {
            if !visit(self, &field, end, depth + 1)? {
                self.skip(field.wire, end)?;
            }
        }
        Ok(())
    }

    /// Runs `walk` over an embedded message field (wire type 2) and leaves the reader after it.
    fn embedded(
        &mut self,
        end: u64,
        depth: usize,
        walk: fn(&mut Self, u64, usize) -> Result<(), String>,
    ) -> Result<bool, String> {
        let sub_end = self.payload_end(end)?;
        walk(self, sub_end, depth)?;
        self.seek_to(sub_end)?;
        Ok(true)
    }

    fn model(&mut self, end: u64) -> Result<(), String> {
        self.message(end, 0, |w, f, end, depth| match (f.number, f.wire) {
            // graph: only the main graph's declared inputs/outputs are the session's.
            (7, 2) => w.embedded(end, depth, Self::main_graph),
            // training_info: initialization(1) and algorithm(2) graphs.
            (20, 2) => w.embedded(end, depth, Self::training_info),
            // functions: FunctionProto.node(7).
            (25, 2) => w.embedded(end, depth, Self::function),
            _ => Ok(false),
        })
    }

    fn main_graph(&mut self, end: u64, depth: usize) -> Result<(), String> {
        self.graph_fields(end, depth, true)
    }

    fn graph(&mut self, end: u64, depth: usize) -> Result<(), String> {
        self.graph_fields(end, depth, false)
    }

    fn graph_fields(&mut self, end: u64, depth: usize, main: bool) -> Result<(), String> {
        self.message(end, depth, |w, f, end, depth| match (f.number, f.wire) {
            (1, 2) => w.embedded(end, depth, Self::node),
            (5, 2) => w.embedded(end, depth, Self::tensor),
            (15, 2) => w.embedded(end, depth, Self::sparse_tensor),
            (11, 2) if main => w.value_info(end, depth, Side::Input),
            (12, 2) if main => w.value_info(end, depth, Side::Output),
            _ => Ok(false),
        })
    }

    fn training_info(&mut self, end: u64, depth: usize) -> Result<(), String> {
        self.message(end, depth, |w, f, end, depth| match (f.number, f.wire) {
            (1 | 2, 2) => w.embedded(end, depth, Self::graph),
            _ => Ok(false),
        })
    }

    fn function(&mut self, end: u64, depth: usize) -> Result<(), String> {
        self.message(end, depth, |w, f, end, depth| match (f.number, f.wire) {
            (7, 2) => w.embedded(end, depth, Self::node),
            _ => Ok(false),
        })
    }

    fn node(&mut self, end: u64, depth: usize) -> Result<(), String> {
        self.message(end, depth, |w, f, end, depth| match (f.number, f.wire) {
            (5, 2) => w.embedded(end, depth, Self::attribute),
            _ => Ok(false),
        })
    }

    fn attribute(&mut self, end: u64, depth: usize) -> Result<(), String> {
        self.message(end, depth, |w, f, end, depth| match (f.number, f.wire) {
            // t, tensors
            (5 | 10, 2) => w.embedded(end, depth, Self::tensor),
            // g, graphs
            (6 | 11, 2) => w.embedded(end, depth, Self::graph),
            // sparse_tensor, sparse_tensors
            (22 | 23, 2) => w.embedded(end, depth, Self::sparse_tensor),
            _ => Ok(false),
        })
    }

    fn sparse_tensor(&mut self, end: u64, depth: usize) -> Result<(), String> {
        self.message(end, depth, |w, f, end, depth| match (f.number, f.wire) {
            // values, indices
            (1 | 2, 2) => w.embedded(end, depth, Self::tensor),
            _ => Ok(false),
        })
    }

    fn tensor(&mut self, end: u64, depth: usize) -> Result<(), String> {
        let start = self.pos;
        let mut name = String::new();
        let mut entries: Vec<(String, String)> = Vec::new();
        let mut location_external = false;
        self.message(end, depth, |w, f, end, _| match (f.number, f.wire) {
            (8, 2) => {
                name = w.string(end)?;
                Ok(true)
            }
            (13, 2) => {
                let entry_end = w.payload_end(end)?;
                let (mut key, mut value) = (String::new(), String::new());
                while let Some(ef) = w.field(entry_end)? {
                    match (ef.number, ef.wire) {
                        (1, 2) => key = w.string(entry_end)?,
                        (2, 2) => value = w.string(entry_end)?,
                        _ => w.skip(ef.wire, entry_end)?,
                    }
                }
                if entries.len() >= 64 {
                    return Err(w.error("more than 64 external_data entries on one tensor"));
                }
                entries.push((key, value));
                Ok(true)
            }
            (14, 0) => {
                // Last one wins, as in protobuf.
                location_external = w.varint(end)? == DATA_LOCATION_EXTERNAL;
                Ok(true)
            }
            _ => Ok(false),
        })?;
        // Entries are checked whether or not data_location says EXTERNAL: a reader that merges
        // messages, or a later ONNX version, may follow them either way.
        if entries.is_empty() && !location_external {
            return Ok(());
        }
        let tensor = if name.is_empty() {
            format!("(unnamed tensor at byte {start})")
        } else {
            name
        };
        let external = external_ref(tensor, &entries)?;
        if self.info.external.len() >= MAX_ITEMS {
            return Err(self.error("too many external-data tensors"));
        }
        self.info.external.push(external);
        Ok(())
    }

    fn value_info(&mut self, end: u64, depth: usize, side: Side) -> Result<bool, String> {
        let vi_end = self.payload_end(end)?;
        let mut info = ValueInfo {
            name: String::new(),
            elem_type: None,
            shape: None,
        };
        self.message(vi_end, depth, |w, f, end, depth| match (f.number, f.wire) {
            (1, 2) => {
                info.name = w.string(end)?;
                Ok(true)
            }
            // TypeProto.tensor_type(1) -> TypeProto.Tensor
            (2, 2) => {
                let type_end = w.payload_end(end)?;
                w.message(type_end, depth, |w, f, end, depth| {
                    match (f.number, f.wire) {
                        (1, 2) => {
                            let tensor_end = w.payload_end(end)?;
                            w.tensor_type(tensor_end, depth, &mut info)?;
                            w.seek_to(tensor_end)?;
                            Ok(true)
                        }
                        _ => Ok(false),
                    }
                })?;
                Ok(true)
            }
            _ => Ok(false),
        })?;
        let list = match side {
            Side::Input => &mut self.info.inputs,
            Side::Output => &mut self.info.outputs,
        };
        if list.len() >= MAX_ITEMS {
            return Err(self.error("too many graph inputs or outputs"));
        }
        list.push(info);
        self.seek_to(vi_end)?;
        Ok(true)
    }

    /// TypeProto.Tensor: elem_type(1), shape(2) -> TensorShapeProto.dim(1) -> dim_value(1) | dim_param(2).
    fn tensor_type(&mut self, end: u64, depth: usize, info: &mut ValueInfo) -> Result<(), String> {
        self.message(end, depth, |w, f, end, depth| match (f.number, f.wire) {
            (1, 0) => {
                info.elem_type = Some(w.varint(end)?);
                Ok(true)
            }
            (2, 2) => {
                let shape_end = w.payload_end(end)?;
                let mut dims = Vec::new();
                w.message(shape_end, depth, |w, f, end, depth| {
                    match (f.number, f.wire) {
                        (1, 2) => {
                            let dim_end = w.payload_end(end)?;
                            let mut value = None;
                            w.message(dim_end, depth, |w, f, end, _| match (f.number, f.wire) {
                                (1, 0) => {
                                    // int64 on the wire: two's complement in a varint.
                                    value = Some(w.varint(end)? as i64);
                                    Ok(true)
                                }
                                (2, 2) => {
                                    w.string(end)?;
                                    value = None;
                                    Ok(true)
                                }
                                _ => Ok(false),
                            })?;
                            if dims.len() >= 64 {
                                return Err(w.error("tensor of rank over 64"));
                            }
                            dims.push(value);
                            Ok(true)
                        }
                        _ => Ok(false),
                    }
                })?;
                info.shape = Some(dims);
                Ok(true)
            }
            _ => Ok(false),
        })
    }
}

/// The reference a tensor's external_data entries make; refuses duplicate or malformed entries.
fn external_ref(tensor: String, entries: &[(String, String)]) -> Result<ExternalRef, String> {
    let mut location = None;
    let mut offset = None;
    let mut length = None;
    for (key, value) in entries {
        let slot = match key.as_str() {
            "location" => &mut location,
            "offset" => &mut offset,
            "length" => &mut length,
            _ => continue,
        };
        // Readers disagree on whether the first or the last duplicate wins; accept neither.
        if slot.replace(value.clone()).is_some() {
            return Err(format!(
                "tensor {tensor:?}: external_data has {key:?} more than once"
            ));
        }
    }
    let Some(location) = location else {
        return Err(format!(
            "tensor {tensor:?}: external data without a \"location\""
        ));
    };
    let number = |key: &str, value: Option<String>| -> Result<Option<u64>, String> {
        value
            .map(|v| {
                // Plain decimal only: what ONNX writes; signs, spaces and hex are refused.
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "tensor {tensor:?}: external_data {key} {v:?} is not a non-negative integer"
                    ));
                }
                v.parse::<u64>().map_err(|_| {
                    format!("tensor {tensor:?}: external_data {key} {v:?} is out of range")
                })
            })
            .transpose()
    };
    let offset = number("offset", offset)?.unwrap_or(0);
    let length = number("length", length)?;
    Ok(ExternalRef {
        tensor,
        location,
        offset,
        length,
    })
}

/// Hand-built ONNX protobuf for tests (here and in `model_dir`).
#[cfg(test)]
pub(crate) mod proto_builder {
    /// Minimal protobuf encoding for hand-built ONNX files.
    pub(crate) fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub(crate) fn bytes_field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(number << 3 | 2, &mut out);
        varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    pub(crate) fn varint_field(number: u64, value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(number << 3, &mut out);
        varint(value, &mut out);
        out
    }

    pub(crate) fn entry(key: &str, value: &str) -> Vec<u8> {
        let mut e = bytes_field(1, key.as_bytes());
        e.extend(bytes_field(2, value.as_bytes()));
        bytes_field(13, &e)
    }

    /// A TensorProto with raw data and the given external_data entries, marked EXTERNAL.
    pub(crate) fn external_tensor(name: &str, entries: &[(&str, &str)]) -> Vec<u8> {
        let mut t = varint_field(1, 2); // dims
        t.extend(varint_field(2, 1)); // data_type FLOAT
        t.extend(bytes_field(8, name.as_bytes()));
        t.extend(bytes_field(9, &[0u8; 16])); // raw_data, skipped by the walker
        for (k, v) in entries {
            t.extend(entry(k, v));
        }
        t.extend(varint_field(14, 1));
        t
    }

    pub(crate) fn model_with_graph(graph: &[u8]) -> Vec<u8> {
        let mut m = varint_field(1, 8); // ir_version
        m.extend(bytes_field(7, graph));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::proto_builder::*;
    use super::*;

    fn refs(bytes: &[u8]) -> Vec<ExternalRef> {
        match inspect_bytes(bytes) {
            Ok(info) => info.external,
            Err(e) => panic!("walk failed: {e}"),
        }
    }

    #[test]
    fn finds_initializer_references() {
        let t = external_tensor(
            "w",
            &[("location", "w.data"), ("offset", "4096"), ("length", "8")],
        );
        let found = refs(&model_with_graph(&bytes_field(5, &t)));
        assert_eq!(
            found,
            vec![ExternalRef {
                tensor: "w".into(),
                location: "w.data".into(),
                offset: 4096,
                length: Some(8),
            }]
        );
    }

    #[test]
    fn finds_references_in_attributes_subgraphs_sparse_and_functions() {
        let t = |loc: &str| external_tensor(loc, &[("location", loc)]);
        // Constant node: attribute.t
        let mut attr_t = bytes_field(1, b"value");
        attr_t.extend(bytes_field(5, &t("attr_t")));
        // If node: attribute.g holding a graph with an initializer, nested in attribute.graphs.
        let inner_graph = bytes_field(5, &t("subgraph_init"));
        let mut attr_g = bytes_field(6, &inner_graph);
        attr_g.extend(bytes_field(11, &bytes_field(5, &t("graphs_init"))));
        attr_g.extend(bytes_field(10, &t("attr_tensors")));
        // Sparse initializer: values and indices.
        let mut sparse = bytes_field(1, &t("sparse_values"));
        sparse.extend(bytes_field(2, &t("sparse_indices")));
        let mut node = bytes_field(5, &attr_t);
        node.extend(bytes_field(5, &attr_g));
        let mut graph = bytes_field(1, &node);
        graph.extend(bytes_field(15, &sparse));
        let mut model = model_with_graph(&graph);
        // FunctionProto.node(7) with a Constant attribute.
        model.extend(bytes_field(
            25,
            &bytes_field(
                7,
                &bytes_field(5, &{
                    let mut a = bytes_field(1, b"value");
                    a.extend(bytes_field(5, &t("function_const")));
                    a
                }),
            ),
        ));
        // TrainingInfoProto.initialization(1)
        model.extend(bytes_field(
            20,
            &bytes_field(1, &bytes_field(5, &t("training_init"))),
        ));
        let mut names: Vec<String> = refs(&model).into_iter().map(|r| r.location).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "attr_t",
                "attr_tensors",
                "function_const",
                "graphs_init",
                "sparse_indices",
                "sparse_values",
                "subgraph_init",
                "training_init"
            ]
        );
    }

    #[test]
    fn entries_count_even_without_the_external_flag() {
        let mut t = bytes_field(8, b"sneaky");
        t.extend(entry("location", "/etc/passwd"));
        let found = refs(&model_with_graph(&bytes_field(5, &t)));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].location, "/etc/passwd");
    }

    #[test]
    fn malformed_references_are_refused() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[], "without a \"location\""),
            (&[("location", "a"), ("location", "b")], "more than once"),
            (
                &[("location", "a"), ("offset", "-1")],
                "not a non-negative integer",
            ),
            (
                &[("location", "a"), ("length", "0x10")],
                "not a non-negative integer",
            ),
            (
                &[("location", "a"), ("offset", "99999999999999999999999")],
                "out of range",
            ),
        ];
        for (entries, message) in cases {
            let model = model_with_graph(&bytes_field(5, &external_tensor("t", entries)));
            match inspect_bytes(&model) {
                Err(e) => assert!(e.contains(message), "{entries:?}: {e}"),
                Ok(info) => panic!("{entries:?} accepted: {info:?}"),
            }
        }
    }

    #[test]
    fn hostile_protobuf_is_an_error_not_a_panic() {
        let mut deep = bytes_field(5, &external_tensor("t", &[("location", "x")]));
        // Graph -> node -> attribute.g -> graph ... far past the depth limit.
        for _ in 0..200 {
            let attr = bytes_field(6, &deep);
            let node = bytes_field(5, &attr);
            deep = bytes_field(1, &node);
        }
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("too deep", model_with_graph(&deep)),
            (
                "length past the end",
                vec![0x3a, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2],
            ),
            ("truncated varint", vec![0x08, 0xff]),
            ("11-byte varint", {
                let mut v = vec![0x08];
                v.extend([0xff; 11]);
                v
            }),
            ("group wire type", vec![0x0b]),
            ("field number 0", vec![0x00, 0x01]),
            ("huge string", {
                let mut t = varint_field(1, 0);
                t.truncate(0);
                let mut s = Vec::new();
                varint(8 << 3 | 2, &mut s);
                varint(1 << 20, &mut s);
                s.extend(vec![b'a'; 1 << 20]);
                model_with_graph(&bytes_field(5, &s))
            }),
        ];
        for (name, bytes) in cases {
            assert!(inspect_bytes(&bytes).is_err(), "{name}: accepted");
        }
        // Unknown fields of every wire type are skipped.
        let mut unknown = varint_field(99, 5);
        unknown.extend([0x91, 0x06, 1, 2, 3, 4, 5, 6, 7, 8]); // field 98, fixed64
        unknown.extend([0x85, 0x06, 1, 2, 3, 4]); // field 96, fixed32
        unknown.extend(bytes_field(97, b"xyz"));
        assert_eq!(inspect_bytes(&unknown), Ok(OnnxInfo::default()));
    }

    #[test]
    fn reads_declared_inputs_and_outputs_of_the_main_graph() {
        // ValueInfoProto{name, type{tensor_type{elem_type 1, shape{dim{param "batch"}, dim{value 3}}}}}
        let mut shape = bytes_field(1, &bytes_field(2, b"batch"));
        shape.extend(bytes_field(1, &varint_field(1, 3)));
        let mut tensor_type = varint_field(1, 1);
        tensor_type.extend(bytes_field(2, &shape));
        let mut vi = bytes_field(1, b"pixel_values");
        vi.extend(bytes_field(2, &bytes_field(1, &tensor_type)));
        let mut graph = bytes_field(11, &vi);
        graph.extend(bytes_field(12, &bytes_field(1, b"out")));
        let info = inspect_bytes(&model_with_graph(&graph)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            info.inputs,
            vec![ValueInfo {
                name: "pixel_values".into(),
                elem_type: Some(1),
                shape: Some(vec![None, Some(3)]),
            }]
        );
        assert_eq!(info.outputs[0].name, "out");
        assert_eq!(info.outputs[0].shape, None);
    }
}
