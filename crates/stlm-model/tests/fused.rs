//! The fused decoding step is decided by the layers: for every token model in `configs/` (at a
//! small width, so the suite stays fast) it either gives the libtorch step's logits position by
//! position, or refuses with a stated reason.

use std::path::{Path, PathBuf};
use stlm_model::{DecoderModel, Depth, FastDecoder, ModelConfig};
use tch::{Device, Tensor};

fn configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).collect();
    files.sort();
    files
}

/// The config at `path`, with a small vocabulary and context (widths and everything else kept).
fn small(path: &Path) -> ModelConfig {
    let text = std::fs::read_to_string(path).unwrap();
    let mut cfg = ModelConfig::from_toml_str(&text, path).unwrap();
    cfg.vocab_size = cfg.vocab_size.min(512);
    cfg
}

#[test]
fn every_config_decodes_fused_like_libtorch_or_says_why_not() {
    let _guard = tch::no_grad_guard();
    let (mut fused, mut refused) = (Vec::new(), Vec::new());
    for path in configs() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let cfg = small(&path);
        if cfg.bytes.is_some() {
            continue; // byte models decode through their own local decoder
        }
        tch::manual_seed(3);
        let mut m = DecoderModel::new(cfg, Device::Cpu).unwrap();
        // B starts at zero in a new model: move LoRA deltas and residual scales off their start,
        // so a step that ignored them would differ.
        for (_, mut v) in m.var_store().variables() {
            if v.dim() >= 1 {
                let _ = v.g_add_(&(Tensor::randn_like(&v) * 0.02));
            }
        }
        for prepare in [false, true] {
            if prepare {
                m.optimize_for_decoding();
            }
            let mut fast = match FastDecoder::try_new(&m) {
                Ok(f) => f,
                Err(why) => {
                    assert!(why.0.len() > 10, "{name}: a refusal states its reason, got `{}`", why.0);
                    refused.push(format!("{name}: {}", why.0));
                    break;
                }
            };
            let (mut a, mut b) = (m.new_cache(1, 12), m.new_cache(1, 12));
            let mut token = 7;
            for position in 0..12 {
                let la = fast.step(token, position, &mut a);
                let lb = m.step_depth(token, position, &mut b, Depth::Full).0;
                let diff = (&la - &lb).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{name} (fused projections: {prepare}): position {position}: logits differ by {diff}");
                token = lb.reshape([-1]).argmax(0, false).int64_value(&[]);
            }
            if prepare {
                fused.push(name.clone());
            }
        }
    }
    eprintln!("fused: {fused:?}\nrefused:\n  {}", refused.join("\n  "));
    for must in ["default.toml", "llama-6m.toml", "gpt2-tiny.toml", "share-albert.toml"] {
        assert!(fused.iter().any(|n| n == must), "{must} takes the fused step");
    }
    for (must, why) in [("moe-mixtral.toml", "mixture of experts"), ("attn-doge-dma.toml", "doge-dma"), ("pos-alibi.toml", "ALiBi")] {
        assert!(refused.iter().any(|r| r.starts_with(must) && r.contains(why)), "{must} is refused for {why}: {refused:?}");
    }
}
