//! Byte-pooled models: byte-level causality for both decoders and both poolings (a changed byte
//! never changes the predicted distribution of itself or earlier bytes), with fixed and
//! entropy chunks; pad positions neither train nor enter the pooled vectors; the loss is the
//! mean of the real bytes' (and chunk ends') negative log-likelihoods.

use proptest::prelude::*;
use stlm_model::bytes::{ChunkGrid, BYTE_CLASSES, EOC};
use stlm_model::{BytePooledModel, DecoderModel, ModelConfig};
use tch::{Device, Kind, Tensor};

fn config(extra: &str) -> ModelConfig {
    let text = format!(
        "model_type = \"stlm\"\nvocab_size = 258\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 128\ninitializer_range = 0.2\n{extra}"
    );
    ModelConfig::from_toml_str(&text, std::path::Path::new("bytes.toml")).expect("valid config")
}

fn model(chunker: &str, decoder: &str, pooling: &str) -> BytePooledModel {
    tch::manual_seed(3);
    let extra = format!(
        "bytes = {{ chunker = {chunker}, local_hidden_size = 16, local_heads = 2, local_intermediate_size = 32, encoder_layers = 1, decoder_layers = 1, decoder = \"{decoder}\", pooling = \"{pooling}\", reconstruction_loss = 0.1 }}\n"
    );
    BytePooledModel::new(config(&extra), Device::Cpu).expect("model")
}

fn log_probs(m: &BytePooledModel, row: &[u32]) -> Tensor {
    let _g = tch::no_grad_guard();
    m.byte_log_probs(&[row.to_vec()], false).unwrap().remove(0).0
}

/// A tiny byte model saved to disk, for the entropy chunker.
fn entropy_model_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        tch::manual_seed(9);
        let cfg = ModelConfig::from_toml_str(
            "model_type = \"stlm\"\nvocab_size = 258\nhidden_size = 16\nintermediate_size = 32\nnum_hidden_layers = 1\nnum_attention_heads = 2\nmax_position_embeddings = 64\ninitializer_range = 0.5\n",
            std::path::Path::new("entropy.toml"),
        )
        .unwrap();
        DecoderModel::new(cfg, Device::Cpu).unwrap().save(dir.path(), None).unwrap();
        dir
    })
    .path()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Changing byte `j` leaves the log-probabilities of bytes `0..=j` unchanged.
    #[test]
    fn byte_level_causality(seed in 0u64..1000, j in 0usize..40) {
        let entropy = format!("{{ kind = \"entropy\", model = \"{}\", threshold = 5.4, max_len = 6 }}", entropy_model_dir().display());
        let row: Vec<u32> = (0..40u64).map(|i| ((seed * 31 + i * 17) % 250) as u32).collect();
        let mut changed = row.clone();
        changed[j] = (changed[j] + 101) % 256;
        for (chunker, decoder, pooling) in [
            ("{ kind = \"fixed\", size = 4 }", "autoregressive", "mean"),
            ("{ kind = \"fixed\", size = 5 }", "parallel", "attention"),
            (entropy.as_str(), "autoregressive", "attention"),
            (entropy.as_str(), "parallel", "mean"),
        ] {
            let m = model(chunker, decoder, pooling);
            let (a, b) = (log_probs(&m, &row), log_probs(&m, &changed));
            prop_assert_eq!(a.size(), vec![40, BYTE_CLASSES]);
            let diff = (a.narrow(0, 0, j as i64 + 1) - b.narrow(0, 0, j as i64 + 1)).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-5, "{} {}: bytes <= {} changed by {}", chunker, decoder, j, diff);
            if j + 1 < 40 {
                let later = (a.narrow(0, j as i64 + 1, 1) - b.narrow(0, j as i64 + 1, 1)).abs().max().double_value(&[]);
                prop_assert!(later > 0.0 || decoder == "parallel", "{} {}: the byte after {} must see it", chunker, decoder, j);
            }
        }
    }
}

#[test]
fn entropy_chunks_start_where_the_byte_model_is_unsure() {
    let m = model(&format!("{{ kind = \"entropy\", model = \"{}\", threshold = 5.4, max_len = 6 }}", entropy_model_dir().display()), "autoregressive", "mean");
    let row: Vec<u32> = "Once upon a time there was a fox.".bytes().map(u32::from).collect();
    let chunks = m.chunk_rows(std::slice::from_ref(&row)).unwrap().remove(0);
    assert_eq!(chunks.iter().sum::<usize>(), row.len());
    assert!(chunks.len() > row.len() / 6, "{chunks:?}");
}

/// Pad bytes neither train nor reach real positions: the gradient of the pad embedding is
/// exactly zero, and the loss equals the mean over real targets computed from the logits.
#[test]
fn padding_is_ignored() {
    for (decoder, pooling) in [("autoregressive", "mean"), ("parallel", "attention")] {
        let m = model("{ kind = \"whitespace\", max_len = 12 }", decoder, pooling);
        // Mostly-padding chunks: one-letter words in 12-byte slots.
        let rows: Vec<Vec<u32>> = ["a b c d e f g", "I am ok, x y"].iter().map(|t| t.bytes().map(u32::from).collect()).collect();
        let chunks = m.chunk_rows(&rows).unwrap();
        let grid = ChunkGrid::new(&rows, &chunks, 12, false, Device::Cpu);
        let (loss, aux) = m.grid_loss(&grid);
        (&loss + aux.unwrap()).backward();
        let pad_grad = m.byte_embed.grad().get(stlm_tokenizers::BYTE_PAD as i64).abs().sum(Kind::Float).double_value(&[]);
        assert_eq!(pad_grad, 0.0, "{decoder}: the pad embedding got gradient {pad_grad}");
        assert!(m.byte_embed.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);

        let _g = tch::no_grad_guard();
        let (logits, _) = m.grid_logits(&grid);
        let logp = logits.log_softmax(-1, Kind::Double);
        let targets: Vec<i64> = Vec::try_from(grid.targets.reshape([-1])).unwrap();
        let flat = logp.reshape([-1, BYTE_CLASSES]);
        let mut total = 0.0;
        let mut eocs = 0;
        for (i, &t) in targets.iter().enumerate() {
            if t >= 0 {
                total -= flat.double_value(&[i as i64, t]);
                eocs += (t == EOC) as usize;
            }
        }
        let real = rows.iter().map(Vec::len).sum::<usize>();
        assert_eq!(targets.iter().filter(|&&t| t >= 0).count(), real + eocs);
        assert_eq!(eocs, chunks.iter().map(|c| c.len() - 1).sum::<usize>(), "every chunk but each row's last ends with EOC");
        assert!((loss.double_value(&[]) - total / real as f64).abs() < 1e-4, "{decoder}");
    }
}

#[test]
fn bad_byte_configs_are_named() {
    let e = ModelConfig::from_toml_str(
        "model_type = \"stlm\"\nvocab_size = 4096\nbytes = { chunker = { kind = \"fixed\", size = 4 }, local_hidden_size = 16, local_heads = 2, local_intermediate_size = 32 }\n",
        std::path::Path::new("b.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bytes") && e.contains("vocab_size = 258"), "{e}");
    let e = ModelConfig::from_toml_str(
        "model_type = \"stlm\"\nvocab_size = 258\nbytes = { chunker = { kind = \"fixed\", size = 0 }, local_hidden_size = 16, local_heads = 2, local_intermediate_size = 32 }\n",
        std::path::Path::new("b.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("chunker") && e.contains("size"), "{e}");
    let cfg = config("bytes = { chunker = { kind = \"fixed\", size = 4 }, local_hidden_size = 16, local_heads = 2, local_intermediate_size = 32 }\n");
    assert!(DecoderModel::new(cfg.clone(), Device::Cpu).is_err(), "a token model refuses a byte config");
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
}
