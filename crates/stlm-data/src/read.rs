//! Documents out of files (`.txt`, `.jsonl`, `.parquet`) or the built-in story corpus, streamed
//! one at a time so that files of several GB never sit in memory whole.

use crate::{stories, DataError, Result};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

/// The separator written between documents in `.txt` files.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// What to do with a `.jsonl` line that is not JSON or lacks the text field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadLine {
    /// Stop with an error naming the file and line.
    #[default]
    Stop,
    /// Warn (file and line) and skip the line.
    Skip,
}

/// What to do with a line that is not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalidUtf8 {
    /// Stop with an error naming the file and line.
    #[default]
    Stop,
    /// Warn and replace the bad bytes with U+FFFD.
    Replace,
    /// Warn and skip the line.
    Skip,
}

/// How documents are read.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadOptions {
    /// Field of a `.jsonl` object (column of a `.parquet` file) holding the text.
    pub text_field: String,
    /// `.txt` documents end at this string; `None`: at a blank line or at `<|endoftext|>`.
    pub separator: Option<String>,
    /// Bad `.jsonl` lines.
    pub on_bad_line: OnBadLine,
    /// Lines that are not UTF-8.
    pub on_invalid_utf8: OnInvalidUtf8,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            text_field: "text".into(),
            separator: None,
            on_bad_line: OnBadLine::Stop,
            on_invalid_utf8: OnInvalidUtf8::Stop,
        }
    }
}

/// Where the documents of a corpus come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A `.txt`, `.jsonl` or `.parquet` file.
    File(PathBuf),
    /// The built-in story corpus: `stories` stories generated from `seed`.
    Builtin { stories: u64, seed: u64 },
}

impl Source {
    /// A short name for messages and cache files.
    pub fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Builtin { stories, seed } => format!("built-in stories ({stories}, seed {seed})"),
        }
    }

    /// Streams the documents to `on_doc` in order until it breaks.
    pub fn for_each_document(
        &self,
        opts: &ReadOptions,
        mut on_doc: impl FnMut(String) -> ControlFlow<()>,
    ) -> Result<()> {
        match self {
            Source::File(path) => read_documents(path, opts, on_doc),
            Source::Builtin { stories, seed } => {
                for i in 0..*stories {
                    if on_doc(stories::story(*seed, i)).is_break() {
                        break;
                    }
                }
                Ok(())
            }
        }
    }

    /// Size in bytes of the input (the file, or an estimate for the built-in corpus), for progress.
    pub fn size_hint(&self) -> u64 {
        match self {
            Source::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            Source::Builtin { stories, .. } => stories * 800,
        }
    }
}

/// Up to `limit_bytes` of documents from `sources`, in order (e.g. to train a tokenizer on).
pub fn sample_documents(sources: &[Source], opts: &ReadOptions, limit_bytes: usize) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    let mut bytes = 0;
    for source in sources {
        source.for_each_document(opts, |d| {
            bytes += d.len();
            texts.push(d);
            if bytes >= limit_bytes {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        if bytes >= limit_bytes {
            break;
        }
    }
    Ok(texts)
}

/// Warnings about skipped or repaired lines: the first few in full, then a count.
struct Warnings<'p> {
    path: &'p Path,
    count: usize,
}

impl Warnings<'_> {
    const SHOWN: usize = 5;

    fn warn(&mut self, line: usize, message: &str) {
        self.count += 1;
        if self.count <= Self::SHOWN {
            eprintln!("warning: {}:{line}: {message}", self.path.display());
        }
    }
}

impl Drop for Warnings<'_> {
    fn drop(&mut self) {
        if self.count > Self::SHOWN {
            eprintln!("warning: {}: {} more lines like that", self.path.display(), self.count - Self::SHOWN);
        }
    }
}

/// Streams the documents of `path` (`.txt`, `.jsonl` or `.parquet`) to `on_doc`, in file order,
/// until it breaks. Errors name the file and line.
pub fn read_documents(
    path: &Path,
    opts: &ReadOptions,
    mut on_doc: impl FnMut(String) -> ControlFlow<()>,
) -> Result<()> {
    let io = |e| DataError::Io { path: path.to_path_buf(), source: e };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "parquet" {
        return crate::parquet::read_parquet(path, &opts.text_field, on_doc);
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let line_err = |line: usize, message: String| DataError::Line { path: path.to_path_buf(), line, message };
    let mut warnings = Warnings { path, count: 0 };
    let mut lines = reader.split(b'\n').enumerate();
    // The next line as text with the UTF-8 policy applied (`None` text: a skipped line).
    let mut next_line = |warnings: &mut Warnings| -> Option<Result<(usize, Option<String>)>> {
        let (i, bytes) = lines.next()?;
        let n = i + 1;
        Some(bytes.map_err(io).and_then(|bytes| match String::from_utf8(bytes) {
            Ok(text) => Ok((n, Some(text))),
            Err(e) => match opts.on_invalid_utf8 {
                OnInvalidUtf8::Stop => Err(line_err(
                    n,
                    "not valid UTF-8 (set `invalid_utf8 = \"replace\"` or `\"skip\"` in [data] to go on)".into(),
                )),
                OnInvalidUtf8::Replace => {
                    warnings.warn(n, "not valid UTF-8; bad bytes replaced");
                    Ok((n, Some(String::from_utf8_lossy(e.as_bytes()).into_owned())))
                }
                OnInvalidUtf8::Skip => {
                    warnings.warn(n, "not valid UTF-8; line skipped");
                    Ok((n, None))
                }
            },
        }))
    };
    match ext {
        "jsonl" => {
            while let Some(item) = next_line(&mut warnings) {
                let (n, Some(text)) = item? else { continue };
                if text.trim().is_empty() {
                    continue;
                }
                let doc = match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(value) => match value.get(&opts.text_field) {
                        Some(serde_json::Value::String(s)) => Ok(s.clone()),
                        _ => Err(format!("no string field `{}`", opts.text_field)),
                    },
                    Err(e) => Err(format!("not JSON ({e})")),
                };
                match (doc, opts.on_bad_line) {
                    (Ok(doc), _) => {
                        if on_doc(doc).is_break() {
                            break;
                        }
                    }
                    (Err(m), OnBadLine::Stop) => {
                        return Err(line_err(
                            n,
                            format!("{m} (set `bad_lines = \"skip\"` in [data] to skip such lines)"),
                        ))
                    }
                    (Err(m), OnBadLine::Skip) => warnings.warn(n, &format!("{m}; line skipped")),
                }
            }
        }
        "txt" | "text" | "md" => {
            let (marker, split_blank) = match &opts.separator {
                Some(s) => (s.as_str(), false),
                None => (ENDOFTEXT, true),
            };
            let mut doc = String::new();
            // Hands a finished document over; true when the consumer wants no more.
            let mut flush = |doc: &mut String| {
                let text = std::mem::take(doc);
                let text = text.trim_matches('\n');
                !text.trim().is_empty() && on_doc(text.to_string()).is_break()
            };
            while let Some(item) = next_line(&mut warnings) {
                let (_, Some(text)) = item? else { continue };
                if split_blank && text.trim().is_empty() {
                    if flush(&mut doc) {
                        return Ok(());
                    }
                    continue;
                }
                let mut pieces = text.split(marker).peekable();
                while let Some(piece) = pieces.next() {
                    doc.push_str(piece);
                    if pieces.peek().is_some() && flush(&mut doc) {
                        return Ok(());
                    }
                }
                if !doc.is_empty() {
                    doc.push('\n');
                }
            }
            flush(&mut doc);
        }
        other => {
            return Err(DataError::Invalid(format!(
                "{}: unsupported file type `.{other}` (expected .txt, .jsonl or .parquet)",
                path.display()
            )))
        }
    }
    Ok(())
}
