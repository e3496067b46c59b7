//! Named task suites: which tasks, where their data is found in a directory, and the markdown
//! table of the results.

use crate::score::scorer;
use crate::tasks::{evaluate, load_docs, ItemResult, Task, TaskOptions, TaskReport};
use indicatif::ProgressBar;
use stlm_model::AnyModel;
use stlm_tokenizers::Tokenizer;
use crate::{EvalError, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A named list of tasks with the table column each fills.
pub struct Suite {
    /// Suite name.
    pub name: &'static str,
    /// `(column header, task, report acc_norm where the task has it)`.
    pub columns: &'static [(&'static str, Task, bool)],
}

/// The Doge/SmolLM table for small models: MMLU, TriviaQA, ARC (easy, challenge), PIQA,
/// HellaSwag, OBQA, WinoGrande; normalised accuracy where the harness reports it.
pub const SMALL_LM: Suite = Suite {
    name: "small-lm",
    columns: &[
        ("MMLU", Task::Mmlu, false),
        ("TriviaQA", Task::Triviaqa, false),
        ("ARC-e", Task::ArcEasy, true),
        ("ARC-c", Task::ArcChallenge, true),
        ("PIQA", Task::Piqa, true),
        ("HellaSwag", Task::Hellaswag, true),
        ("OBQA", Task::Openbookqa, true),
        ("WinoGrande", Task::Winogrande, false),
    ],
};

/// Every task.
pub const ALL: Suite = Suite {
    name: "all",
    columns: &[
        ("HellaSwag", Task::Hellaswag, true),
        ("ARC-e", Task::ArcEasy, true),
        ("ARC-c", Task::ArcChallenge, true),
        ("PIQA", Task::Piqa, true),
        ("OBQA", Task::Openbookqa, true),
        ("WinoGrande", Task::Winogrande, false),
        ("LAMBADA", Task::Lambada, false),
        ("BLiMP", Task::Blimp, false),
        ("MMLU", Task::Mmlu, false),
        ("TriviaQA", Task::Triviaqa, false),
    ],
};

impl Suite {
    /// The suite called `name`.
    pub fn parse(name: &str) -> Result<&'static Suite> {
        [&SMALL_LM, &ALL].into_iter().find(|s| s.name == name).ok_or_else(|| EvalError::Input(format!("unknown suite `{name}` (known: small-lm, all)")))
    }
}

/// The first of `task`'s file names present in `dir`.
pub fn find_data(dir: &Path, task: Task) -> Option<PathBuf> {
    task.file_names().iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// A suite's results: one report per task run, and the tasks skipped with the reason.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    /// Suite name.
    pub suite: String,
    /// Model directory.
    pub model: String,
    /// Task reports.
    pub tasks: Vec<TaskReport>,
    /// `(task, reason)` of the tasks not run.
    pub skipped: Vec<(String, String)>,
}

impl SuiteReport {
    /// A markdown table: one row for the model, a column per task (`acc` or `acc_norm` in
    /// percent, ± standard error; `-` for a skipped task), and the mean over the tasks run.
    pub fn markdown(&self, suite: &Suite) -> String {
        let mut header = String::from("| model |");
        let mut rule = String::from("|---|");
        let mut row = format!("| {} |", self.model);
        let mut scores = Vec::new();
        for (title, task, norm) in suite.columns {
            let report = self.tasks.iter().find(|r| r.task == task.name());
            let metric = match (report, norm) {
                (Some(r), true) if r.acc_norm.is_some() => "acc_norm",
                _ => task.metric(),
            };
            header.push_str(&format!(" {title} ({metric}) |"));
            rule.push_str("---|");
            match report {
                Some(r) => {
                    let (value, stderr) = match (r.acc_norm, r.acc_norm_stderr, norm) {
                        (Some(v), Some(e), true) => (v, e),
                        _ => (r.acc, r.acc_stderr),
                    };
                    scores.push(value);
                    row.push_str(&format!(" {:.1} ± {:.1} |", 100.0 * value, 100.0 * stderr));
                }
                None => row.push_str(" - |"),
            }
        }
        header.push_str(" mean |");
        rule.push_str("---|");
        let mean = if scores.is_empty() { f64::NAN } else { scores.iter().sum::<f64>() / scores.len() as f64 };
        row.push_str(&format!(" {:.1} |", 100.0 * mean));
        format!("{header}\n{rule}\n{row}\n")
    }
}


/// How the items of a task are scored (`stlm eval mc` and `stlm eval suite` take it).
#[derive(Debug, Clone, clap::Args)]
pub struct TaskRun {
    /// Items per task at most (BLiMP: per paradigm).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Window in tokens (byte models: chunks); longer contexts lose their start. Default: the
    /// model's max_position_embeddings.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Padded tokens per forward.
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Shots, seed and generation length.
    #[command(flatten)]
    pub task: TaskOptions,
}

/// Scores `task` on the items in `data` with `model`; progress on `bar`.
pub fn score_task(model: &AnyModel, tok: &Tokenizer, task: Task, data: &Path, run: &TaskRun, bar: &ProgressBar) -> Result<(TaskReport, Vec<ItemResult>)> {
    let docs = load_docs(task, data, run.limit.unwrap_or(usize::MAX))?;
    let scorer = scorer(model, tok, run.max_length, run.batch_tokens)?;
    bar.set_prefix(format!("{} ({} items)", task.name(), docs.len()));
    evaluate(task, &docs, scorer.as_ref(), &run.task, bar).map_err(|e| EvalError::Input(format!("{}: {e}", data.display())))
}

/// Runs every task of `suite` whose file is in `data_dir`; a task without a file, or one that
/// cannot be scored (an item longer than the model's window, say), is listed with its reason
/// and the rest still run. `done` sees each task's report; `bar` makes each task's progress bar.
pub fn run_suite(
    model: &AnyModel,
    tok: &Tokenizer,
    (suite, model_name): (&Suite, &str),
    data_dir: &Path,
    run: &TaskRun,
    bar: &dyn Fn() -> ProgressBar,
    done: &mut dyn FnMut(&TaskReport),
) -> Result<SuiteReport> {
    if !data_dir.is_dir() {
        return Err(EvalError::Input(format!("{}: not a directory", data_dir.display())));
    }
    let mut report = SuiteReport { suite: suite.name.into(), model: model_name.into(), tasks: Vec::new(), skipped: Vec::new() };
    for &(_, task, _) in suite.columns {
        let Some(path) = find_data(data_dir, task) else {
            let reason = format!("no data file in {} (looked for {})", data_dir.display(), task.file_names().join(", "));
            report.skipped.push((task.name().into(), reason));
            continue;
        };
        let progress = bar();
        match score_task(model, tok, task, &path, run, &progress) {
            Ok((r, _)) => {
                done(&r);
                report.tasks.push(r);
            }
            Err(e) => report.skipped.push((task.name().into(), e.to_string())),
        }
        progress.finish_and_clear();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(task: Task, acc: f64, acc_norm: Option<f64>) -> TaskReport {
        TaskReport {
            task: task.name().into(),
            n: 100,
            acc,
            acc_norm,
            acc_stderr: 0.05,
            acc_norm_stderr: acc_norm.map(|_| 0.04),
            perplexity: None,
            metric: task.metric().into(),
            shots: 0,
            seconds: 1.0,
        }
    }

    #[test]
    fn table_uses_acc_norm_where_asked_and_marks_skipped_tasks() {
        let r = SuiteReport {
            suite: "small-lm".into(),
            model: "m".into(),
            tasks: vec![report(Task::ArcEasy, 0.5, Some(0.4)), report(Task::Winogrande, 0.52, None)],
            skipped: vec![("mmlu".into(), "no data".into())],
        };
        let md = r.markdown(&SMALL_LM);
        let lines: Vec<&str> = md.lines().collect();
        assert!(lines[0].contains("ARC-e (acc_norm)") && lines[0].contains("WinoGrande (acc)"), "{md}");
        assert!(lines[2].starts_with("| m | - | - | 40.0 ± 4.0 | - |"), "{md}");
        assert!(lines[2].contains("52.0 ± 5.0") && lines[2].ends_with("| 46.0 |"), "{md}");
        assert!(Suite::parse("nope").is_err());
    }
}
