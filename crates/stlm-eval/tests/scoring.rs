//! Likelihood scoring against independent computations: batched, padded, truncated token
//! scoring equals one float64 forward per request over the ids built by hand; byte scoring
//! follows the chain rule and sums to the model's own chunk nats; task metrics (acc, acc_norm,
//! partial scoring, LAMBADA greedy and perplexity) follow from the log-likelihoods as the harness
//! computes them; per-position loss equals plain cross entropy per position.

use indicatif::ProgressBar;
use std::sync::Mutex;
use stlm_eval::position::position_loss;
use stlm_eval::score::{scorer, split_pair, Request, Scorer, TokenScorer};
use stlm_eval::tasks::{evaluate, Doc, Task, TaskOptions};
use stlm_model::{AnyModel, BytePooledModel, DecoderModel, ModelConfig};
use stlm_tokenizers::{BpeOptions, Tokenizer};
use tch::{Device, Kind, Tensor};

/// Tests in this binary share libtorch's global generator: seed and draw under one lock.
static RNG: Mutex<()> = Mutex::new(());

const TEXT: &str = "Once upon a time there was a little fox. The fox liked to run in the green field. \
One day the fox met a bird. The bird could sing. They played all day and were happy.";

fn tokenizer() -> Tokenizer {
    let texts: Vec<String> = TEXT.split(". ").map(|s| format!("{s}. ")).collect();
    Tokenizer::train_bpe_on_texts(&texts, &BpeOptions { vocab_size: 300, ..Default::default() }).unwrap()
}

fn token_model(vocab: usize, seed: i64) -> DecoderModel {
    let text = format!(
        "vocab_size = {vocab}\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nmax_position_embeddings = 64\nbos_token_id = 0\n"
    );
    let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
    let _lock = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    DecoderModel::new(cfg, Device::Cpu).unwrap()
}

fn byte_model(chunker: &str) -> BytePooledModel {
    let text = format!(
        "model_type = \"stlm\"\nvocab_size = 258\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 1\nnum_attention_heads = 2\nmax_position_embeddings = 64\nbytes = {{ chunker = {chunker}, local_hidden_size = 16, local_heads = 2, local_intermediate_size = 32, encoder_layers = 1, decoder_layers = 1 }}\n"
    );
    let cfg = ModelConfig::from_toml_str(&text, std::path::Path::new("b.toml")).unwrap();
    let _lock = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    BytePooledModel::new(cfg, Device::Cpu).unwrap()
}

/// The harness's log-likelihood of one request, computed alone in float64: ids of
/// `context + continuation` after moving trailing whitespace, the continuation's ids those after
/// the context's own encoding, left truncation to `window + 1` ids.
fn reference(model: &DecoderModel, tok: &Tokenizer, r: &Request, window: usize) -> (f64, bool) {
    let enc = |s: &str| tok.encode(s, false).unwrap().into_iter().map(i64::from).collect::<Vec<_>>();
    let (ctx, cont) = if r.context.is_empty() {
        (vec![0], enc(&r.continuation))
    } else {
        let (c, k) = split_pair(&r.context, &r.continuation);
        let whole = enc(&format!("{c}{k}"));
        let c = enc(&c);
        (c.clone(), whole[c.len()..].to_vec())
    };
    let all: Vec<i64> = ctx.into_iter().chain(cont.iter().copied()).collect();
    let start = all.len().saturating_sub(window + 1);
    let input = &all[start..all.len() - 1];
    let _g = tch::no_grad_guard();
    let logits = model.forward(&Tensor::from_slice(input).unsqueeze(0)).squeeze_dim(0).to_kind(Kind::Double);
    let logp = logits.log_softmax(-1, Kind::Double);
    let (mut total, mut greedy) = (0.0, true);
    for (k, &t) in cont.iter().enumerate() {
        let pos = (input.len() - cont.len() + k) as i64;
        total += logp.double_value(&[pos, t]);
        greedy &= logp.get(pos).argmax(0, false).int64_value(&[]) == t;
    }
    (total, greedy)
}

fn requests() -> Vec<Request> {
    vec![
        Request::new("Once upon a time", " there was a fox."),
        Request::new("Once upon a time ", "there was a bird."),
        Request::new("The fox", " liked to run in the green field and the bird could sing all day long."),
        Request::new("", " The bird could sing."),
        Request::new("One day the fox met a bird. The bird could sing. They played all day and", " were happy."),
        Request::new("Question: Who met a bird?\nAnswer:", " the fox"),
    ]
}

#[test]
fn batched_token_scores_equal_single_float64_forwards() {
    let tok = tokenizer();
    let model = token_model(tok.vocab_size(), 3);
    let reqs = requests();
    // Windows: the whole context, and one short enough that long contexts lose their start.
    for (window, budget) in [(64, 8192), (48, 100)] {
        let scorer = TokenScorer::new(&model, &tok, window, budget).unwrap();
        let got = scorer.loglikelihood(&reqs, &ProgressBar::hidden()).unwrap();
        for (r, g) in reqs.iter().zip(&got) {
            let (want, greedy) = reference(&model, &tok, r, window);
            assert!((g.logprob - want).abs() < 1e-4, "window {window}: {r:?}: {} vs {want}", g.logprob);
            assert_eq!(g.greedy, greedy, "{r:?}");
            assert!(g.logprob < 0.0);
        }
    }
    // Trailing whitespace of the context moves to the continuation: the same ids either way.
    let s = TokenScorer::new(&model, &tok, 64, 8192).unwrap();
    assert_eq!(s.encode_pair(&reqs[1]).unwrap(), s.encode_pair(&Request::new("Once upon a time", " there was a bird.")).unwrap());
    // A continuation longer than the window is an error, not a silent cut.
    let s = TokenScorer::new(&model, &tok, 4, 8192).unwrap();
    let e = s.loglikelihood(&reqs[2..3], &ProgressBar::hidden()).unwrap_err().to_string();
    assert!(e.contains("more than the window of 4"), "{e}");
}

#[test]
fn byte_scores_follow_the_chain_rule_and_sum_to_chunk_nats() {
    for chunker in ["{ kind = \"fixed\", size = 4 }", "{ kind = \"whitespace\", max_len = 8 }"] {
        let model = byte_model(chunker);
        let any = AnyModel::Bytes(Box::new(model));
        let AnyModel::Bytes(model) = &any else { unreachable!() };
        let tok = Tokenizer::bytes();
        let s = scorer(&any, &tok, None, 4096).unwrap();
        let bar = ProgressBar::hidden();
        // log p(a b | c) = log p(a | c) + log p(b | c a).
        let got = s
            .loglikelihood(
                &[
                    Request::new("The fox met", " a bird and sang"),
                    Request::new("The fox met", " a bird"),
                    Request::new("The fox met a bird", " and sang"),
                ],
                &bar,
            )
            .unwrap();
        assert!((got[0].logprob - (got[1].logprob + got[2].logprob)).abs() < 1e-3, "{chunker}: {got:?}");
        // Every byte after the first, summed, is the model's chunk nats minus the first byte's.
        let row: Vec<u32> = "The fox met a bird".bytes().map(u32::from).collect();
        let _g = tch::no_grad_guard();
        let chunks = model.chunk_rows(std::slice::from_ref(&row)).unwrap().remove(0);
        let total: f64 = model.chunk_nats(&row, &chunks, false).iter().sum();
        let first: f64 = model.chunk_nats(&row[..1], &[1], false)[0];
        let (dropped, scores) = model.byte_scores(std::slice::from_ref(&row), 64).unwrap().remove(0);
        assert_eq!(dropped, 0);
        let sum: f64 = scores[1..].iter().map(|x| x.0).sum();
        assert!((sum - (total - first)).abs() < 1e-3, "{chunker}: {sum} vs {}", total - first);
        // Truncation drops whole chunks from the front.
        let (dropped, scores) = model.byte_scores(std::slice::from_ref(&row), 2).unwrap().remove(0);
        assert_eq!(dropped + scores.len(), row.len());
        assert!(dropped > 0);
    }
}

/// A scorer that returns fixed log-likelihoods, so metrics can be checked by hand.
struct Fixed(Vec<(f64, bool)>);

impl Scorer for Fixed {
    fn loglikelihood(&self, requests: &[Request], _: &ProgressBar) -> stlm_eval::Result<Vec<stlm_eval::score::Scored>> {
        assert_eq!(requests.len(), self.0.len());
        Ok(self.0.iter().map(|&(logprob, greedy)| stlm_eval::score::Scored { logprob, greedy }).collect())
    }
    fn generate_until(&self, contexts: &[String], _: &[String], _: usize, _: &ProgressBar) -> stlm_eval::Result<Vec<String>> {
        Ok(contexts.iter().map(|c| if c.contains("France") { " paris".to_string() } else { " Lyon".to_string() }).collect())
    }
}

#[test]
fn metrics_follow_the_harness() {
    let bar = ProgressBar::hidden();
    let opts = TaskOptions::default();
    // acc: argmax of log-likelihoods; acc_norm: argmax of log-likelihood per character of the
    // choice (delimiter not counted). Item 1: "a" -2 vs "bbbbbbbbbb" -5 -> acc picks 0 (gold 1
    // wrong), acc_norm -2/1 vs -5/10 picks 1 (right). Item 2: both pick 0 = gold.
    let docs = vec![
        Doc::Choice { text: "Q1".into(), choices: vec!["a".into(), "bbbbbbbbbb".into()], gold: 1, description: String::new() },
        Doc::Choice { text: "Q2".into(), choices: vec!["yes".into(), "no".into()], gold: 0, description: String::new() },
    ];
    let (r, items) = evaluate(Task::Piqa, &docs, &Fixed(vec![(-2.0, false), (-5.0, false), (-1.0, true), (-3.0, false)]), &opts, &bar).unwrap();
    assert_eq!((r.n, r.acc, r.acc_norm), (2, 0.5, Some(1.0)));
    assert!((r.acc_stderr - 0.5).abs() < 1e-12, "sample std 0.7071 / sqrt(2)");
    assert_eq!(r.acc_norm_stderr, Some(0.0));
    assert_eq!(items[0].requests[1], ("Q1".to_string(), " bbbbbbbbbb".to_string()));
    // Ties go to the first choice, as numpy's argmax.
    let (r, _) = evaluate(Task::Piqa, &docs[1..], &Fixed(vec![(-1.0, false), (-1.0, false)]), &opts, &bar).unwrap();
    assert_eq!(r.acc, 1.0);
    // WinoGrande: acc only.
    let w = vec![Doc::Partial { contexts: vec!["A so x".into(), "A so y".into()], target: "ran.".into(), gold: 1 }];
    let (r, items) = evaluate(Task::Winogrande, &w, &Fixed(vec![(-4.0, false), (-3.0, false)]), &opts, &bar).unwrap();
    assert_eq!((r.acc, r.acc_norm), (1.0, None));
    assert_eq!(items[0].requests[0], ("A so x".to_string(), " ran.".to_string()));
    // LAMBADA: acc is the greedy flag, perplexity exp(-mean log-likelihood).
    let l = vec![Doc::Cloze { text: "a b".into(), target: " c".into() }, Doc::Cloze { text: "d e".into(), target: " f".into() }];
    let (r, _) = evaluate(Task::Lambada, &l, &Fixed(vec![(-1.0, true), (-3.0, false)]), &opts, &bar).unwrap();
    assert_eq!(r.acc, 0.5);
    assert!((r.perplexity.unwrap() - 2f64.exp()).abs() < 1e-12);
    // TriviaQA: exact match after lstrip, lower case, punctuation removed, against any alias.
    let t = vec![
        Doc::Generate { text: "Question: Capital of France?\nAnswer:".into(), answers: vec!["Paris.".into()] },
        Doc::Generate { text: "Question: Capital of Italy?\nAnswer:".into(), answers: vec!["Rome".into()] },
    ];
    let (r, items) = evaluate(Task::Triviaqa, &t, &Fixed(vec![]), &opts, &bar).unwrap();
    assert_eq!((r.acc, r.metric.as_str()), (0.5, "exact_match"));
    assert_eq!(items[0].generated.as_deref(), Some(" paris"));
}

#[test]
fn scores_through_real_models_pick_the_likelier_choice() {
    // A choice scored by the model itself: acc is 1 exactly when the gold choice has the
    // highest log-likelihood, for the token and the byte model alike.
    let tok = tokenizer();
    let token = AnyModel::Tokens(Box::new(token_model(tok.vocab_size(), 9)));
    let bytes_tok = Tokenizer::bytes();
    let bytes = AnyModel::Bytes(Box::new(byte_model("{ kind = \"whitespace\", max_len = 8 }")));
    for (model, tok) in [(&token, &tok), (&bytes, &bytes_tok)] {
        let s = scorer(model, tok, None, 4096).unwrap();
        let choices = vec!["there was a fox.".to_string(), "the bird could sing.".to_string(), "green".to_string()];
        let reqs: Vec<Request> = choices.iter().map(|c| Request::new("Once upon a time", format!(" {c}"))).collect();
        let lls = s.loglikelihood(&reqs, &ProgressBar::hidden()).unwrap();
        let best = (0..3).max_by(|&a, &b| lls[a].logprob.total_cmp(&lls[b].logprob)).unwrap();
        for gold in 0..3 {
            let doc = Doc::Choice { text: "Once upon a time".into(), choices: choices.clone(), gold, description: String::new() };
            let (r, _) = evaluate(Task::ArcEasy, &[doc], s.as_ref(), &TaskOptions::default(), &ProgressBar::hidden()).unwrap();
            assert_eq!(r.acc, f64::from(u8::from(gold == best)));
        }
    }
}

#[test]
fn position_loss_is_cross_entropy_per_position() {
    let tok = tokenizer();
    let model = token_model(tok.vocab_size(), 4);
    let ids: Vec<u32> = tok.encode(&TEXT.repeat(3), false).unwrap();
    let window = 16;
    let _g = tch::no_grad_guard();
    let direct: Vec<Vec<f64>> = (0..3)
        .map(|w| {
            let row: Vec<i64> = ids[w * window..w * window + window + 1].iter().map(|&t| i64::from(t)).collect();
            let logits = model.forward(&Tensor::from_slice(&row[..window]).unsqueeze(0)).squeeze_dim(0);
            let nll = logits.cross_entropy_loss::<Tensor>(&Tensor::from_slice(&row[1..]), None, tch::Reduction::None, -100, 0.0);
            Vec::<f64>::try_from(nll.to_kind(Kind::Double)).unwrap()
        })
        .collect();
    let any = AnyModel::Tokens(Box::new(model));
    let p = position_loss(&any, &ids, window, 3, 2, &ProgressBar::hidden()).unwrap();
    assert_eq!((p.windows, p.mean.len()), (3, window));
    for pos in 0..window {
        let want = direct.iter().map(|r| r[pos]).sum::<f64>() / 3.0;
        assert!((p.mean[pos] - want).abs() < 1e-5, "position {pos}: {} vs {want}", p.mean[pos]);
    }
    assert!(position_loss(&any, &ids[..10], window, 3, 2, &ProgressBar::hidden()).is_err());
}

/// Hugging Face parquet: HellaSwag rows (strings, a list column) read into the same items as
/// the same fields in jsonl.
#[test]
fn parquet_items_equal_jsonl_items() {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    use stlm_eval::tasks::load_docs;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hellaswag.parquet");
    let schema = "message schema { REQUIRED BYTE_ARRAY activity_label (UTF8); REQUIRED BYTE_ARRAY ctx_a (UTF8); \
        REQUIRED BYTE_ARRAY ctx_b (UTF8); REPEATED BYTE_ARRAY endings (UTF8); REQUIRED BYTE_ARRAY label (UTF8); }";
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
    let mut writer = SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), schema, Arc::new(WriterProperties::builder().build())).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    let columns: [&[&str]; 5] = [&["Baking", "Dogs"], &["A man mixes flour.", "A dog runs."], &["he", "it"], &["adds eggs.", "sings.", "barks.", "flies."], &["0", "1"]];
    for (i, values) in columns.iter().enumerate() {
        let mut col = rg.next_column().unwrap().unwrap();
        let data: Vec<ByteArray> = values.iter().map(|s| ByteArray::from(*s)).collect();
        let writer = col.typed::<ByteArrayType>();
        if i == 3 {
            // Two endings per row: repetition level 0 starts a row.
            writer.write_batch(&data, Some(&[1, 1, 1, 1]), Some(&[0, 1, 0, 1])).unwrap();
        } else {
            writer.write_batch(&data, None, None).unwrap();
        }
        col.close().unwrap();
    }
    rg.close().unwrap();
    writer.close().unwrap();
    let docs = load_docs(Task::Hellaswag, &path, 10).unwrap();
    let jsonl = dir.path().join("hellaswag.jsonl");
    std::fs::write(
        &jsonl,
        "{\"activity_label\": \"Baking\", \"ctx_a\": \"A man mixes flour.\", \"ctx_b\": \"he\", \"endings\": [\"adds eggs.\", \"sings.\"], \"label\": \"0\"}\n\
         {\"activity_label\": \"Dogs\", \"ctx_a\": \"A dog runs.\", \"ctx_b\": \"it\", \"endings\": [\"barks.\", \"flies.\"], \"label\": \"1\"}\n",
    )
    .unwrap();
    assert_eq!(docs, load_docs(Task::Hellaswag, &jsonl, 10).unwrap());
    assert_eq!(docs[0].requests("")[0], Request::new("Baking: A man mixes flour. He", " adds eggs."));
    assert_eq!(load_docs(Task::Hellaswag, &path, 1).unwrap().len(), 1, "--limit");
    let e = load_docs(Task::Piqa, &path, 10).unwrap_err().to_string();
    assert!(e.contains("hellaswag.parquet") && e.contains("goal"), "{e}");
}
