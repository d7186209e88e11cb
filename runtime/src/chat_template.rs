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

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State, UndefinedBehavior};

use crate::error::{Error, Result};

const TEMPLATE_NAME: &str = "chat_template";

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
        let messages: Vec<Value> = messages.iter().map(ChatMessage::to_value).collect();
        self.render_value(Value::from(messages), add_generation_prompt)
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
        self.render_value(Value::from(messages), add_generation_prompt)
    }

    fn render_value(&self, messages: Value, add_generation_prompt: bool) -> Result<String> {
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
        template.render(ctx).map_err(template_error)
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

/// `strftime_now(fmt)`: the current time formatted with C `strftime` directives (UTC).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        // A clock before 1970 is a broken clock; formatting the epoch beats failing the render.
        .unwrap_or(0);
    strftime_utc(&format, secs)
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Formats `secs` since the Unix epoch (UTC) with the common C/glibc `strftime` directives (C locale),
/// including glibc's `%-d` style "no padding" flag. Unknown directives are copied through, as glibc does.
fn strftime_utc(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (hour, minute, second) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&if no_pad {
                day.to_string()
            } else {
                format!("{day:2}")
            }),
            Some('m') => out.push_str(&num(month, 2)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
            }
        }
    }
    out
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, unescaped HTML characters included.
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
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Deep enough for any real template; bounds the recursion on hostile nesting.
const MAX_JSON_DEPTH: usize = 256;

fn write_json(
    out: &mut String,
    value: &Value,
    opts: &JsonOpts,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(value, true)),
        ValueKind::String => {
            write_json_str(out, value.as_str().unwrap_or_default(), opts.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, opts, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
                    ValueKind::None => "null".to_owned(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
                    ValueKind::Number => python_number(&key, true),
                    other => {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "tojson: keys must be str, int, float, bool or None, not {other}"
                            ),
                        ))
                    }
                };
                entries.push((key, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, item, opts, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {other} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// A JSON string literal as Python's `json` module writes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7E) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
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

    /// The template the llama3v test models use.
    pub(crate) const LLAVA_LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

    /// Meta-Llama-3.1-8B-Instruct's chat template (tokenizer_config.json), transcribed; the expected
    /// renderings below are transformers 5's `apply_chat_template`.
    const LLAMA31_INSTRUCT: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

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
    fn strftime() {
        // 2024-07-26 13:05:09 UTC was a Friday, day 208 of a leap year.
        let t = 1_722_085_509 - 86_400;
        assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%A %B %-d %H:%M:%S %j %p %I %y %%", t),
            "Friday July 26 13:05:09 208 PM 01 24 %"
        );
        assert_eq!(strftime_utc("%Q", t), "%Q");
        assert_eq!(strftime_utc("%", 0), "%");
        assert_eq!(strftime_utc("%F", 0), "1970-01-01");
        assert_eq!(strftime_utc("%F", 951_782_400), "2000-02-29");
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
