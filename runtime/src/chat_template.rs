//! Chat templates: renders a conversation to the prompt text the way transformers'
//! `apply_chat_template` does, with minijinja standing in for jinja2.
//!
//! What transformers 5 does (`utils/chat_template_utils.py`, `_compile_jinja_template` and
//! `render_jinja_template`), and how it is mirrored here:
//! - jinja2 `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
//!   extension; `keep_trailing_newline` is jinja2's default (false), which is minijinja's default too.
//! - jinja2's default `Undefined` (lenient: prints as "", is falsy, iterates as empty; attribute access on
//!   it is an error) = minijinja's `UndefinedBehavior::Lenient`.
//! - Globals `raise_exception(msg)` and `strftime_now(fmt)`; a `tojson` filter that is `json.dumps`
//!   (`ensure_ascii=False`, optional `indent`, `separators`, `sort_keys`), not jinja2's HTML-escaping one.
//! - Template variables: `messages`, `tools` (none), `documents` (none), `add_generation_prompt`, and the
//!   special tokens (`bos_token`, `eos_token`).
//! - Python string methods (`.strip()`, `.split()`, `.startswith()`, dict `.items()`, ...) via minijinja's
//!   pycompat callback; `strip`/`lstrip`/`rstrip`/`split()` and the `trim` filter use Python's notion of
//!   whitespace (which also counts U+001C..U+001F).
//! - Printing a value uses Python's `str()`: `None`, `True`, `['a', 1]`, `{'type': 'text'}`, `1e+16`.
//!
//! Known gaps (jinja2 features chat templates do not use in practice): `~` concatenation and the
//! `string` filter use minijinja's formatting of lists and floats; `strftime_now` formats UTC, where
//! Python formats local time; the `{% generation %}` tag (assistant-mask tracking) is not supported.

use chrono::format::{Item, StrftimeItems};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State, UndefinedBehavior};
use serde::{Serialize, Serializer};
use serde_json::ser::Formatter;

use crate::error::{Error, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// Instructions one render may run (minijinja's fuel). Rendering Llama-3.1's template for a
/// conversation spends 34 a message (`renders_run_under_fuel_and_output_limits` prints it), and the
/// whole budget runs in about 0.55 s; a template that loops without end stops here instead.
pub const MAX_RENDER_FUEL: u64 = 5_000_000;
/// Bytes a render may write beyond twice its messages' own text: a template adds headers and special
/// tokens (a few hundred bytes a message), not megabytes, so a template that multiplies a string stops
/// here instead of filling memory.
pub const RENDER_OUTPUT_ALLOWANCE: usize = 1 << 20;

/// One part of a message's content, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentPart {
    Text(String),
    /// An image placeholder: the template decides what it renders to (e.g. `<image>`).
    Image,
}

/// One chat message. The template sees `content` as a list of `{"type": "text", "text": ...}` and
/// `{"type": "image"}` dicts, as transformers passes multimodal content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    /// A message with a single text part.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: vec![ContentPart::Text(text.into())],
        }
    }

    fn to_value(&self) -> Value {
        let parts: Vec<Value> = self
            .content
            .iter()
            .map(|part| match part {
                ContentPart::Text(text) => Value::from_iter([
                    ("type", Value::from("text")),
                    ("text", Value::from(text.as_str())),
                ]),
                ContentPart::Image => Value::from_iter([("type", Value::from("image"))]),
            })
            .collect();
        Value::from_iter([
            ("role", Value::from(self.role.as_str())),
            ("content", Value::from(parts)),
        ])
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (jinja). Syntax errors are reported here, not at render time.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_fuel(Some(MAX_RENDER_FUEL));
        env.set_unknown_method_callback(unknown_method);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_filter("trim", trim_filter);
        env.add_filter("length", length_filter);
        env.add_filter("count", length_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant header (if the template does).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let text_bytes = messages
            .iter()
            .flat_map(|m| &m.content)
            .map(|part| match part {
                ContentPart::Text(text) => text.len(),
                ContentPart::Image => 0,
            })
            .sum::<usize>();
        let messages: Vec<Value> = messages.iter().map(ChatMessage::to_value).collect();
        self.render_value(Value::from(messages), add_generation_prompt, text_bytes)
    }

    /// Renders messages given as JSON text, passed to the template as they are — as transformers does
    /// with the dicts it is given. This is for content `render` cannot express: plain-string `content`
    /// (which templates like Llama-3.1's expect), `tool_calls`, extra keys. Object key order is kept.
    /// Keys whose value is `null` are dropped, as transformers' `_normalize_chat_messages` does.
    pub fn render_json(&self, messages_json: &str, add_generation_prompt: bool) -> Result<String> {
        let parsed: Value = serde_json::from_str(messages_json)
            .map_err(|e| Error::ChatTemplate(format!("messages are not valid JSON: {e}")))?;
        if parsed.kind() != ValueKind::Seq {
            return Err(Error::ChatTemplate(format!(
                "messages must be a JSON list of objects, got a {}",
                parsed.kind()
            )));
        }
        let mut messages = Vec::new();
        for (i, message) in parsed.try_iter().map_err(template_error)?.enumerate() {
            if message.kind() != ValueKind::Map {
                return Err(Error::ChatTemplate(format!(
                    "message {i} must be a JSON object, got a {}",
                    message.kind()
                )));
            }
            let mut kept = Vec::new();
            for key in message.try_iter().map_err(template_error)? {
                let value = message.get_item(&key).map_err(template_error)?;
                if !value.is_none() {
                    kept.push((key, value));
                }
            }
            messages.push(Value::from_iter(kept));
        }
        self.render_value(
            Value::from(messages),
            add_generation_prompt,
            messages_json.len(),
        )
    }

    /// Renders under the limits: [`MAX_RENDER_FUEL`] instructions, and an output of at most twice
    /// `input_bytes` plus [`RENDER_OUTPUT_ALLOWANCE`].
    fn render_value(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        input_bytes: usize,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let ctx = Value::from_iter([
            ("messages", messages),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
        ]);
        let limit = input_bytes
            .saturating_mul(2)
            .saturating_add(RENDER_OUTPUT_ALLOWANCE);
        let mut out = CappedOutput {
            bytes: Vec::new(),
            limit,
            exceeded: false,
        };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|e| Error::ChatTemplate(format!("rendered text is not UTF-8: {e}"))),
            Err(_) if out.exceeded => Err(Error::ChatTemplate(format!(
                "the rendered prompt is over the limit of {limit} bytes (twice the messages' \
                 {input_bytes} bytes plus {RENDER_OUTPUT_ALLOWANCE})"
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::ChatTemplate(format!(
                "rendering ran over the limit of {MAX_RENDER_FUEL} template instructions"
            ))),
            Err(e) => Err(template_error(e)),
        }
    }
}

/// The render's output, refused past `limit` bytes (the render then stops with a write error).
struct CappedOutput {
    bytes: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_error(e: minijinja::Error) -> Error {
    // minijinja's Display already names the template and line; `detail` is folded into it.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        msg.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    Error::ChatTemplate(msg)
}

// ---------------------------------------------------------------------------------------------------
// Globals and filters transformers adds.

/// `raise_exception(msg)`: templates call it to reject a conversation (e.g. wrong role order).
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {msg}"),
    ))
}

/// `strftime_now(fmt)`: the local time formatted with C `strftime` directives, as Python's
/// `datetime.now().strftime(fmt)`. A directive chrono does not know is an error, where glibc copies it
/// through (`%Q` stays `%Q`); chat templates use the common ones (`%d %b %Y`).
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    strftime(&chrono::Local::now(), &format)
}

fn strftime<Tz: chrono::TimeZone>(
    time: &chrono::DateTime<Tz>,
    format: &str,
) -> std::result::Result<String, minijinja::Error>
where
    Tz::Offset: std::fmt::Display,
{
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    if items.iter().any(|item| matches!(item, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported directive in {format:?}"),
        ));
    }
    Ok(time.format_with_items(items.into_iter()).to_string())
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, unescaped HTML characters included. serde_json writes it, with Python's
/// separators, indentation, escapes and float spelling in [`PythonJson`].
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: indent must be an integer or a string, got {v}"),
                    )
                })?;
                " ".repeat(n.clamp(0, 64) as usize)
            }
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match (
                parts.first().and_then(|p| p.as_str()),
                parts.get(1).and_then(|p| p.as_str()),
            ) {
                (Some(a), Some(b)) if parts.len() == 2 => (a.to_owned(), b.to_owned()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        // json.dumps' defaults: ", " on one line, "," when indenting.
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let formatter = PythonJson {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        level: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    let value = Bounded {
        value,
        sort_keys: sort_keys.unwrap_or(false),
        depth: 0,
    };
    value
        .serialize(&mut serde_json::Serializer::with_formatter(
            &mut out, formatter,
        ))
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    String::from_utf8(out)
        .map(Value::from)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))
}

/// Deep enough for any real template; bounds the recursion on hostile nesting (a namespace can hold
/// itself).
const MAX_JSON_DEPTH: usize = 256;

/// A template value serialized with a depth bound and, for `sort_keys`, its maps' keys in order.
struct Bounded<'a> {
    value: &'a Value,
    sort_keys: bool,
    depth: usize,
}

impl Bounded<'_> {
    fn child<'v>(&self, value: &'v Value) -> Bounded<'v> {
        Bounded {
            value,
            sort_keys: self.sort_keys,
            depth: self.depth + 1,
        }
    }
}

impl Serialize for Bounded<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeMap, SerializeSeq};
        if self.depth > MAX_JSON_DEPTH {
            return Err(S::Error::custom("value nested too deeply"));
        }
        let value = self.value;
        match value.kind() {
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter().map_err(S::Error::custom)?.collect();
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in &items {
                    seq.serialize_element(&self.child(item))?;
                }
                seq.end()
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter().map_err(S::Error::custom)? {
                    let item = value.get_item(&key).map_err(S::Error::custom)?;
                    entries.push((json_key(&key).map_err(S::Error::custom)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, item) in &entries {
                    map.serialize_entry(key, &self.child(item))?;
                }
                map.end()
            }
            ValueKind::Undefined | ValueKind::None => serializer.serialize_unit(),
            ValueKind::Bool | ValueKind::Number | ValueKind::String => value.serialize(serializer),
            other => Err(S::Error::custom(format!(
                "a {other} is not JSON serializable"
            ))),
        }
    }
}

/// A map key as `json.dumps` writes it: strings as they are; None, bools and numbers spelled.
fn json_key(key: &Value) -> std::result::Result<String, String> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        ValueKind::Bool => Ok((if key.is_true() { "true" } else { "false" }).to_owned()),
        ValueKind::Number => Ok(python_number(key, true)),
        other => Err(format!(
            "keys must be str, int, float, bool or None, not {other}"
        )),
    }
}

/// serde_json's output in `json.dumps`' layout: Python's item and key separators, its indentation
/// (every item on its own line, empty containers as `[]`/`{}`), `ensure_ascii`'s `\uXXXX` escapes and
/// Python's float spelling (`1e-05`, `1e+16`).
struct PythonJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    level: usize,
    has_value: bool,
}

impl PythonJson {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(bracket)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl Formatter for PythonJson {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        w.write_all(python_float(value, true).as_bytes())
    }

    fn write_f32<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        value: f32,
    ) -> std::io::Result<()> {
        self.write_f64(w, f64::from(value))
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if !self.ensure_ascii {
            return w.write_all(fragment.as_bytes());
        }
        for c in fragment.chars() {
            if (c as u32) > 0x7E {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            } else {
                w.write_all(c.encode_utf8(&mut [0; 4]).as_bytes())?;
            }
        }
        Ok(())
    }
}

/// A number as Python prints it (`repr`): floats always show a fraction or an exponent (`1.0`,
/// `1e+16`, `1e-05`). In JSON mode non-finite floats are `NaN`/`Infinity`, as `json.dumps` writes.
fn python_number(value: &Value, json: bool) -> String {
    if value.is_number() && !value.is_integer() {
        if let Ok(f) = f64::try_from(value.clone()) {
            return python_float(f, json);
        }
    }
    value.to_string()
}

fn python_float(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.to_owned();
    }
    if f.is_infinite() {
        let body = if json { "Infinity" } else { "inf" };
        return if f < 0.0 {
            format!("-{body}")
        } else {
            body.to_owned()
        };
    }
    // `{:e}` gives the shortest round-trip digits, as Python's repr; only the layout differs.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let int_len = (exp + 1) as usize;
            if digits.len() > int_len {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            } else {
                format!("{}{}.0", digits, "0".repeat(int_len - digits.len()))
            }
        } else {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        };
        format!("{sign}{body}")
    } else {
        let mant = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

// ---------------------------------------------------------------------------------------------------
// Python's str()/repr() for printed values.

fn python_formatter(
    out: &mut minijinja::Output,
    _state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    let text = python_str(value);
    out.write_str(&text)
        .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
}

/// `str(value)` in Python: strings as they are, everything else as `repr`.
fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        ValueKind::Undefined => String::new(),
        _ => python_repr(value, 0),
    }
}

fn python_repr(value: &Value, depth: usize) -> String {
    if depth > MAX_JSON_DEPTH {
        return "...".to_owned();
    }
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_owned(),
        ValueKind::Bool => (if value.is_true() { "True" } else { "False" }).to_owned(),
        ValueKind::Number => python_number(value, false),
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            let items: Vec<String> = value
                .try_iter()
                .map(|it| it.map(|v| python_repr(&v, depth + 1)).collect())
                .unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let mut items = Vec::new();
            if let Ok(keys) = value.try_iter() {
                for key in keys {
                    let item = value.get_item(&key).unwrap_or_default();
                    items.push(format!(
                        "{}: {}",
                        python_repr(&key, depth + 1),
                        python_repr(&item, depth + 1)
                    ));
                }
            }
            format!("{{{}}}", items.join(", "))
        }
        // Namespaces, loop objects, macros...: minijinja's own rendering.
        _ => value.to_string(),
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`; non-printable characters
/// escaped. "Printable" follows Python for ASCII, Latin-1 and the Unicode separators and format
/// characters templates could meet; other code points print as they are.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !python_printable(c) => {
                let cp = c as u32;
                if cp <= 0xFF {
                    out.push_str(&format!("\\x{cp:02x}"));
                } else if cp <= 0xFFFF {
                    out.push_str(&format!("\\u{cp:04x}"));
                } else {
                    out.push_str(&format!("\\U{cp:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn python_printable(c: char) -> bool {
    let cp = c as u32;
    !(cp < 0x20
        || (0x7F..=0xA0).contains(&cp)
        || cp == 0xAD
        || cp == 0x1680
        || (0x2000..=0x200F).contains(&cp)
        || (0x2028..=0x202F).contains(&cp)
        || (0x205F..=0x206F).contains(&cp)
        || cp == 0x3000
        || cp == 0xFEFF
        || (0xE000..=0xF8FF).contains(&cp)
        || (0xFFF9..=0xFFFB).contains(&cp))
}

// ---------------------------------------------------------------------------------------------------
// Python string semantics.

/// Python's `str.isspace()`: Rust's `char::is_whitespace` plus U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)
}

#[derive(Clone, Copy)]
enum Side {
    Both,
    Start,
    End,
}

fn py_strip<'s>(s: &'s str, chars: Option<&str>, side: Side) -> &'s str {
    let matches = |c: char| match chars {
        Some(set) => set.contains(c),
        None => py_space(c),
    };
    match side {
        Side::Both => s.trim_matches(matches),
        Side::Start => s.trim_start_matches(matches),
        Side::End => s.trim_end_matches(matches),
    }
}

/// jinja2's `trim(value, chars=None)` = `str(value).strip(chars)`.
fn trim_filter(value: &Value, chars: Option<String>) -> String {
    py_strip(&python_str(value), chars.as_deref(), Side::Both).to_owned()
}

/// jinja2's `length`: as minijinja's, except that an undefined value has length 0 (jinja2's
/// `Undefined.__len__`), where minijinja errors.
fn length_filter(value: &Value) -> std::result::Result<usize, minijinja::Error> {
    if value.is_undefined() {
        return Ok(0);
    }
    minijinja::filters::length(value)
}

/// Python's `str.split()` with no separator: runs of whitespace split, no empty pieces;
/// `maxsplit` limits the splits (the rest, with leading whitespace stripped, is the last piece).
fn py_split_whitespace(s: &str, maxsplit: Option<i64>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut rest = py_strip(s, None, Side::Start);
    let mut splits = 0i64;
    while !rest.is_empty() {
        if maxsplit.is_some_and(|m| m >= 0 && splits >= m) {
            out.push(Value::from(rest));
            break;
        }
        let end = rest.find(py_space).unwrap_or(rest.len());
        out.push(Value::from(&rest[..end]));
        rest = py_strip(&rest[end..], None, Side::Start);
        splits += 1;
    }
    out
}

/// Python methods on values: whitespace-sensitive string methods here, the rest from pycompat.
fn unknown_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        let side = match method {
            "strip" => Some(Side::Both),
            "lstrip" => Some(Side::Start),
            "rstrip" => Some(Side::End),
            _ => None,
        };
        if let Some(side) = side {
            let (chars,): (Option<Value>,) = minijinja::value::from_args(args)?;
            let chars = chars.filter(|c| !c.is_none());
            let chars = match &chars {
                Some(c) => Some(c.as_str().ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("{method} arg must be None or str"),
                    )
                })?),
                None => None,
            };
            return Ok(Value::from(py_strip(s, chars, side)));
        }
        if method == "split" {
            let (sep, maxsplit): (Option<Value>, Option<i64>) = minijinja::value::from_args(args)?;
            if sep.as_ref().is_none_or(|v| v.is_none()) {
                return Ok(Value::from(py_split_whitespace(s, maxsplit)));
            }
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template the llama3v test models use (shared with the Python tests and the fuzz targets).
    pub(crate) const LLAVA_LLAMA3: &str = include_str!("../../tests/data/llava_llama3.jinja");

    /// Meta-Llama-3.1-8B-Instruct's chat template (tokenizer_config.json), transcribed; the expected
    /// renderings below are transformers 5's `apply_chat_template`.
    const LLAMA31_INSTRUCT: &str = include_str!("../../tests/data/llama31_instruct.jinja");

    #[test]
    fn llama31_instruct_template() {
        let t = tpl(LLAMA31_INSTRUCT);
        let chat = r#"[{"role":"system","content":" Be brief. "},{"role":"user","content":"Hi there"},{"role":"assistant","content":"Hello!"},{"role":"user","content":"Bye"}]"#;
        assert_eq!(
            render_json(&t, chat, true),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            render_json(&t, r#"[{"role":"user","content":"Hi"}]"#, false),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        );
    }

    fn tpl(source: &str) -> ChatTemplate {
        ChatTemplate::new(source, "<|begin_of_text|>", "<|eot_id|>")
            .unwrap_or_else(|e| panic!("compile: {e}"))
    }

    fn render_json(t: &ChatTemplate, json: &str, gen: bool) -> String {
        t.render_json(json, gen)
            .unwrap_or_else(|e| panic!("render: {e}"))
    }

    #[test]
    fn llava_template_with_images() {
        let t = tpl(LLAVA_LLAMA3);
        let messages = vec![
            ChatMessage::text("system", "  Be brief. "),
            ChatMessage {
                role: "user".into(),
                content: vec![
                    ContentPart::Image,
                    ContentPart::Text(" What is this?\n".into()),
                    ContentPart::Image,
                ],
            },
        ];
        let out = t.render(&messages, true).unwrap_or_default();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\n<image>What is this?<image><|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let no_gen = t.render(&messages, false).unwrap_or_default();
        assert!(no_gen.ends_with("<image><|eot_id|>"));
    }

    #[test]
    fn string_and_list_content_render_alike() {
        let t = tpl(LLAVA_LLAMA3);
        let a = render_json(&t, r#"[{"role":"user","content":" hi "}]"#, false);
        let b = render_json(
            &t,
            r#"[{"role":"user","content":[{"type":"text","text":" hi "}]}]"#,
            false,
        );
        assert_eq!(a, b);
        assert_eq!(
            a,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        );
    }

    #[test]
    fn trim_blocks_and_lstrip_blocks() {
        let t = tpl("{% for m in messages %}\n    {% if true %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}\n");
        let out = t.render(
            &[ChatMessage::text("a", "x"), ChatMessage::text("b", "y")],
            false,
        );
        // The block lines vanish; the trailing newline of the template is dropped (jinja2 default).
        assert_eq!(out.ok().as_deref(), Some("[a]\n[b]\n"));
    }

    #[test]
    fn undefined_is_lenient_like_jinja2() {
        let t = tpl("{{ nope }}|{% if nope %}x{% endif %}|{% for a in nope %}{{ a }}{% endfor %}|{{ messages[0]['missing'] }}|{{ nope | length }}");
        assert_eq!(
            t.render(&[ChatMessage::text("u", "x")], false)
                .ok()
                .as_deref(),
            Some("||||0")
        );
        // Attribute access on an undefined value is an error in jinja2 too.
        let t = tpl("{{ nope.attr }}");
        assert!(matches!(t.render(&[], false), Err(Error::ChatTemplate(_))));
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = tpl("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}ok");
        let err = t.render(&[ChatMessage::text("assistant", "x")], false);
        match err {
            Err(Error::ChatTemplate(msg)) => assert!(
                msg.contains("Conversation roles must start with user"),
                "{msg}"
            ),
            other => panic!("expected a chat template error, got {other:?}"),
        }
        assert_eq!(
            t.render(&[ChatMessage::text("user", "x")], false)
                .ok()
                .as_deref(),
            Some("ok")
        );
    }

    #[test]
    fn syntax_error_is_reported_at_construction() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "");
        assert!(matches!(err, Err(Error::ChatTemplate(_))));
    }

    #[test]
    fn python_methods_and_printing() {
        let t = tpl("{{ ' a b '.strip() }}|{{ '\u{1c}x\u{1c}' | trim }}|{{ 'a  b\u{1f}c'.split() }}|{{ none }}|{{ true }}|{{ [1, 'x', none] }}|{{ {'type': 'text'} }}|{{ 1e16 }}|{{ 0.5 }}|{{ 'ab'.startswith('a') }}|{% for k, v in {'b': 1, 'a': 2}.items() %}{{ k }}{{ v }}{% endfor %}|{{ 'a,b'.split(',') }}|{{ \"it's\" }}|{{ [\"it's\"] }}");
        assert_eq!(
            t.render(&[], false).ok().as_deref(),
            Some("a b|x|['a', 'b', 'c']|None|True|[1, 'x', None]|{'type': 'text'}|1e+16|0.5|True|b1a2|['a', 'b']|it's|[\"it's\"]")
        );
    }

    #[test]
    fn tojson_matches_json_dumps() {
        let t = tpl("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ [] | tojson(indent=2) }}|{{ 'é<>&\"\\n\\u0001' | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': [1.0, 1e-05]} | tojson(sort_keys=true, separators=[',', ':']) }}");
        let out = t
            .render_json_ctx(r#"{"x": {"name": "f", "args": {"z": 1, "a": [true, null, 2.5]}}}"#)
            .unwrap_or_default();
        assert_eq!(
            out,
            "{\"name\": \"f\", \"args\": {\"z\": 1, \"a\": [true, null, 2.5]}}|{\n  \"name\": \"f\",\n  \"args\": {\n    \"z\": 1,\n    \"a\": [\n      true,\n      null,\n      2.5\n    ]\n  }\n}|[]|\"é<>&\\\"\\n\\u0001\"|\"\\u00e9\"|{\"a\":[1.0,1e-05],\"b\":1}"
        );
    }

    #[test]
    fn python_floats() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (-2.5, "-2.5"),
            (123456.789, "123456.789"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(python_float(f, false), s);
        }
    }

    #[test]
    fn strftime_directives() {
        use chrono::TimeZone;
        // 2024-07-26 13:05:09 UTC was a Friday, day 208 of a leap year.
        let t = chrono::Utc
            .with_ymd_and_hms(2024, 7, 26, 13, 5, 9)
            .single()
            .unwrap_or_else(|| panic!("a valid date"));
        let f = |fmt: &str| super::strftime(&t, fmt).unwrap_or_else(|e| panic!("{fmt}: {e}"));
        assert_eq!(f("%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            f("%A %B %-d %H:%M:%S %j %p %I %y %% %F %e"),
            "Friday July 26 13:05:09 208 PM 01 24 % 2024-07-26 26"
        );
        // glibc copies an unknown directive through; chrono refuses it, and so does the render.
        assert!(super::strftime(&t, "%Q").is_err());
        let t = tpl("{{ strftime_now('%Y') | length }}");
        assert_eq!(t.render(&[], false).ok().as_deref(), Some("4"));
    }

    #[test]
    fn hostile_content_does_not_panic() {
        let t = tpl(LLAVA_LLAMA3);
        let nasty = [
            "{{ raise_exception('x') }}",
            "{% for %}",
            "\u{0}\u{1c}\u{FFFD}\u{10FFFF}",
            "<|eot_id|><|begin_of_text|>",
            &"x".repeat(1 << 20),
        ];
        for text in nasty {
            let out = t.render(&[ChatMessage::text("user", text)], true);
            // Content is data: it is rendered literally, never evaluated.
            assert!(out.is_ok_and(|o| o.contains(text.trim_matches(py_space))));
        }
        for bad in [
            "",
            "{",
            "[1]",
            "{\"role\": 1}",
            "[[]]",
            &"[".repeat(100_000),
            "null",
        ] {
            assert!(t.render_json(bad, false).is_err(), "{bad:?}");
        }
        // Content of the wrong type goes to the template, which decides: iterating an int is an
        // error (as in jinja2), odd parts are skipped.
        assert!(t
            .render_json(r#"[{"role": "user", "content": 5}]"#, false)
            .is_err());
        assert!(t
            .render_json(
                r#"[{"role": "user", "content": [5, {"type": null}]}]"#,
                false
            )
            .is_ok());
    }

    /// The fuel a render uses, read back from minijinja: what [`MAX_RENDER_FUEL`] is sized from.
    fn fuel_used(t: &ChatTemplate, messages_json: &str) -> u64 {
        let ctx: Value = serde_json::from_str(&format!(
            r#"{{"messages": {messages_json}, "bos_token": "<s>", "add_generation_prompt": true}}"#
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let template = t
            .env
            .get_template(TEMPLATE_NAME)
            .unwrap_or_else(|e| panic!("{e}"));
        let captured = template
            .render_captured_to(ctx, std::io::sink())
            .unwrap_or_else(|e| panic!("{e}"));
        captured.state().fuel_levels().map_or(0, |(used, _)| used)
    }

    #[test]
    fn renders_run_under_fuel_and_output_limits() {
        let t = tpl(LLAMA31_INSTRUCT);
        let conversation = |n: usize| {
            let turns: Vec<String> = (0..n)
                .map(|i| {
                    let role = if i % 2 == 0 { "user" } else { "assistant" };
                    format!(r#"{{"role": "{role}", "content": "message {i}"}}"#)
                })
                .collect();
            format!("[{}]", turns.join(","))
        };
        let per_message =
            (fuel_used(&t, &conversation(200)) - fuel_used(&t, &conversation(100))) / 100;
        println!(
            "Llama-3.1 template: {per_message} instructions a message; the limit of {MAX_RENDER_FUEL} \
             renders {} messages",
            MAX_RENDER_FUEL / per_message.max(1)
        );
        // A long conversation stays far inside the budget.
        assert!(per_message * 10_000 < MAX_RENDER_FUEL, "{per_message}");
        assert!(t.render_json(&conversation(10_000), true).is_ok());

        let endless =
            tpl("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
        let start = std::time::Instant::now();
        let err = endless.render(&[], false).err().map(|e| e.to_string());
        println!("endless loop stopped in {:?}: {err:?}", start.elapsed());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("template instructions")),
            "{err:?}"
        );

        let big = tpl("{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}");
        let err = big
            .render(&[ChatMessage::text("user", "hi")], false)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("over the limit of 1048580 bytes")),
            "{err:?}"
        );
        // What the messages carry does not count against the template's allowance.
        let echo = tpl("{% for m in messages %}{{ m.content[0].text }}{% endfor %}");
        let long = "y".repeat(4 << 20);
        assert_eq!(
            echo.render(&[ChatMessage::text("user", long.as_str())], false)
                .map(|s| s.len())
                .ok(),
            Some(long.len())
        );
    }

    #[test]
    fn null_keys_are_dropped() {
        let t = tpl("{% for m in messages %}{{ 'content' in m }}{% endfor %}");
        assert_eq!(
            render_json(&t, r#"[{"role": "assistant", "content": null}]"#, false),
            "False"
        );
    }

    impl ChatTemplate {
        /// Test helper: renders with an arbitrary JSON context.
        fn render_json_ctx(&self, json: &str) -> Result<String> {
            let ctx: Value =
                serde_json::from_str(json).map_err(|e| Error::ChatTemplate(e.to_string()))?;
            let template = self
                .env
                .get_template(TEMPLATE_NAME)
                .map_err(template_error)?;
            template.render(ctx).map_err(template_error)
        }
    }
}
