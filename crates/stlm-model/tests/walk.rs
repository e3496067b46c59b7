//! The layer walk against the variable store, for every config in `configs/` (and a LoRA-shared
//! model): a stored walk lists every variable exactly once, by its saved name, as the very tensor
//! the store holds; weight decay by role is the old name rule's (matrices but embeddings) except
//! where that rule was wrong; MoE FLOPs count a routed token's share of the experts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use stlm_core::{Layer, Parameter, Role};
use stlm_model::{BytePooledModel, DecoderModel, ModelConfig};
use tch::{nn, Device};

fn configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).collect();
    files.sort();
    assert!(files.len() > 20, "configs/ holds the example configs");
    files
}

/// Checks the stored walk of a model against its variable store; returns the walk.
fn check_walk(what: &str, layer: &dyn Layer, vs: &nn::VarStore) -> Vec<Parameter> {
    let params = stlm_core::module::parameters(layer);
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "{what}: a tensor is listed twice in {names:?}");
    let vars = vs.variables();
    let stored: BTreeSet<&str> = vars.keys().map(String::as_str).collect();
    assert_eq!(unique, stored, "{what}: the walk and the variable store differ");
    for p in &params {
        assert_eq!(p.tensor.data_ptr(), vars[&p.name].data_ptr(), "{what}: `{}` is not the stored tensor", p.name);
        assert_eq!(p.tensor.size(), vars[&p.name].size(), "{what}: `{}`", p.name);
    }
    params
}

/// The rule weight decay followed before roles: matrices whose name does not contain `embed`.
fn old_rule(p: &Parameter) -> bool {
    p.tensor.dim() >= 2 && !p.name.contains("embed")
}

#[test]
fn every_config_walks_its_variables_once_with_roles_that_decay_as_before() {
    tch::manual_seed(0);
    let mut models = 0;
    for path in configs() {
        let what = path.file_name().unwrap().to_string_lossy().to_string();
        let cfg = ModelConfig::from_toml_file(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        let params = if cfg.bytes.is_some() {
            let m = BytePooledModel::new(cfg, Device::Cpu).unwrap();
            check_walk(&what, &m, m.var_store())
        } else {
            let m = DecoderModel::new(cfg, Device::Cpu).unwrap();
            let rows = stlm_model::inspect::module_counts(&m);
            let stored: i64 = m.var_store().variables().values().map(|t| t.numel() as i64).sum();
            assert_eq!(rows.iter().map(|r| r.total).sum::<i64>(), stored, "{what}: `stlm inspect` counts every tensor once");
            assert!(rows.iter().all(|r| r.attention + r.mlp + r.norms + r.other == r.total));
            check_walk(&what, &m, m.var_store())
        };
        for p in &params {
            // The residual root's width projection was left out of decay by the `embed` in its name.
            let fixed = p.name == "model.residual_root.embed_proj.weight";
            assert_eq!(p.role.decays(&p.tensor), old_rule(p) || fixed, "{what}: `{}` ({:?})", p.name, p.role);
        }
        models += 1;
    }
    assert!(models > 20);
}

#[test]
fn lora_shared_and_tied_models_list_shared_weights_once() {
    let base = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/share-albert.toml")).unwrap();
    for sharing in [
        "layer_sharing = { scheme = \"cycle\", repeats = 3, lora_rank = 4 }",
        "layer_sharing = { scheme = \"immediate\", repeats = 2, mlp = true, o_proj = true }",
    ] {
        let text = base.replace("layer_sharing = { scheme = \"cycle\", repeats = 4 }", &format!("{sharing}\nnum_hidden_layers = 2"));
        let text = text.replace("num_hidden_layers = 1\n", "");
        let cfg = ModelConfig::from_toml_str(&text, Path::new("share.toml")).unwrap();
        let m = DecoderModel::new(cfg, Device::Cpu).unwrap();
        let params = check_walk(sharing, &m, m.var_store());
        assert!(params.iter().all(|p| p.role.decays(&p.tensor) == old_rule(p)), "{sharing}");
    }
}

#[test]
fn moe_flops_count_each_routed_tokens_experts() {
    for (name, per_token) in [("moe-mixtral.toml", 2.0), ("moe-switch.toml", 1.0)] {
        let cfg = ModelConfig::from_toml_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs").join(name)).unwrap();
        let m = DecoderModel::new(cfg, Device::Cpu).unwrap();
        let seq = 64;
        // Without experts: the old count (2-D weights but embeddings, the tied head once more).
        let vars = m.var_store().variables();
        let dense: i64 = vars.iter().filter(|(n, t)| t.dim() == 2 && !n.contains("embed")).map(|(_, t)| t.numel() as i64).sum();
        let head = if m.config.tie_word_embeddings { m.config.vocab_size * m.config.hidden_size } else { 0 };
        let experts: Vec<_> = m.parameters().into_iter().filter(|p| matches!(p.role, Role::RoutedExperts { .. })).collect();
        assert!(!experts.is_empty(), "{name}: routed experts are listed as such");
        let e = experts[0].tensor.size()[0] as f64;
        let routed: f64 = experts.iter().map(|p| p.tensor.numel() as f64 * per_token / e).sum();
        let widths = m.config.num_hidden_layers * m.config.hidden_size;
        let want = stlm_core::flops::training_flops_per_token((dense + head) as f64 + routed, 1, widths, seq);
        let got = m.flops_per_token(seq);
        assert!((got - want).abs() < 1.0, "{name}: {got} vs {want}");
        assert!(routed > 0.0 && got > stlm_core::flops::training_flops_per_token((dense + head) as f64, 1, widths, seq));
    }
}
