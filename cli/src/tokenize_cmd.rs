//! `llama3v tokenize`: text or a chat to token ids, with the model's tokenizer and chat template.
//!
//! Needs only `tokenizer.json` (and the chat template): no graph is loaded. The batch modes exist so
//! parity with transformers and tiktoken can be checked on large corpora in one process
//! (`tests/python/test_text.py`).

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::ArgGroup;
use llama3v::chat_template::ChatTemplate;
use llama3v::tokenizer::{StreamDecoder, TextTokenizer};

/// Llama-3's BOS and end-of-turn tokens: the defaults with `--tokenizer`.
const DEFAULT_BOS: &str = "<|begin_of_text|>";
const DEFAULT_EOS: &str = "<|eot_id|>";

#[derive(clap::Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["model", "tokenizer"])))]
#[command(group(
    ArgGroup::new("input")
        .required(true)
        .args(["text", "text_file", "messages", "batch_jsonl", "decode_jsonl"])
))]
pub struct TokenizeArgs {
    /// Model directory: the tokenizer, chat template and special tokens come from its manifest.json
    #[arg(long, short = 'm', value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// A tokenizer.json to use instead of a model directory
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Chat template for --messages with --tokenizer: a jinja file, or a .json file with a
    /// "chat_template" key (as transformers' chat_template.json / tokenizer_config.json)
    #[arg(long, value_name = "FILE", requires = "tokenizer")]
    pub chat_template: Option<PathBuf>,
    /// BOS token the chat template sees, with --tokenizer [default: <|begin_of_text|>]
    #[arg(long, value_name = "TOKEN", requires = "tokenizer")]
    pub bos_token: Option<String>,
    /// EOS token the chat template sees, with --tokenizer [default: <|eot_id|>]
    #[arg(long, value_name = "TOKEN", requires = "tokenizer")]
    pub eos_token: Option<String>,

    /// Text to tokenize as it is (special tokens spelled in it are parsed; no BOS is added)
    #[arg(long)]
    pub text: Option<String>,
    /// File whose whole content is tokenized as it is (a trailing newline is part of the text); - for stdin
    #[arg(long, value_name = "FILE")]
    pub text_file: Option<PathBuf>,
    /// Chat as JSON: a list of {"role": ..., "content": "text" or [{"type": "text", "text": ...},
    /// {"type": "image"}]}; rendered with the chat template, then tokenized; - for stdin
    #[arg(long, value_name = "FILE.json")]
    pub messages: Option<PathBuf>,
    /// With --messages or --batch-jsonl: do not append the assistant header to chats
    #[arg(long)]
    pub no_generation_prompt: bool,

    /// Many inputs, one JSON value per line. A string is text: out, a JSON list of ids. A list is a
    /// chat (as --messages): out, {"text": rendered, "ids": [...]}. One output line per input line.
    #[arg(long, value_name = "FILE")]
    pub batch_jsonl: Option<PathBuf>,
    /// Many id lists: one JSON list of ids per line in; out, one JSON object per line with the
    /// decoded "text" and the "chunks" streaming output would print, token by token
    #[arg(long, value_name = "FILE")]
    pub decode_jsonl: Option<PathBuf>,
    /// With --decode-jsonl: leave special tokens out of the text
    #[arg(long, requires = "decode_jsonl")]
    pub skip_special_tokens: bool,

    /// Print one JSON object {"text": ..., "ids": [...]} instead of plain lines
    #[arg(long, conflicts_with_all = ["batch_jsonl", "decode_jsonl"])]
    pub json: bool,
}

/// What the text side of a model needs, from a model directory or from loose files.
struct TextSide {
    tokenizer: TextTokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let side = load_text_side(args)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());

    if let Some(path) = &args.batch_jsonl {
        return batch_encode(&side, path, !args.no_generation_prompt, &mut out);
    }
    if let Some(path) = &args.decode_jsonl {
        return batch_decode(&side.tokenizer, path, args.skip_special_tokens, &mut out);
    }

    let (text, rendered) = if let Some(text) = &args.text {
        (text.clone(), false)
    } else if let Some(path) = &args.text_file {
        (read_input(path)?, false)
    } else if let Some(path) = &args.messages {
        let template = side.chat_template()?;
        let messages = read_input(path)?;
        let text = template
            .render_json(&messages, !args.no_generation_prompt)
            .with_context(|| format!("rendering {}", path.display()))?;
        (text, true)
    } else {
        // The "input" group is required, so clap has already rejected this.
        bail!("give one of --text, --text-file, --messages, --batch-jsonl, --decode-jsonl");
    };
    let ids = side.tokenizer.encode(&text)?;

    if args.json {
        let obj = serde_json::json!({ "text": text, "ids": ids });
        writeln!(out, "{obj}")?;
    } else {
        if rendered {
            // The rendered prompt verbatim (it usually ends in "\n\n"), then a marker line.
            write!(out, "{text}")?;
            if !text.ends_with('\n') {
                writeln!(out)?;
            }
            writeln!(out, "--- {} tokens", ids.len())?;
        }
        writeln!(out, "{}", join_ids(&ids))?;
    }
    out.flush()?;
    Ok(())
}

impl TextSide {
    fn chat_template(&self) -> Result<ChatTemplate> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            anyhow!("a chat needs a chat template: the manifest has none, or pass --chat-template")
        })?;
        Ok(ChatTemplate::new(source, &self.bos_token, &self.eos_token)?)
    }
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}

fn load_text_side(args: &TokenizeArgs) -> Result<TextSide> {
    if let Some(dir) = &args.model {
        return load_from_model_dir(dir);
    }
    let Some(path) = &args.tokenizer else {
        bail!("give --model DIR or --tokenizer FILE");
    };
    let tokenizer = TextTokenizer::from_file(path)?;
    let chat_template = args
        .chat_template
        .as_deref()
        .map(read_chat_template)
        .transpose()?;
    Ok(TextSide {
        tokenizer,
        chat_template,
        bos_token: args
            .bos_token
            .clone()
            .unwrap_or_else(|| DEFAULT_BOS.to_owned()),
        eos_token: args
            .eos_token
            .clone()
            .unwrap_or_else(|| DEFAULT_EOS.to_owned()),
    })
}

/// Reads the `text` section of `DIR/manifest.json` (see onnx/README.md). Only the fields this command
/// uses are read, so it works on a model directory whose graphs are missing.
fn load_from_model_dir(dir: &Path) -> Result<TextSide> {
    let manifest_path = dir.join("manifest.json");
    let raw = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&raw)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let text = manifest
        .get("text")
        .ok_or_else(|| anyhow!("{}: no \"text\" section", manifest_path.display()))?;
    let field = |name: &str| -> Result<String> {
        text.get(name)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                anyhow!(
                    "{}: text.{name} is missing or not a string",
                    manifest_path.display()
                )
            })
    };
    let tokenizer_file = field("tokenizer_file")?;
    let tokenizer = TextTokenizer::from_file(&dir.join(tokenizer_file))?;
    Ok(TextSide {
        tokenizer,
        // Only --messages needs it; its absence is reported there.
        chat_template: text
            .get("chat_template")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
        bos_token: field("bos_token")?,
        eos_token: field("eos_token")?,
    })
}

/// A chat template file: raw jinja, or JSON with a "chat_template" string.
fn read_chat_template(path: &Path) -> Result<String> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        let value: serde_json::Value =
            serde_json::from_str(&raw).with_context(|| format!("parsing {}", path.display()))?;
        return value
            .get("chat_template")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{}: no \"chat_template\" string", path.display()));
    }
    Ok(raw)
}

/// The whole file (or stdin for `-`) as UTF-8.
fn read_input(path: &Path) -> Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn open_lines(path: &Path) -> Result<Box<dyn BufRead>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(BufReader::new(std::io::stdin())));
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Box::new(BufReader::new(file)))
}

/// `--batch-jsonl`: every line is a JSON string (so any text, newlines included, fits on one line)
/// or a JSON list of messages. All texts, rendered chats included, are encoded in one batch.
fn batch_encode(
    side: &TextSide,
    path: &Path,
    add_generation_prompt: bool,
    out: &mut impl Write,
) -> Result<()> {
    let mut template = None;
    // (text, whether it is a rendered chat)
    let mut items: Vec<(String, bool)> = Vec::new();
    for (i, line) in open_lines(path)?.lines().enumerate() {
        let at = || format!("{}: line {}", path.display(), i + 1);
        let line = line.with_context(at)?;
        if line.trim_start().starts_with('[') {
            // Compiled on the first chat only: a batch of plain texts needs no template.
            let tpl = match template.take() {
                Some(tpl) => tpl,
                None => side.chat_template()?,
            };
            // The line itself is passed on, so object key order survives (serde_json would sort).
            let text = tpl
                .render_json(&line, add_generation_prompt)
                .with_context(at)?;
            template = Some(tpl);
            items.push((text, true));
        } else {
            let text: String = serde_json::from_str(&line)
                .with_context(|| format!("{}: not a JSON string or list", at()))?;
            items.push((text, false));
        }
    }
    let refs: Vec<&str> = items.iter().map(|(t, _)| t.as_str()).collect();
    let all_ids = side.tokenizer.encode_batch(&refs)?;
    for ((text, is_chat), ids) in items.iter().zip(all_ids) {
        if *is_chat {
            writeln!(out, "{}", serde_json::json!({ "text": text, "ids": ids }))?;
        } else {
            serde_json::to_writer(&mut *out, &ids)?;
            writeln!(out)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `--decode-jsonl`: decode each id list whole and through the streaming decoder.
fn batch_decode(
    tok: &TextTokenizer,
    path: &Path,
    skip_special_tokens: bool,
    out: &mut impl Write,
) -> Result<()> {
    for (i, line) in open_lines(path)?.lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        let ids: Vec<u32> = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}: line {} is not a JSON list of token ids",
                path.display(),
                i + 1
            )
        })?;
        let text = tok.decode(&ids, skip_special_tokens)?;
        let mut stream = StreamDecoder::new(tok, skip_special_tokens);
        let mut chunks = Vec::with_capacity(ids.len() + 1);
        for id in &ids {
            chunks.push(stream.push(*id)?);
        }
        chunks.push(stream.finish()?);
        let obj = serde_json::json!({ "text": text, "chunks": chunks });
        writeln!(out, "{obj}")?;
    }
    out.flush()?;
    Ok(())
}
