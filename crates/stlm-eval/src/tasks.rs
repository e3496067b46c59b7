//! Benchmark tasks with lm-evaluation-harness (v0.4) semantics: each item becomes the harness's
//! requests, and the same metrics come out (see docs/stlm-eval.md for each task's requests).
//!
//! Items are read from local files only: the MosaicML in-context-learning jsonl
//! (`query`/`choices`/`gold`, `context_options`/`continuation`/`gold`, `context`/`continuation`),
//! the Hugging Face datasets' field names as jsonl or parquet, HellaSwag's six-line text form
//! (optionally `.bz2`), and BLiMP's zip of jsonl files.

use crate::score::{Request, Scorer};
use crate::{EvalError, Result};
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::Value;
use std::io::Read;
use std::path::Path;

/// A benchmark task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// HellaSwag (acc, acc_norm).
    Hellaswag,
    /// ARC-Easy.
    ArcEasy,
    /// ARC-Challenge.
    ArcChallenge,
    /// PIQA.
    Piqa,
    /// OpenBookQA.
    Openbookqa,
    /// WinoGrande (partial scoring; acc only).
    Winogrande,
    /// LAMBADA (OpenAI): last-word accuracy and perplexity.
    Lambada,
    /// BLiMP minimal pairs (acc).
    Blimp,
    /// MMLU (four lettered choices; acc).
    Mmlu,
    /// TriviaQA (generation, exact match).
    Triviaqa,
}

/// The harness's target delimiter (the same for every task here).
const DELIMITER: &str = " ";
/// The harness's few-shot delimiter.
const FEWSHOT_DELIMITER: &str = "\n\n";
/// TriviaQA's stop strings.
const TRIVIAQA_UNTIL: [&str; 3] = ["\n", ".", ","];

impl Task {
    /// Every task, in the order `stlm eval mc --help` lists them.
    pub const ALL: [Task; 10] = [
        Task::Hellaswag,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Piqa,
        Task::Openbookqa,
        Task::Winogrande,
        Task::Lambada,
        Task::Blimp,
        Task::Mmlu,
        Task::Triviaqa,
    ];

    /// The task's name (lm-evaluation-harness's).
    pub fn name(self) -> &'static str {
        match self {
            Task::Hellaswag => "hellaswag",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Piqa => "piqa",
            Task::Openbookqa => "openbookqa",
            Task::Winogrande => "winogrande",
            Task::Lambada => "lambada_openai",
            Task::Blimp => "blimp",
            Task::Mmlu => "mmlu",
            Task::Triviaqa => "triviaqa",
        }
    }

    /// The task called `name` (`lambada` is accepted for `lambada_openai`).
    pub fn parse(name: &str) -> Result<Task> {
        let name = if name == "lambada" { "lambada_openai" } else { name };
        Task::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            EvalError::Input(format!("unknown task `{name}` (known: {})", Task::ALL.map(Task::name).join(", ")))
        })
    }

    /// File names the task's data is looked for under in a data directory (`stlm eval suite`),
    /// MosaicML's first.
    pub fn file_names(self) -> &'static [&'static str] {
        match self {
            Task::Hellaswag => &["hellaswag.jsonl", "hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt", "hellaswag.parquet"],
            Task::ArcEasy => &["arc_easy.jsonl", "arc_easy.parquet"],
            Task::ArcChallenge => &["arc_challenge.jsonl", "arc_challenge.parquet"],
            Task::Piqa => &["piqa.jsonl", "piqa.parquet"],
            Task::Openbookqa => &["openbook_qa.jsonl", "openbookqa.jsonl", "openbookqa.parquet"],
            Task::Winogrande => &["winogrande.jsonl", "winogrande.parquet"],
            Task::Lambada => &["lambada_openai.jsonl", "lambada.jsonl", "lambada_openai.parquet"],
            Task::Blimp => &["blimp.zip", "blimp.jsonl"],
            Task::Mmlu => &["mmlu.jsonl", "mmlu.parquet"],
            Task::Triviaqa => &["triviaqa.jsonl", "trivia_qa.jsonl", "triviaqa.parquet"],
        }
    }

    /// The headline metric's name in reports.
    pub fn metric(self) -> &'static str {
        match self {
            Task::Triviaqa => "exact_match",
            _ => "acc",
        }
    }
}

/// One item in lm-evaluation-harness's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    /// Multiple choice: `doc_to_text`, `doc_to_choice`, the gold index, and a description put
    /// before the prompt (MMLU's subject line; else empty).
    Choice { text: String, choices: Vec<String>, gold: usize, description: String },
    /// Multiple choice with one context per option and a shared continuation (WinoGrande).
    Partial { contexts: Vec<String>, target: String, gold: usize },
    /// Log-likelihood of `target` (its leading space included) after `text` (LAMBADA).
    Cloze { text: String, target: String },
    /// Greedy generation after `text`, right if it equals any of `answers` (TriviaQA).
    Generate { text: String, answers: Vec<String> },
}

impl Doc {
    /// The item as a few-shot example: text, delimiter, gold answer.
    fn as_example(&self) -> String {
        match self {
            Doc::Choice { text, choices, gold, .. } => format!("{text}{DELIMITER}{}", choices[*gold]),
            Doc::Partial { contexts, target, gold } => format!("{}{DELIMITER}{target}", contexts[*gold]),
            Doc::Cloze { text, target } => format!("{text}{DELIMITER}{target}"),
            Doc::Generate { text, answers } => format!("{text}{DELIMITER}{}", answers.first().map_or("", String::as_str)),
        }
    }

    fn description(&self) -> &str {
        match self {
            Doc::Choice { description, .. } => description,
            _ => "",
        }
    }

    /// The requests of this item after the few-shot prefix `shots` (`""` for zero-shot).
    pub fn requests(&self, shots: &str) -> Vec<Request> {
        let ctx = format!("{}{shots}", self.description());
        match self {
            Doc::Choice { text, choices, .. } => choices.iter().map(|c| Request::new(format!("{ctx}{text}"), format!("{DELIMITER}{c}"))).collect(),
            Doc::Partial { contexts, target, .. } => contexts.iter().map(|c| Request::new(format!("{ctx}{c}"), format!("{DELIMITER}{target}"))).collect(),
            Doc::Cloze { text, target } => vec![Request::new(format!("{ctx}{text}"), target.clone())],
            Doc::Generate { .. } => Vec::new(),
        }
    }
}

/// HellaSwag's text cleaning (lm-evaluation-harness `hellaswag/utils.py::preprocess`).
pub fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    // re.sub("\\[.*?\\]", "", text): the shortest bracketed span on one line.
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if !after[..close].contains('\n') => {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.capitalize`: the first character upper case, the rest lower case.
pub fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars.flat_map(char::to_lowercase)).collect(),
        None => String::new(),
    }
}

/// TriviaQA's answer comparison (`exact_match` with `ignore_case` and `ignore_punctuation`,
/// after the `remove_whitespace` filter): lower case, ASCII punctuation removed.
pub fn normalize_answer(s: &str) -> String {
    s.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect()
}

fn field<'a>(v: &'a Value, name: &str, line: usize) -> Result<&'a Value> {
    v.get(name).ok_or_else(|| EvalError::Input(format!("item {line}: no field `{name}`")))
}

fn string(v: &Value, name: &str, line: usize) -> Result<String> {
    field(v, name, line)?.as_str().map(str::to_string).ok_or_else(|| EvalError::Input(format!("item {line}: field `{name}` is not a string")))
}

fn strings(v: &Value, name: &str, line: usize) -> Result<Vec<String>> {
    let bad = || EvalError::Input(format!("item {line}: field `{name}` is not a list of strings"));
    // Parquet lists may come as {"list": [{"element": ..}]}-free arrays; plain arrays here.
    let items = field(v, name, line)?.as_array().ok_or_else(bad)?;
    items.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(bad)).collect()
}

/// An index field given as a number or a digit string.
fn index(v: &Value, name: &str, line: usize) -> Result<usize> {
    let x = field(v, name, line)?;
    x.as_u64()
        .map(|n| n as usize)
        .or_else(|| x.as_str().and_then(|s| s.trim().parse().ok()))
        .ok_or_else(|| EvalError::Input(format!("item {line}: field `{name}` is not an index ({x})")))
}

fn checked(doc: Doc, line: usize) -> Result<Doc> {
    let (n, gold) = match &doc {
        Doc::Choice { choices, gold, .. } => (choices.len(), *gold),
        Doc::Partial { contexts, gold, .. } => (contexts.len(), *gold),
        _ => return Ok(doc),
    };
    if n < 2 || gold >= n {
        return Err(EvalError::Input(format!("item {line}: gold {gold} with {n} choices")));
    }
    Ok(doc)
}

/// An ARC/OpenBookQA answer key's index among the choice labels.
fn answer_key(v: &Value, line: usize) -> Result<usize> {
    let labels = strings(field(v, "choices", line)?, "label", line)?;
    let key = string(v, "answerKey", line)?;
    let key = key.trim_start();
    labels.iter().position(|l| l == key).ok_or_else(|| EvalError::Input(format!("item {line}: answerKey `{key}` is not among the labels {labels:?}")))
}

/// One item of `task` from a JSON object in MosaicML's or Hugging Face's field names.
pub fn doc_from_json(task: Task, v: &Value, line: usize) -> Result<Doc> {
    let has = |k: &str| v.get(k).is_some();
    let doc = match task {
        // MosaicML multiple choice: query / choices / gold, rebuilt into the harness's prompt.
        _ if has("query") && has("choices") && has("gold") => {
            let query = string(v, "query", line)?;
            let mut choices = strings(v, "choices", line)?;
            let text = match task {
                Task::ArcEasy | Task::ArcChallenge => format!("{query}\nAnswer:"),
                Task::Piqa => format!("{}\nAnswer:", query.strip_suffix('\n').unwrap_or(&query)),
                Task::Hellaswag => {
                    choices = choices.iter().map(|c| hellaswag_preprocess(c)).collect();
                    hellaswag_preprocess(&query)
                }
                _ => query,
            };
            Doc::Choice { text, choices, gold: index(v, "gold", line)?, description: String::new() }
        }
        Task::Winogrande if has("context_options") => Doc::Partial {
            contexts: strings(v, "context_options", line)?,
            target: string(v, "continuation", line)?.trim().to_string(),
            gold: index(v, "gold", line)?,
        },
        Task::Winogrande => {
            let sentence = string(v, "sentence", line)?;
            let blank = sentence.find('_').ok_or_else(|| EvalError::Input(format!("item {line}: `sentence` has no `_`")))?;
            let options = [string(v, "option1", line)?, string(v, "option2", line)?];
            let gold = match string(v, "answer", line)?.as_str() {
                "1" => 0,
                "2" => 1,
                other => return Err(EvalError::Input(format!("item {line}: `answer` is `{other}`, not \"1\" or \"2\""))),
            };
            Doc::Partial {
                contexts: options.iter().map(|o| format!("{}{o}", &sentence[..blank])).collect(),
                target: sentence[blank + 1..].trim().to_string(),
                gold,
            }
        }
        Task::Lambada if has("context") => {
            let continuation = string(v, "continuation", line)?;
            // MosaicML's continuation is the text after its last space (`text.split(' ')[-1]`), newlines included.
            Doc::Cloze { text: string(v, "context", line)?, target: format!(" {continuation}") }
        }
        Task::Lambada => {
            let text = string(v, "text", line)?;
            let (head, last) = text.rsplit_once(' ').ok_or_else(|| EvalError::Input(format!("item {line}: `text` has no space")))?;
            Doc::Cloze { text: head.to_string(), target: format!(" {last}") }
        }
        Task::Hellaswag => {
            let ctx = format!("{} {}", string(v, "ctx_a", line)?, py_capitalize(&string(v, "ctx_b", line)?));
            Doc::Choice {
                text: hellaswag_preprocess(&format!("{}: {ctx}", string(v, "activity_label", line)?)),
                choices: strings(v, "endings", line)?.iter().map(|e| hellaswag_preprocess(e)).collect(),
                gold: index(v, "label", line)?,
                description: String::new(),
            }
        }
        Task::ArcEasy | Task::ArcChallenge => Doc::Choice {
            text: format!("Question: {}\nAnswer:", string(v, "question", line)?),
            choices: strings(field(v, "choices", line)?, "text", line)?,
            gold: answer_key(v, line)?,
            description: String::new(),
        },
        Task::Openbookqa => Doc::Choice {
            text: string(v, "question_stem", line)?,
            choices: strings(field(v, "choices", line)?, "text", line)?,
            gold: answer_key(v, line)?,
            description: String::new(),
        },
        Task::Piqa => Doc::Choice {
            text: format!("Question: {}\nAnswer:", string(v, "goal", line)?),
            choices: vec![string(v, "sol1", line)?, string(v, "sol2", line)?],
            gold: index(v, "label", line)?,
            description: String::new(),
        },
        Task::Blimp => Doc::Choice {
            text: String::new(),
            choices: vec![string(v, "sentence_good", line)?, string(v, "sentence_bad", line)?],
            gold: 0,
            description: String::new(),
        },
        Task::Mmlu => {
            let choices = strings(v, "choices", line)?;
            if choices.len() != 4 {
                return Err(EvalError::Input(format!("item {line}: MMLU items have 4 choices, this one {}", choices.len())));
            }
            let question = string(v, "question", line)?;
            let text = format!(
                "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
                question.trim(),
                choices[0],
                choices[1],
                choices[2],
                choices[3]
            );
            let subject = v.get("subject").and_then(Value::as_str).unwrap_or("").replace('_', " ");
            let description = if subject.is_empty() {
                String::new()
            } else {
                format!("The following are multiple choice questions (with answers) about {subject}.\n\n")
            };
            Doc::Choice { text, choices: ["A", "B", "C", "D"].map(String::from).to_vec(), gold: index(v, "answer", line)?, description }
        }
        Task::Triviaqa if has("aliases") => {
            // MosaicML's question answering: context (the prompt), answer, aliases.
            let mut answers = strings(v, "aliases", line)?;
            if let Some(a) = v.get("answer").and_then(Value::as_str) {
                answers.insert(0, a.to_string());
            }
            Doc::Generate { text: string(v, "context", line)?, answers }
        }
        Task::Triviaqa => {
            let answer = field(v, "answer", line)?;
            Doc::Generate { text: format!("Question: {}?\nAnswer:", string(v, "question", line)?), answers: strings(answer, "aliases", line)? }
        }
    };
    checked(doc, line)
}

/// HellaSwag items from the six-line text form (`activity_label: ctx`, gold index, four
/// endings). The form joins `ctx_a` and `ctx_b`; the harness capitalises `ctx_b`, so a final
/// fragment after the last sentence end that starts in lower case is taken as `ctx_b`.
pub fn hellaswag_from_text(text: &str, limit: usize) -> Result<Vec<Doc>> {
    let lines: Vec<&str> = text.lines().collect();
    if !lines.len().is_multiple_of(6) {
        return Err(EvalError::Input(format!("{} lines: the six-line HellaSwag form needs a multiple of 6", lines.len())));
    }
    lines
        .chunks(6)
        .take(limit)
        .enumerate()
        .map(|(i, item)| {
            let gold: usize = item[1].trim().parse().map_err(|_| EvalError::Input(format!("line {}: `{}` is not a gold index", i * 6 + 2, item[1])))?;
            let query = item[0];
            let cut = query.rfind(". ").map(|p| p + 2).or_else(|| query.find(": ").map(|p| p + 2)).unwrap_or(0);
            let (head, tail) = query.split_at(cut);
            let query = if tail.starts_with(|c: char| c.is_lowercase()) { format!("{head}{}", py_capitalize(tail)) } else { query.to_string() };
            checked(
                Doc::Choice {
                    text: hellaswag_preprocess(&query),
                    choices: item[2..].iter().map(|e| hellaswag_preprocess(e)).collect(),
                    gold,
                    description: String::new(),
                },
                i + 1,
            )
        })
        .collect()
}

fn parse_jsonl(task: Task, text: &str, limit: usize, name: &str) -> Result<Vec<Doc>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .take(limit)
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l).map_err(|e| EvalError::Input(format!("{name}: line {}: not JSON: {e}", i + 1)))?;
            doc_from_json(task, &v, i + 1).map_err(|e| EvalError::Input(format!("{name}: {e}")))
        })
        .collect()
}

/// Reads up to `limit` items of `task` from `path` (`.jsonl`, `.json` lines, `.parquet`,
/// HellaSwag `.txt`/`.txt.bz2`, BLiMP `.zip`; a zip's limit applies to each of its files, as the
/// harness's limit applies to each BLiMP paradigm). Errors name the file and the item.
pub fn load_docs(task: Task, path: &Path, limit: usize) -> Result<Vec<Doc>> {
    let name = path.display().to_string();
    let err = |m: String| EvalError::Input(format!("{name}: {m}"));
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let read = || std::fs::read(path).map_err(|e| err(format!("cannot read ({e})")));
    let docs = if file_name.ends_with(".zip") {
        let file = std::fs::File::open(path).map_err(|e| err(format!("cannot read ({e})")))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| err(format!("not a zip archive ({e})")))?;
        // Skip macOS resource forks (`__MACOSX/`, `._name`) that zips made on a Mac carry.
        let wanted = |n: &&str| n.ends_with(".jsonl") && !n.starts_with("__MACOSX/") && !n.rsplit('/').next().is_some_and(|f| f.starts_with("._"));
        let mut names: Vec<String> = archive.file_names().filter(wanted).map(str::to_string).collect();
        names.sort();
        let mut docs = Vec::new();
        for entry in names {
            let mut text = String::new();
            archive
                .by_name(&entry)
                .map_err(|e| err(format!("{entry}: {e}")))?
                .read_to_string(&mut text)
                .map_err(|e| err(format!("{entry}: not UTF-8 text ({e})")))?;
            docs.extend(parse_jsonl(task, &text, limit, &format!("{name}:{entry}"))?);
        }
        docs
    } else if file_name.ends_with(".parquet") {
        let rows = stlm_data::parquet_records(path, limit).map_err(|e| EvalError::Input(e.to_string()))?;
        rows.iter().enumerate().map(|(i, v)| doc_from_json(task, v, i + 1).map_err(|e| err(e.to_string()))).collect::<Result<_>>()?
    } else {
        let bytes = read()?;
        let bytes = if file_name.ends_with(".bz2") {
            let mut out = Vec::new();
            bzip2::read::BzDecoder::new(bytes.as_slice()).read_to_end(&mut out).map_err(|e| err(format!("not bzip2 data ({e})")))?;
            out
        } else {
            bytes
        };
        let text = String::from_utf8(bytes).map_err(|e| err(format!("not UTF-8 text ({e})")))?;
        let is_text_form = file_name.trim_end_matches(".bz2").ends_with(".txt");
        match (task, is_text_form) {
            (Task::Hellaswag, true) => hellaswag_from_text(&text, limit).map_err(|e| err(e.to_string()))?,
            (_, true) => return Err(err(format!("{}: only HellaSwag reads the six-line text form; give .jsonl or .parquet", task.name()))),
            _ => parse_jsonl(task, &text, limit, &name)?,
        }
    };
    if docs.is_empty() {
        return Err(err(format!("no {} items", task.name())));
    }
    Ok(docs)
}

/// Writes every item's requests, log-likelihoods, greedy flags, gold and scores to `path` as
/// JSON lines (as lm-evaluation-harness's `--log_samples`).
pub fn write_log_samples(path: &std::path::Path, items: &[ItemResult]) -> Result<()> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item).map_err(|e| EvalError::Input(format!("{}: {e}", path.display())))?);
        text.push('\n');
    }
    stlm_core::atomic_write_bytes(path, text.as_bytes()).map_err(|e| EvalError::Input(e.to_string()))
}

/// Options of one task run (defaults as [`TaskOptions::default`]).
#[derive(Debug, Clone, clap::Args)]
pub struct TaskOptions {
    /// Few-shot examples per item (drawn from the other items of the file).
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Seed of the few-shot draw.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Tokens generated at most (TriviaQA).
    #[arg(long, default_value_t = 64)]
    pub max_gen_tokens: usize,
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions { shots: 0, seed: 1234, max_gen_tokens: 64 }
    }
}

/// The scores of one task; the JSON `stlm eval mc --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    /// Task name.
    pub task: String,
    /// Items scored.
    pub n: usize,
    /// Accuracy (TriviaQA: exact match; LAMBADA: the last word is the greedy continuation).
    pub acc: f64,
    /// Length-normalised accuracy (argmax of log-likelihood / characters of the choice), for
    /// the tasks where the harness reports it.
    pub acc_norm: Option<f64>,
    /// Standard error of `acc` (sample standard deviation / sqrt(n)).
    pub acc_stderr: f64,
    /// Standard error of `acc_norm`.
    pub acc_norm_stderr: Option<f64>,
    /// LAMBADA: exp(-mean log-likelihood of the last word).
    pub perplexity: Option<f64>,
    /// The headline metric: `acc` or `exact_match`.
    pub metric: String,
    /// Few-shot examples per item.
    pub shots: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl TaskReport {
    /// One line for people: `task: n N, metric acc ± stderr (%), ...`.
    pub fn summary(&self) -> String {
        let pct = |v: f64, e: f64| format!("{:.2} ± {:.2}", 100.0 * v, 100.0 * e);
        let mut line = format!("{}: n {}, {} {}", self.task, self.n, self.metric, pct(self.acc, self.acc_stderr));
        if let (Some(v), Some(e)) = (self.acc_norm, self.acc_norm_stderr) {
            line.push_str(&format!(", acc_norm {}", pct(v, e)));
        }
        if let Some(p) = self.perplexity {
            line.push_str(&format!(", perplexity {p:.2}"));
        }
        format!("{line} ({:.0} s)", self.seconds)
    }
}

/// One scored item (`stlm eval mc --log-samples`): its requests and what the model gave them.
#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    /// Index of the item in the file (after `--limit`).
    pub doc: usize,
    /// `(context, continuation)` of each request (TriviaQA: the prompt alone).
    pub requests: Vec<(String, String)>,
    /// Log-likelihood of each request's continuation.
    pub logprobs: Vec<f64>,
    /// Whether each continuation is the model's greedy output.
    pub greedy: Vec<bool>,
    /// Gold choice (TriviaQA: none).
    pub gold: Option<usize>,
    /// TriviaQA: the generated answer.
    pub generated: Option<String>,
    /// The item's score for `acc` (0 or 1).
    pub acc: f64,
    /// The item's score for `acc_norm`, where defined.
    pub acc_norm: Option<f64>,
}

/// lm-evaluation-harness's `mean_stderr`: sample standard deviation (n - 1) over sqrt(n).
pub fn mean_stderr(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return f64::NAN;
    }
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// First index of the largest value (numpy's argmax).
fn argmax(xs: impl IntoIterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.into_iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// The few-shot prefix of item `i`: `shots` other items of `docs`, drawn with `seed` and `i`,
/// each as text + delimiter + answer + blank line.
fn fewshot_prefix(docs: &[Doc], i: usize, shots: usize, seed: u64) -> String {
    if shots == 0 {
        return String::new();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut others: Vec<usize> = (0..docs.len()).filter(|&j| j != i).collect();
    others.shuffle(&mut rng);
    others.iter().take(shots).map(|&j| format!("{}{FEWSHOT_DELIMITER}", docs[j].as_example())).collect()
}

/// Scores `docs` of `task` with `scorer`: all log-likelihood requests in batched forwards (the
/// progress bar counts requests), or greedy generation for TriviaQA. Returns the report and
/// each item's result.
pub fn evaluate(task: Task, docs: &[Doc], scorer: &dyn Scorer, opts: &TaskOptions, bar: &ProgressBar) -> Result<(TaskReport, Vec<ItemResult>)> {
    let start = std::time::Instant::now();
    if docs.is_empty() {
        return Err(EvalError::Input(format!("{}: no items", task.name())));
    }
    let prefixes: Vec<String> = (0..docs.len()).map(|i| fewshot_prefix(docs, i, opts.shots, opts.seed)).collect();
    let mut report = TaskReport {
        task: task.name().to_string(),
        n: docs.len(),
        acc: 0.0,
        acc_norm: None,
        acc_stderr: 0.0,
        acc_norm_stderr: None,
        perplexity: None,
        metric: task.metric().to_string(),
        shots: opts.shots,
        seconds: 0.0,
    };
    if let Some(Doc::Generate { .. }) = docs.first() {
        let mut contexts = Vec::with_capacity(docs.len());
        for (doc, prefix) in docs.iter().zip(&prefixes) {
            match doc {
                Doc::Generate { text, .. } => contexts.push(format!("{prefix}{text}")),
                _ => return Err(EvalError::Input(format!("{}: mixed item kinds", task.name()))),
            }
        }
        bar.set_length(contexts.len() as u64);
        let until: Vec<String> = TRIVIAQA_UNTIL.map(String::from).to_vec();
        let outputs = scorer.generate_until(&contexts, &until, opts.max_gen_tokens, bar)?;
        let mut items = Vec::with_capacity(docs.len());
        for (i, (doc, out)) in docs.iter().zip(&outputs).enumerate() {
            let Doc::Generate { answers, .. } = doc else { unreachable!("checked above") };
            let predicted = normalize_answer(out.trim_start());
            let hit = f64::from(u8::from(answers.iter().any(|a| normalize_answer(a) == predicted)));
            let requests = vec![(contexts[i].clone(), String::new())];
            items.push(ItemResult { doc: i, requests, logprobs: vec![], greedy: vec![], gold: None, generated: Some(out.clone()), acc: hit, acc_norm: None });
        }
        let hits: Vec<f64> = items.iter().map(|r| r.acc).collect();
        (report.acc, report.acc_stderr) = (mean(&hits), mean_stderr(&hits));
        report.seconds = start.elapsed().as_secs_f64();
        return Ok((report, items));
    }
    let per_doc: Vec<Vec<Request>> = docs.iter().zip(&prefixes).map(|(d, p)| d.requests(p)).collect();
    let flat: Vec<Request> = per_doc.iter().flatten().cloned().collect();
    if flat.is_empty() {
        return Err(EvalError::Input(format!("{}: mixed item kinds", task.name())));
    }
    bar.set_length(flat.len() as u64);
    let scored = scorer.loglikelihood(&flat, bar)?;
    let (mut acc, mut acc_norm, mut lls, mut items) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut at = 0;
    for (i, (doc, requests)) in docs.iter().zip(&per_doc).enumerate() {
        let results = &scored[at..at + requests.len()];
        at += requests.len();
        let hit = |pred: usize, gold: usize| f64::from(u8::from(pred == gold));
        let (gold, item_acc, item_norm) = match doc {
            Doc::Choice { choices, gold, .. } => {
                let normed = results.iter().zip(choices).map(|(r, c)| r.logprob / c.chars().count().max(1) as f64);
                (Some(*gold), hit(argmax(results.iter().map(|r| r.logprob)), *gold), Some(hit(argmax(normed), *gold)))
            }
            Doc::Partial { gold, .. } => (Some(*gold), hit(argmax(results.iter().map(|r| r.logprob)), *gold), None),
            Doc::Cloze { .. } => {
                lls.push(results[0].logprob);
                (None, f64::from(u8::from(results[0].greedy)), None)
            }
            Doc::Generate { .. } => return Err(EvalError::Input(format!("{}: mixed item kinds", task.name()))),
        };
        acc.push(item_acc);
        acc_norm.extend(item_norm);
        items.push(ItemResult {
            doc: i,
            requests: requests.iter().map(|r| (r.context.clone(), r.continuation.clone())).collect(),
            logprobs: results.iter().map(|r| r.logprob).collect(),
            greedy: results.iter().map(|r| r.greedy).collect(),
            gold,
            generated: None,
            acc: item_acc,
            acc_norm: item_norm,
        });
    }
    (report.acc, report.acc_stderr) = (mean(&acc), mean_stderr(&acc));
    // The harness reports acc_norm where the task lists it (not for WinoGrande, LAMBADA, BLiMP, MMLU).
    if matches!(task, Task::Hellaswag | Task::ArcEasy | Task::ArcChallenge | Task::Piqa | Task::Openbookqa) && !acc_norm.is_empty() {
        (report.acc_norm, report.acc_norm_stderr) = (Some(mean(&acc_norm)), Some(mean_stderr(&acc_norm)));
    }
    if !lls.is_empty() {
        report.perplexity = Some((-mean(&lls)).exp());
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok((report, items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hellaswag_text_cleaning_matches_the_harness() {
        assert_eq!(hellaswag_preprocess(" How to cook [title] Boil water. [step] Wait  here "), "How to cook. Boil water. Wait here");
        assert_eq!(hellaswag_preprocess("a [b\nc] d"), "a [b\nc] d");
        assert_eq!(py_capitalize("he puts on a CD"), "He puts on a cd");
        let v = json!({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "endings": ["a", "b [x]", "c", "d"], "label": "3"});
        let doc = doc_from_json(Task::Hellaswag, &v, 1).unwrap();
        assert_eq!(
            doc,
            Doc::Choice {
                text: "Roof shingle removal: A man is sitting on a roof. He".into(),
                // strip() runs before the brackets go, so "b [x]" keeps its space, as in the harness.
                choices: vec!["a".into(), "b ".into(), "c".into(), "d".into()],
                gold: 3,
                description: String::new()
            }
        );
        // The six-line form gives the same prompt.
        let text = "Roof shingle removal: A man is sitting on a roof. he\n3\na\nb [x]\nc\nd\n";
        assert_eq!(hellaswag_from_text(text, 10).unwrap(), vec![doc]);
    }

    #[test]
    fn mosaic_and_hf_fields_give_the_same_prompts() {
        let hf = json!({"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"});
        let mosaic = json!({"query": "Question: Which is a gas?", "choices": ["ice", "steam"], "gold": 1});
        let a = doc_from_json(Task::ArcEasy, &hf, 1).unwrap();
        assert_eq!(a, doc_from_json(Task::ArcEasy, &mosaic, 1).unwrap());
        assert_eq!(a.requests(""), vec![Request::new("Question: Which is a gas?\nAnswer:", " ice"), Request::new("Question: Which is a gas?\nAnswer:", " steam")]);
        let hf = json!({"goal": "dry a cup", "sol1": "use a towel", "sol2": "use water", "label": 0});
        let mosaic = json!({"query": "Question: dry a cup\n", "choices": ["use a towel", "use water"], "gold": 0});
        assert_eq!(doc_from_json(Task::Piqa, &hf, 1).unwrap(), doc_from_json(Task::Piqa, &mosaic, 1).unwrap());
        let hf = json!({"sentence": "Sarah was better than Maria so _ got the easy cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"});
        let mosaic = json!({"context_options": ["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"], "continuation": "got the easy cases.", "gold": 1});
        let w = doc_from_json(Task::Winogrande, &hf, 1).unwrap();
        assert_eq!(w, doc_from_json(Task::Winogrande, &mosaic, 1).unwrap());
        assert_eq!(w.requests("")[1], Request::new("Sarah was better than Maria so Maria", " got the easy cases."));
        let hf = json!({"text": "she looked at the old dog"});
        let mosaic = json!({"context": "she looked at the old", "continuation": "dog"});
        let l = doc_from_json(Task::Lambada, &hf, 1).unwrap();
        assert_eq!(l, doc_from_json(Task::Lambada, &mosaic, 1).unwrap());
        assert_eq!(l.requests(""), vec![Request::new("she looked at the old", " dog")]);
        // A last "word" holding newlines keeps them (LAMBADA item 4462: "...saw the \n\nrecorder").
        let hf = json!({"text": "and saw the \n\nrecorder"});
        let mosaic = json!({"context": "and saw the", "continuation": "\n\nrecorder"});
        let l = doc_from_json(Task::Lambada, &mosaic, 1).unwrap();
        assert_eq!(l, doc_from_json(Task::Lambada, &hf, 1).unwrap());
        assert_eq!(l.requests("")[0].continuation, " \n\nrecorder");
    }

    #[test]
    fn mmlu_blimp_and_triviaqa_requests() {
        let v = json!({"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1});
        let doc = doc_from_json(Task::Mmlu, &v, 1).unwrap();
        let r = doc.requests("");
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[1],
            Request::new("The following are multiple choice questions (with answers) about elementary mathematics.\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", " B")
        );
        let b = doc_from_json(Task::Blimp, &json!({"sentence_good": "Cats sleep.", "sentence_bad": "Cats sleeps."}), 1).unwrap();
        assert_eq!(b.requests(""), vec![Request::new("", " Cats sleep."), Request::new("", " Cats sleeps.")]);
        let t = doc_from_json(Task::Triviaqa, &json!({"question": "Capital of France", "answer": {"aliases": ["Paris", "paris"], "value": "Paris"}}), 1).unwrap();
        assert_eq!(t, Doc::Generate { text: "Question: Capital of France?\nAnswer:".into(), answers: vec!["Paris".into(), "paris".into()] });
        assert_eq!(normalize_answer("St. Paul's"), "st pauls");
        // Bad items name the item and the field.
        let e = doc_from_json(Task::Piqa, &json!({"goal": "x", "sol1": "a", "label": 0}), 7).unwrap_err().to_string();
        assert!(e.contains("item 7") && e.contains("sol2"), "{e}");
        let e = doc_from_json(Task::ArcEasy, &json!({"query": "q", "choices": ["a", "b"], "gold": 2}), 3).unwrap_err().to_string();
        assert!(e.contains("item 3") && e.contains("gold 2"), "{e}");
    }

    #[test]
    fn fewshot_examples_are_other_items_joined_by_blank_lines() {
        let docs: Vec<Doc> = (0..5)
            .map(|i| Doc::Choice { text: format!("Q{i}"), choices: vec![format!("a{i}"), format!("b{i}")], gold: 1, description: String::new() })
            .collect();
        let p = fewshot_prefix(&docs, 2, 3, 1234);
        assert_eq!(p.matches("\n\n").count(), 3);
        assert!(!p.contains("Q2"), "{p}");
        assert!(p.contains(&"Q0 b0\n\n".to_string()) || p.contains("Q1 b1\n\n") || p.contains("Q3 b3\n\n"));
        assert_eq!(p, fewshot_prefix(&docs, 2, 3, 1234), "seeded");
        assert_eq!(docs[2].requests(&p)[0].context, format!("{p}Q2"));
        assert_eq!(mean_stderr(&[1.0, 0.0, 1.0, 0.0]), (1.0f64 / 3.0).sqrt() / 2.0);
        assert_eq!(argmax([1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn unknown_task_lists_the_known() {
        let e = Task::parse("arc").unwrap_err().to_string();
        assert!(e.contains("arc_easy") && e.contains("hellaswag"), "{e}");
        assert_eq!(Task::parse("lambada").unwrap(), Task::Lambada);
    }
}
