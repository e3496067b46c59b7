//! The variants of a sweep: named variants, `TABLE.FIELD=V1,V2` axes and training texts,
//! combined into a grid with labels and run directory names.

use crate::{input, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One point of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Short description, e.g. `hidden_act=relu2, data=wiki.txt` (`base` for the base config).
    pub label: String,
    /// Run directory name inside the sweep directory.
    pub dir: String,
    /// Config overrides of this variant, `KEY=VALUE` (as `stlm train --set` takes them).
    pub sets: Vec<String>,
    /// Training files (empty: the built-in stories).
    pub data: Vec<String>,
}

/// The axes of a sweep as `stlm sweep` takes them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GridOptions {
    /// Vary a field: `TABLE.FIELD=V1,V2,...`, each value in TOML syntax as for `stlm train --set`
    /// (commas inside [], {} or quotes belong to the value; `-` keeps the base config's value);
    /// repeatable, and every combination is trained. A single value sets the field for all.
    #[arg(long = "set", value_name = "KEY=V1,V2")]
    pub set: Vec<String>,
    /// A named variant: `NAME:KEY=V;KEY=V;...` (overrides as for `stlm train --set`, separated
    /// by `;`; `data=FILE[+FILE]` gives its training text). Repeat for a list of variants that are
    /// not a grid (an architecture comparison); `NAME:` alone is the base config. Combined with
    /// `--set` and `--data` like another axis.
    #[arg(long = "variant", value_name = "NAME:KEY=V;...")]
    pub variant: Vec<String>,
    /// Training text of the variants: one file (several joined by `+`) per value; repeat to
    /// compare datasets (one variant per value). Default: the built-in stories.
    #[arg(long = "data", value_name = "FILE[+FILE]")]
    pub data: Vec<String>,
}

impl GridOptions {
    /// The variants of these axes (see [`grid`]).
    pub fn variants(&self) -> Result<Vec<Variant>> {
        grid(&self.variant, &self.set, &self.data)
    }
}

/// A named variant's name, overrides and training files (if it names them).
type Named = (String, Vec<String>, Option<Vec<String>>);

/// A named variant `NAME:KEY=V;...`: its name, overrides and training files (if it names them).
fn named_variant(spec: &str) -> Result<Named> {
    let Some((name, rest)) = spec.split_once(':') else {
        return Err(input(format!("variant `{spec}`: expected NAME:KEY=V;KEY=V (e.g. share-x2:model.layer_sharing.repeats=2)")));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(input(format!("variant `{spec}`: the name before `:` is empty")));
    }
    let (mut sets, mut data) = (Vec::new(), None);
    for item in split_top_level(rest, ';').into_iter().filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((key, files)) if key.trim() == "data" => data = Some(files.split('+').map(|f| f.trim().to_string()).collect()),
            Some((key, value)) if key.contains('.') && !value.trim().is_empty() => sets.push(format!("{}={}", key.trim(), value.trim())),
            _ => return Err(input(format!("variant `{spec}`: `{item}` is not TABLE.FIELD=VALUE or data=FILE"))),
        }
    }
    Ok((name.to_string(), sets, data))
}

/// Every combination of the `named` variants (`NAME:KEY=V;...`), the `sets` axes
/// (`TABLE.FIELD=V1,V2`, first axis slowest) and the `data` values (`FILE[+FILE]`).
pub fn grid(named: &[String], sets: &[String], data: &[String]) -> Result<Vec<Variant>> {
    let mut axes: Vec<(String, Vec<Option<String>>)> = Vec::new();
    for item in sets {
        let Some((key, values)) = item.split_once('=') else {
            return Err(input(format!("axis `{item}`: expected TABLE.FIELD=V1,V2,... (e.g. model.hidden_act=silu,relu2)")));
        };
        let key = key.trim();
        if axes.iter().any(|(k, _)| k == key) {
            return Err(input(format!("axis `{item}`: `{key}` is varied twice; give its values in one axis")));
        }
        let values: Vec<Option<String>> =
            split_values(values).into_iter().map(|v| (v != "-").then_some(v)).collect();
        if values.iter().any(|v| v.as_deref() == Some("")) {
            return Err(input(format!("axis `{item}`: an empty value (use `-` to keep the base config's value)")));
        }
        axes.push((key.to_string(), values));
    }
    let mut bases: Vec<Named> = Vec::new();
    for spec in named {
        let (name, sets, files) = named_variant(spec)?;
        if bases.iter().any(|(n, _, _)| *n == name) {
            return Err(input(format!("variant `{spec}`: the name `{name}` is used twice")));
        }
        if files.is_some() && data.len() > 1 {
            return Err(input(format!("variant `{spec}`: names its data while the sweep's data gives several; use one of the two")));
        }
        bases.push((name, sets, files));
    }
    // Without named variants, one unnamed one: the base config.
    let unnamed = bases.is_empty();
    if unnamed {
        bases.push((String::new(), Vec::new(), None));
    }
    let datas: Vec<Vec<String>> = match data.len() {
        0 => vec![Vec::new()],
        _ => data.iter().map(|d| d.split('+').map(str::to_string).collect()).collect(),
    };
    let mut combos: Vec<Vec<(String, Option<String>)>> = vec![Vec::new()];
    for (key, values) in &axes {
        combos = combos
            .iter()
            .flat_map(|c| values.iter().map(move |v| [c.clone(), vec![(key.clone(), v.clone())]].concat()))
            .collect();
    }
    let mut variants = Vec::new();
    for (name, named_sets, named_files) in &bases {
        for combo in &combos {
            for files in &datas {
                let varied: Vec<String> = (!unnamed)
                    .then(|| name.clone())
                    .into_iter()
                    .chain(
                        combo
                            .iter()
                            .filter(|(key, _)| axes.iter().any(|(k, vs)| k == key && vs.len() > 1))
                            .map(|(key, v)| format!("{}={}", key.rsplit('.').next().unwrap_or(key), v.as_deref().unwrap_or("base"))),
                    )
                    .chain((datas.len() > 1).then(|| format!("data={}", short_names(files))))
                    .collect();
                let label = if varied.is_empty() { "base".to_string() } else { varied.join(", ") };
                let dir = format!("{:02}-{}", variants.len(), slug(&label));
                let sets = named_sets.iter().cloned().chain(combo.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))).collect();
                let data = named_files.clone().unwrap_or_else(|| files.clone());
                variants.push(Variant { label, dir, sets, data });
            }
        }
    }
    Ok(variants)
}

/// The values of `V1,V2,...`, split at commas outside brackets, braces and quotes, trimmed.
fn split_values(text: &str) -> Vec<String> {
    split_top_level(text, ',')
}

/// `text` split at `sep` outside brackets, braces and quotes, trimmed.
fn split_top_level(text: &str, sep: char) -> Vec<String> {
    let (mut out, mut current, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None::<char>);
    for c in text.chars() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, c) if c == sep && depth == 0 => {
                out.push(current.trim().to_string());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current.trim().to_string());
    out
}

/// File names of `files` joined by `+`.
fn short_names(files: &[String]) -> String {
    files.iter().map(|f| Path::new(f).file_name().map_or(f.clone(), |n| n.to_string_lossy().into_owned())).collect::<Vec<_>>().join("+")
}

/// `label` as a directory name: letters, digits, `.`, `-`, `_`, `=`; at most 60 characters.
fn slug(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '=') { c } else { '_' })
        .collect();
    let s = s.split('_').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("_");
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_split_at_top_level_commas() {
        assert_eq!(split_values("silu,relu2"), vec!["silu", "relu2"]);
        assert_eq!(split_values("-, { repeats = 2, mlp = true }"), vec!["-", "{ repeats = 2, mlp = true }"]);
        assert_eq!(split_values("[1, 2],[3]"), vec!["[1, 2]", "[3]"]);
        assert_eq!(split_values("\"a,b\",c"), vec!["\"a,b\"", "c"]);
    }

    #[test]
    fn the_grid_is_every_combination() {
        let sets = ["model.hidden_act=silu,relu2".to_string(), "model.layer_sharing=-,{ repeats = 2 }".to_string(), "train.lr=1e-3".to_string()];
        let g = grid(&[], &sets, &["a.txt".into(), "b.txt+c.txt".into()]).unwrap();
        assert_eq!(g.len(), 8);
        assert_eq!(g[0].label, "hidden_act=silu, layer_sharing=base, data=a.txt");
        assert_eq!(g[0].sets, vec!["model.hidden_act=silu", "train.lr=1e-3"]);
        assert_eq!(g[3].sets, vec!["model.hidden_act=silu", "model.layer_sharing={ repeats = 2 }", "train.lr=1e-3"]);
        assert_eq!(g[3].data, vec!["b.txt", "c.txt"]);
        assert_eq!(g[3].dir, "03-hidden_act=silu_layer_sharing=_repeats_=_2_data=b.txt_c.txt");
        let dirs: std::collections::HashSet<_> = g.iter().map(|v| v.dir.clone()).collect();
        assert_eq!(dirs.len(), 8, "distinct run directories");
        assert_eq!(grid(&[], &[], &[]).unwrap()[0].label, "base");
        assert!(grid(&[], &["model.x".into()], &[]).unwrap_err().to_string().contains("TABLE.FIELD=V1,V2"));
        assert!(grid(&[], &["a.b=1".into(), "a.b=2".into()], &[]).unwrap_err().to_string().contains("twice"));
        assert!(grid(&[], &["a.b=1,,2".into()], &[]).unwrap_err().to_string().contains("empty value"));
    }

    #[test]
    fn named_variants_are_a_list_with_their_own_data() {
        let named = [
            "base:".to_string(),
            "share:model.layer_sharing.repeats=2".to_string(),
            "ctx:model.layer_shapes.context = { min_window = 8, max_window = 64 };train.lr=1e-3".to_string(),
            "wiki:data=w.txt+x.txt".to_string(),
        ];
        let g = grid(&named, &[], &["s.txt".into()]).unwrap();
        assert_eq!(g.iter().map(|v| v.label.as_str()).collect::<Vec<_>>(), ["base", "share", "ctx", "wiki"]);
        assert!(g[0].sets.is_empty() && g[0].data == ["s.txt"]);
        assert_eq!(g[2].sets, ["model.layer_shapes.context={ min_window = 8, max_window = 64 }", "train.lr=1e-3"]);
        assert_eq!(g[3].data, ["w.txt", "x.txt"], "a variant's own data");
        let g = grid(&named[..2], &["model.hidden_act=silu,relu".into()], &[]).unwrap();
        assert_eq!(g[3].label, "share, hidden_act=relu");
        assert_eq!(g[3].sets, ["model.layer_sharing.repeats=2", "model.hidden_act=relu"]);
        assert!(grid(&["x".into()], &[], &[]).unwrap_err().to_string().contains("NAME:KEY=V"));
        assert!(grid(&["a:b".into()], &[], &[]).unwrap_err().to_string().contains("not TABLE.FIELD=VALUE"));
        assert!(grid(&["a:".into(), "a:".into()], &[], &[]).unwrap_err().to_string().contains("twice"));
        assert!(grid(&["w:data=a"].map(String::from), &[], &["b".into(), "c".into()]).unwrap_err().to_string().contains("several"));
    }
}
