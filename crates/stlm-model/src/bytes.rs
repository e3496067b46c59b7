//! Byte-pooled models (Super Tiny Language Models, BLT): bytes are grouped into chunks, a small
//! bidirectional byte encoder pools each chunk into one vector, a causal global decoder runs over
//! the chunk vectors, and a byte decoder predicts the next chunk's bytes from the global state.
//!
//! ```text
//! bytes [b, n] --chunker--> grid [b, chunks, L] --byte_embed + positions--> encoder blocks
//!   (bidirectional inside a chunk, padding masked) --pool (masked mean | attention)--> [b, chunks, hidden]
//!   --[start, chunk 0, .., chunk m-2]--> global decoder (causal over chunks) --> state g_m per chunk
//!   --> byte decoder: autoregressive (cond = g_m, then the chunk's bytes, causal) or parallel
//!       (all L slots of chunk m from g_m at once) --> logits over bytes, <|endoftext|> and EOC
//! ```
//!
//! Chunk `m` is predicted from chunks `< m` only (and, autoregressively, from its own earlier
//! bytes). Each chunk's end is predicted too (the EOC class after its last byte, when shorter
//! than `L`), so the loss is the log-likelihood of the chunked text: an honest number of bits
//! whichever chunker made the chunks. Pad positions are never targets. Two flaws of the STLM
//! reference are avoided: pad bytes neither train nor enter the pooled mean, and positions are
//! added once.

use crate::config::{ModelConfig, ModelType, PositionKind};
use crate::layers::{DecoderLayer, Linear, Norm, RotaryAngles};
use crate::generate::{GenerationConfig, Sampler};
use crate::{DecoderModel, ModelError, Result};
use std::path::Path;
use stlm_attention::{AttentionMask, Rope};
use stlm_core::{Layer, Mode, OptionError, Role, Walk};
use stlm_moe::MoeStats;
use stlm_tokenizers::{Chunker, ChunkerKind, BYTE_PAD};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

pub use crate::byte_config::{ByteDecoder, BytesConfig, Pooling, BYTE_CLASSES, EOC};

/// Ignored target.
const IGNORE: i64 = -100;

/// A row's [`BytePooledModel::byte_scores`]: bytes dropped from its front, and `(nats, greedy)`
/// of each kept byte.
pub type RowScores = (usize, Vec<(f64, bool)>);

/// Chunked rows as tensors: bytes `[b, chunks, L]` (padding `<|pad|>`), lengths `[b, chunks]`,
/// targets `[b, chunks, L]` (bytes, EOC after a chunk shorter than `L`, -100 elsewhere).
#[derive(Debug)]
pub struct ChunkGrid {
    /// Byte ids `[b, chunks, L]`.
    pub bytes: Tensor,
    /// Real bytes per chunk `[b, chunks]` (0 for padding chunks).
    pub lengths: Tensor,
    /// Targets `[b, chunks, L]`.
    pub targets: Tensor,
    /// Where each row's bytes are: `(chunk, slot)` per byte.
    pub places: Vec<Vec<(i64, i64)>>,
    /// Real bytes in the grid.
    pub real_bytes: i64,
}

impl ChunkGrid {
    /// The grid of `rows` chunked into `chunks` (lengths per row), `L = max_len`. The last chunk
    /// of a row gets an EOC target only when `last_ends` (a row cut from a longer text does not
    /// know whether its last chunk is complete).
    pub fn new(rows: &[Vec<u32>], chunks: &[Vec<usize>], max_len: i64, last_ends: bool, device: Device) -> Self {
        let b = rows.len() as i64;
        let m = chunks.iter().map(Vec::len).max().unwrap_or(0).max(1) as i64;
        let l = max_len;
        let mut bytes = vec![BYTE_PAD as i64; (b * m * l) as usize];
        let mut targets = vec![IGNORE; (b * m * l) as usize];
        let mut lengths = vec![0i64; (b * m) as usize];
        let mut places = Vec::with_capacity(rows.len());
        for (r, (row, row_chunks)) in rows.iter().zip(chunks).enumerate() {
            let mut at = 0;
            let mut row_places = Vec::with_capacity(row.len());
            for (c, &n) in row_chunks.iter().enumerate() {
                let base = ((r as i64 * m + c as i64) * l) as usize;
                for i in 0..n {
                    bytes[base + i] = row[at + i] as i64;
                    targets[base + i] = row[at + i] as i64;
                    row_places.push((c as i64, i as i64));
                }
                let last = c + 1 == row_chunks.len();
                if (n as i64) < l && (!last || last_ends) {
                    targets[base + n] = EOC;
                }
                lengths[r * m as usize + c] = n as i64;
                at += n;
            }
            places.push(row_places);
        }
        let t = |v: &[i64], shape: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        ChunkGrid {
            bytes: t(&bytes, &[b, m, l]),
            lengths: t(&lengths, &[b, m]),
            targets: t(&targets, &[b, m, l]),
            places,
            real_bytes: rows.iter().map(|r| r.len() as i64).sum(),
        }
    }
}

/// A stack of pre-norm blocks over `[n, s, hidden]` with a final norm (the byte encoder or decoder).
struct Stack {
    layers: Vec<DecoderLayer>,
    norm: Norm,
}

impl Stack {
    fn new(path: nn::Path, cfg: &ModelConfig, layers: i64) -> Self {
        Stack {
            layers: (0..layers).map(|i| DecoderLayer::new(&path / "layers" / i, cfg, i as usize)).collect(),
            norm: Norm::new(&path / "norm", cfg.norm, cfg.hidden_size, cfg.norm_eps),
        }
    }

    fn forward(&self, x: &Tensor, mask: &AttentionMask) -> Tensor {
        let (n, s) = (x.size()[0], x.size()[1]);
        let positions = Tensor::arange(s, (Kind::Int64, x.device())).unsqueeze(0).expand([n, s], false);
        let x = self.layers.iter().fold(x.shallow_clone(), |x, l| l.forward(&x, None, &positions, mask, None));
        self.norm.forward(&x)
    }
}

impl Layer for Stack {
    fn visit(&self, walk: &mut Walk<'_>) {
        for (i, l) in self.layers.iter().enumerate() {
            walk.layer(&format!("layers.{i}"), l);
        }
        walk.layer("norm", &self.norm);
    }
}

impl Layer for BytePooledModel {
    fn visit(&self, walk: &mut Walk<'_>) {
        walk.param("model.byte_embed.weight", &self.byte_embed, Role::Embedding);
        // Slot positions are added to every chunk whole, not looked up by id.
        walk.param("model.encoder.positions", &self.encoder_positions, Role::Scale);
        walk.param("model.decoder.positions", &self.decoder_positions, Role::Scale);
        walk.param_opt("model.pool_query", self.pool_query.as_ref(), Role::Scale);
        walk.layer("model.pool_proj", &self.pool_proj);
        walk.param("model.start_chunk", &self.start_chunk, Role::Scale);
        walk.layer("model.encoder", &self.encoder);
        for (i, l) in self.layers.iter().enumerate() {
            walk.layer(&format!("model.layers.{i}"), l);
        }
        walk.layer("model.norm", &self.norm);
        walk.layer("model.decoder", &self.decoder);
        walk.layer("model.cond_proj", &self.cond_proj);
        walk.layer_opt("model.reconstruct_proj", self.reconstruct_proj.as_ref());
        walk.layer("lm_head", &self.lm_head);
    }
}

/// A byte model's pass: the logged loss (nats per target byte), the weighted reconstruction loss
/// (if on), and the global decoder's MoE stats (`(layer index, stats)`).
pub type ByteLoss = (Tensor, Option<Tensor>, Vec<(usize, MoeStats)>);

/// A byte-pooled language model and the variable store that owns its weights.
pub struct BytePooledModel {
    /// The config it was built from (`bytes` set).
    pub config: ModelConfig,
    /// The byte path settings (a copy of `config.bytes`).
    pub bytes: BytesConfig,
    /// Byte embedding `[258, local]` (`model.byte_embed.weight`).
    pub byte_embed: Tensor,
    /// Slot embedding inside a chunk `[L, local]`, for the encoder (`model.encoder.positions`).
    pub encoder_positions: Tensor,
    /// Slot embedding of the decoder's inputs `[L, local]` (`model.decoder.positions`).
    pub decoder_positions: Tensor,
    /// The learned query of attention pooling `[local]` (`model.pool_query`).
    pub pool_query: Option<Tensor>,
    /// Pooled chunk to global width (`model.pool_proj`).
    pub pool_proj: Linear,
    /// The global input before the first chunk `[hidden]` (`model.start_chunk`).
    pub start_chunk: Tensor,
    /// Global decoder blocks (`model.layers.{i}`) and final norm (`model.norm`).
    pub layers: Vec<DecoderLayer>,
    /// Final norm of the global decoder.
    pub norm: Norm,
    /// Global state to the decoder's conditioning (`model.cond_proj`): `[local]` for the
    /// autoregressive decoder, `[L · local]` for the parallel one.
    pub cond_proj: Linear,
    /// Pooled chunk to `L` reconstruction slots (`model.reconstruct_proj`), when that loss is on.
    pub reconstruct_proj: Option<Linear>,
    /// Output head `[259, local]` (`lm_head`).
    pub lm_head: Linear,
    encoder: Stack,
    decoder: Stack,
    rope: Option<Rope>,
    chunker: Chunker,
    entropy_model: Option<DecoderModel>,
    vs: nn::VarStore,
}

impl BytePooledModel {
    /// Builds a randomly initialised model in float32 on `device` (loading the chunker's
    /// tokenizer or entropy model, which must exist).
    pub fn new(config: ModelConfig, device: Device) -> Result<Self> {
        config.validate(Path::new("model config"))?;
        let bytes = config.bytes.clone().ok_or_else(|| ModelError::config(Path::new("model config"), "byte models need a `bytes` table"))?;
        let chunker = Chunker::new(&bytes.chunker).map_err(|e| ModelError::Input(e.to_string()))?;
        let entropy_model = match &bytes.chunker {
            ChunkerKind::Entropy { model, .. } => {
                let m = crate::load_model(model, device, stlm_core::DType::Float32)?;
                if m.config.vocab_size < 257 {
                    return Err(ModelError::Input(format!("{}: the entropy model must read bytes (vocab_size 258)", model.display())));
                }
                Some(m)
            }
            _ => None,
        };
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let model = &root / "model";
        let std = config.initializer_range;
        let (l, dl, dg) = (bytes.max_len(), bytes.local_hidden_size, config.hidden_size);
        let local = local_config(&config, &bytes);
        let n = |s: f64| Init::Randn { mean: 0.0, stdev: s };
        let cond_width = match bytes.decoder {
            ByteDecoder::Autoregressive => dl,
            ByteDecoder::Parallel => l * dl,
        };
        let out = BytePooledModel {
            byte_embed: (&model / "byte_embed").var("weight", &[BYTE_CLASSES - 1, dl], n(std)),
            encoder_positions: (&model / "encoder").var("positions", &[l, dl], n(std)),
            decoder_positions: (&model / "decoder").var("positions", &[l, dl], n(std)),
            pool_query: (bytes.pooling == Pooling::Attention).then(|| model.var("pool_query", &[dl], n(std))),
            pool_proj: Linear::new(&model / "pool_proj", dl, dg, false, std),
            start_chunk: model.var("start_chunk", &[dg], n(std)),
            layers: (0..config.num_hidden_layers).map(|i| DecoderLayer::new(&model / "layers" / i, &config, i as usize)).collect(),
            norm: Norm::new(&model / "norm", config.norm, dg, config.norm_eps),
            cond_proj: Linear::new(&model / "cond_proj", dg, cond_width, false, std),
            reconstruct_proj: (bytes.reconstruction_loss > 0.0).then(|| Linear::new(&model / "reconstruct_proj", dg, l * dl, false, std)),
            lm_head: Linear::new(&root / "lm_head", dl, BYTE_CLASSES, false, std),
            encoder: Stack::new(&model / "encoder", &local, bytes.encoder_layers),
            decoder: Stack::new(&model / "decoder", &local, bytes.decoder_layers),
            rope: (config.position == PositionKind::Rope).then(|| {
                Rope::with_scaling(config.rotary_dim(), config.rope_theta, config.rope_scaling.as_ref(), config.max_position_embeddings, device)
            }),
            chunker,
            entropy_model,
            bytes,
            config,
            vs,
        };
        Ok(out)
    }

    /// The variable store holding every weight.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Total number of parameters.
    pub fn num_parameters(&self) -> i64 {
        stlm_core::numel(&self.vs.trainable_variables())
    }

    /// Parameters of the byte path (embedding, encoder, pooling, conditioning, decoder, head)
    /// and of the global decoder, for comparisons with token models' embeddings and heads.
    pub fn parameter_split(&self) -> (i64, i64) {
        let count = |l: &dyn Layer| stlm_core::module::count_by_role(l, |_| true);
        let global = self.layers.iter().map(|l| count(l)).sum::<i64>() + count(&self.norm) + self.start_chunk.numel() as i64;
        (self.num_parameters() - global, global)
    }

    /// Chunk lengths of each row (running the entropy model for the entropy chunker).
    pub fn chunk_rows(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<usize>>> {
        rows.iter()
            .map(|row| {
                let chunks = match &self.entropy_model {
                    Some(m) => self.chunker.chunk_with_entropies(row, &next_byte_entropies(m, row)),
                    None => self.chunker.chunk(row),
                };
                chunks.map_err(|e| ModelError::Input(e.to_string()))
            })
            .collect()
    }

    /// Logits `[b, chunks, L, 259]` of every slot of `grid`, and the pooled chunk vectors
    /// `[b, chunks, hidden]`.
    pub fn grid_logits(&self, grid: &ChunkGrid) -> (Tensor, Tensor) {
        let (logits, pooled, _) = self.grid_logits_mode(grid, Mode::Eval);
        (logits, pooled)
    }

    /// [`BytePooledModel::grid_logits`] in `mode`, with the global decoder's MoE stats.
    fn grid_logits_mode(&self, grid: &ChunkGrid, mode: Mode) -> (Tensor, Tensor, Vec<(usize, MoeStats)>) {
        let (g, pooled, moe) = self.global_states_mode(&grid.bytes, &grid.lengths, mode);
        (self.decode(&grid.bytes, &g), pooled, moe)
    }

    /// The global decoder's state for each chunk `[b, chunks, hidden]` (state `m` has seen
    /// chunks `< m`), and the pooled chunk vectors `[b, chunks, hidden]`, for chunk bytes
    /// `[b, chunks, L]` with `lengths` `[b, chunks]`.
    pub fn global_states(&self, bytes: &Tensor, lengths: &Tensor) -> (Tensor, Tensor) {
        let (g, pooled, _) = self.global_states_mode(bytes, lengths, Mode::Eval);
        (g, pooled)
    }

    /// [`BytePooledModel::global_states`] in `mode`, with the stats of the global decoder's MoE
    /// blocks (`(layer index, stats)`).
    pub fn global_states_mode(&self, bytes: &Tensor, lengths: &Tensor, mode: Mode) -> (Tensor, Tensor, Vec<(usize, MoeStats)>) {
        let (b, m, l) = (bytes.size()[0], bytes.size()[1], bytes.size()[2]);
        let dl = self.bytes.local_hidden_size;
        // Encoder: each chunk alone, padding keys hidden.
        let x = Tensor::embedding(&self.byte_embed, bytes, -1, false, false) + &self.encoder_positions; // [b, m, l, dl]
        let slots = Tensor::arange(l, (Kind::Int64, self.device()));
        let valid = slots.view([1, 1, l]).lt_tensor(&lengths.unsqueeze(-1)).view([b * m, l]); // [b·m, l]
        let eye = Tensor::eye(l, (Kind::Bool, self.device()));
        let mask = AttentionMask::Explicit(valid.unsqueeze(1).logical_or(&eye).unsqueeze(1)); // [b·m, 1, l, l]
        let h = self.encoder.forward(&x.view([b * m, l, dl]), &mask); // [b·m, l, dl]
        let weights = match &self.pool_query {
            None => valid.to_kind(h.kind()),
            Some(q) => {
                let scores = h.matmul(q) / (dl as f64).sqrt(); // [b·m, l]
                scores.masked_fill(&valid.logical_not(), f64::NEG_INFINITY).softmax(-1, h.kind()).nan_to_num(0.0, None, None)
            }
        };
        let pooled = (&h * weights.unsqueeze(-1)).sum_dim_intlist(1, false, h.kind());
        let pooled = match self.bytes.pooling {
            Pooling::Mean => pooled / valid.sum_dim_intlist(1, true, h.kind()).clamp_min(1.0),
            Pooling::Attention => pooled,
        };
        let pooled = self.pool_proj.forward(&pooled.view([b, m, dl])); // [b, m, dg]
        // Global decoder: position j sees the start vector and chunks < j.
        let dg = self.config.hidden_size;
        let inputs = Tensor::cat(&[self.start_chunk.view([1, 1, dg]).expand([b, 1, dg], false), pooled.narrow(1, 0, m - 1)], 1);
        let positions = Tensor::arange(m, (Kind::Int64, self.device())).unsqueeze(0).expand([b, m], false);
        let rotary = self.rope.as_ref().map(|r| {
            let (cos, sin) = r.cos_sin(&positions, inputs.kind());
            RotaryAngles { cos, sin }
        });
        let mut moe = Vec::new();
        let mut g = inputs;
        for (i, layer) in self.layers.iter().enumerate() {
            let (y, stats) = layer.forward_with(&g, rotary.as_ref(), &positions, &AttentionMask::Causal, None, mode, None);
            g = y;
            moe.extend(stats.map(|s| (i, s)));
        }
        (self.norm.forward(&g), pooled, moe)
    }

    /// Logits `[b, chunks, L, 259]` of each chunk's slots from its global state `g`
    /// `[b, chunks, hidden]` (and, autoregressively, the chunk's bytes `[b, chunks, L]` before
    /// each slot).
    pub fn decode(&self, bytes: &Tensor, g: &Tensor) -> Tensor {
        let (b, m, l) = (bytes.size()[0], bytes.size()[1], bytes.size()[2]);
        let dl = self.bytes.local_hidden_size;
        let cond = self.cond_proj.forward(g);
        let states = match self.bytes.decoder {
            ByteDecoder::Autoregressive => {
                let previous = Tensor::embedding(&self.byte_embed, &bytes.narrow(2, 0, l - 1), -1, false, false);
                let x = Tensor::cat(&[cond.unsqueeze(2), previous], 2) + &self.decoder_positions; // [b, m, l, dl]
                self.decoder.forward(&x.view([b * m, l, dl]), &AttentionMask::Causal)
            }
            ByteDecoder::Parallel => {
                let x = cond.view([b, m, l, dl]) + &self.decoder_positions;
                self.decoder.forward(&x.view([b * m, l, dl]), &AttentionMask::Full)
            }
        };
        self.lm_head.forward(&states).view([b, m, l, BYTE_CLASSES])
    }

    /// Training loss of `grid`: (nats per real byte, with the EOC terms, for logging; the
    /// weighted reconstruction loss, if on).
    pub fn grid_loss(&self, grid: &ChunkGrid) -> (Tensor, Option<Tensor>) {
        let (loss, aux, _) = self.grid_loss_mode(grid, Mode::Eval);
        (loss, aux)
    }

    /// [`BytePooledModel::grid_loss`] in `mode`, with the global decoder's MoE stats.
    fn grid_loss_mode(&self, grid: &ChunkGrid, mode: Mode) -> ByteLoss {
        let (logits, pooled, moe) = self.grid_logits_mode(grid, mode);
        let nats = |logits: &Tensor, targets: &Tensor| {
            logits.reshape([-1, BYTE_CLASSES]).cross_entropy_loss::<Tensor>(&targets.reshape([-1]), None, tch::Reduction::Sum, IGNORE, 0.0)
        };
        let per_byte = nats(&logits, &grid.targets) / (grid.real_bytes.max(1) as f64);
        let aux = self.reconstruct_proj.as_ref().map(|proj| {
            let (b, m, l) = (grid.bytes.size()[0], grid.bytes.size()[1], grid.bytes.size()[2]);
            let x = proj.forward(&pooled).view([b, m, l, self.bytes.local_hidden_size]) + &self.decoder_positions;
            let own = grid.bytes.masked_fill(&grid.bytes.eq(BYTE_PAD as i64), IGNORE);
            nats(&self.lm_head.forward(&x), &own) / (grid.real_bytes.max(1) as f64) * self.bytes.reconstruction_loss
        });
        (per_byte, aux, moe)
    }

    /// Loss of byte windows `inputs` `[b, s]` with next-byte `targets` `[b, s]`: the window
    /// `inputs ++ last target` is chunked and every byte after the first is scored (the targets,
    /// as for token models; nats per target byte, chunk ends included), in `mode`: the logged
    /// loss, the weighted reconstruction loss (if on) and the global decoder's MoE stats.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor, mode: Mode) -> Result<ByteLoss> {
        let window = Tensor::cat(&[inputs, &targets.narrow(1, targets.size()[1] - 1, 1)], 1);
        let rows: Vec<Vec<u32>> = Vec::<Vec<i64>>::try_from(window.to_device(Device::Cpu))
            .map_err(|e| ModelError::Input(e.to_string()))?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as u32).collect())
            .collect();
        let chunks = self.chunk_rows(&rows)?;
        let mut grid = ChunkGrid::new(&rows, &chunks, self.bytes.max_len(), false, self.device());
        // The first byte of a window is not a target (it has no context, as for token models).
        let _ = grid.targets.narrow(1, 0, 1).narrow(2, 0, 1).fill_(IGNORE);
        grid.real_bytes -= rows.iter().filter(|r| !r.is_empty()).count() as i64;
        Ok(self.grid_loss_mode(&grid, mode))
    }

    /// Per-byte log-probabilities `[n, 259]` of each row's bytes (row `i`'s byte `t` scored from
    /// the bytes before it), plus the total nats of the row's chunk ends (EOC terms, the last
    /// chunk's when `last_ends`).
    pub fn byte_log_probs(&self, rows: &[Vec<u32>], last_ends: bool) -> Result<Vec<(Tensor, f64)>> {
        let chunks = self.chunk_rows(rows)?;
        let grid = ChunkGrid::new(rows, &chunks, self.bytes.max_len(), last_ends, self.device());
        let (logits, _) = self.grid_logits(&grid);
        let logp = logits.log_softmax(-1, Kind::Float);
        let eoc_nats = logp.select(-1, EOC).neg() * grid.targets.eq(EOC).to_kind(Kind::Float);
        let mut out = Vec::with_capacity(rows.len());
        for (r, places) in grid.places.iter().enumerate() {
            let (c, s): (Vec<i64>, Vec<i64>) = places.iter().copied().unzip();
            let row = logp.get(r as i64);
            let idx = Tensor::from_slice(&c).to_device(self.device()) * grid.bytes.size()[2] + Tensor::from_slice(&s).to_device(self.device());
            let per_byte = row.view([-1, BYTE_CLASSES]).index_select(0, &idx);
            out.push((per_byte, eoc_nats.get(r as i64).sum(Kind::Double).double_value(&[])));
        }
        Ok(out)
    }

    /// Per-byte scores of each row for likelihood evaluation: `(nats, greedy)` of every byte
    /// after the first, where a byte that starts a chunk also carries the previous chunk's end
    /// (EOC) term, so the nats of bytes `a..b` are the likelihood of that text given the bytes
    /// before `a`, chunk boundaries included; `greedy` is true when the byte (and the chunk end
    /// before it) is the model's argmax. Rows longer than `max_chunks` chunks lose whole chunks
    /// from the front; the number of bytes dropped is returned with the scores, which start at
    /// the first kept byte (whose entry is `(0.0, true)`: it has no context).
    pub fn byte_scores(&self, rows: &[Vec<u32>], max_chunks: usize) -> Result<Vec<RowScores>> {
        let mut chunks = self.chunk_rows(rows)?;
        let mut kept = Vec::with_capacity(rows.len());
        let mut dropped = Vec::with_capacity(rows.len());
        for (row, c) in rows.iter().zip(chunks.iter_mut()) {
            let cut = c.len().saturating_sub(max_chunks.max(1));
            let bytes: usize = c.drain(..cut).sum();
            kept.push(row[bytes..].to_vec());
            dropped.push(bytes);
        }
        let grid = ChunkGrid::new(&kept, &chunks, self.bytes.max_len(), false, self.device());
        let (logits, _) = self.grid_logits(&grid);
        let logp = logits.log_softmax(-1, Kind::Float).to_device(Device::Cpu);
        let (m, l) = (grid.bytes.size()[1], grid.bytes.size()[2]);
        let best = logp.argmax(-1, false).view([-1]);
        let nats = Vec::<f32>::try_from(logp.neg().view([-1])).expect("float32 log-probabilities");
        let nll_at = |s: i64, class: i64| f64::from(nats[(s * BYTE_CLASSES + class) as usize]);
        let best = Vec::<i64>::try_from(best).expect("int64 argmax");
        let mut out = Vec::with_capacity(rows.len());
        for (r, (row, row_chunks)) in kept.iter().zip(&chunks).enumerate() {
            let slot = |c: usize, i: usize| (r as i64 * m + c as i64) * l + i as i64;
            let mut scores = Vec::with_capacity(row.len());
            let mut at = 0;
            for (c, &n) in row_chunks.iter().enumerate() {
                for i in 0..n {
                    let s = slot(c, i);
                    let mut nll = nll_at(s, row[at + i] as i64);
                    let mut greedy = best[s as usize] == row[at + i] as i64;
                    if i == 0 && c > 0 && (row_chunks[c - 1] as i64) < l {
                        let end = slot(c - 1, row_chunks[c - 1]);
                        nll += nll_at(end, EOC);
                        greedy &= best[end as usize] == EOC;
                    }
                    scores.push(if at + i == 0 { (0.0, true) } else { (nll, greedy) });
                }
                at += n;
            }
            out.push((dropped[r], scores));
        }
        Ok(out)
    }

    /// Nats of each chunk of `row` (chunk lengths `chunks`): its bytes' negative
    /// log-likelihoods plus its end (EOC, for every chunk shorter than `L` but the last unless
    /// `last_ends`). One forward over all the chunks.
    pub fn chunk_nats(&self, row: &[u32], chunks: &[usize], last_ends: bool) -> Vec<f64> {
        let grid = ChunkGrid::new(&[row.to_vec()], &[chunks.to_vec()], self.bytes.max_len(), last_ends, self.device());
        let (logits, _) = self.grid_logits(&grid);
        let nll = logits.reshape([-1, BYTE_CLASSES]).cross_entropy_loss::<Tensor>(&grid.targets.reshape([-1]), None, tch::Reduction::None, IGNORE, 0.0);
        let per_chunk = nll.view([chunks.len().max(1) as i64, -1]).sum_dim_intlist(1, false, Kind::Double);
        Vec::<f64>::try_from(per_chunk.to_device(Device::Cpu)).expect("float64 nats")[..chunks.len()].to_vec()
    }

    /// The aux-free bias moves of the global decoder's MoE blocks for `stats` of a training pass.
    pub fn balance_updates(&self, stats: &[(usize, MoeStats)]) -> Vec<stlm_core::BufferUpdate> {
        stats.iter().filter_map(|(i, s)| self.layers[*i].balance_update(s)).collect()
    }
}

/// Generates up to `cfg.max_new_tokens` bytes after `prompt` (byte ids), sampling each byte and
/// each chunk end from the model: a chunk closes when the model picks EOC or reaches `L` bytes,
/// then the global decoder runs once over the closed chunks. The prompt is chunked with the
/// model's chunker and its last chunk continued. Stops after any id in `cfg.eos_token_ids`.
/// `on_byte` sees each new byte as it is chosen.
pub fn generate_bytes(
    model: &BytePooledModel,
    prompt: &[u32],
    cfg: &GenerationConfig,
    mut on_byte: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if cfg.repetition_penalty != 1.0 {
        return Err(
            OptionError::new("repetition_penalty", cfg.repetition_penalty, "not supported for byte models").into()
        );
    }
    if let Some(bad) = prompt.iter().find(|&&b| b >= BYTE_PAD) {
        return Err(ModelError::Input(format!("byte id {bad} cannot be in a prompt (0-256)")));
    }
    // Byte models read all of the byte tokenizer's ids (the config says so): no limit applies.
    let cfg = &GenerationConfig { vocab_limit: None, ..cfg.clone() };
    let _g = tch::no_grad_guard();
    let l = model.bytes.max_len();
    let device = model.device();
    let mut sampler = Sampler::new(cfg.seed);
    let mut closed: Vec<usize> = model.chunk_rows(&[prompt.to_vec()])?.remove(0);
    let mut open: Vec<u32> = match closed.pop() {
        Some(n) => prompt[prompt.len() - n..].to_vec(),
        None => Vec::new(),
    };
    let mut bytes = prompt.to_vec();
    let mut out = Vec::new();
    let mut state: Option<Tensor> = None; // the open chunk's global state [1, 1, hidden]
    while (out.len() as i64) < cfg.max_new_tokens {
        if open.len() as i64 == l {
            closed.push(open.len());
            open.clear();
            state = None;
        }
        let g = match &state {
            Some(g) => g.shallow_clone(),
            None => {
                let mut lens = closed.clone();
                lens.push(0);
                let done = bytes.len() - open.len();
                let grid = ChunkGrid::new(&[bytes[..done].to_vec()], &[lens], l, true, device);
                let (g, _) = model.global_states(&grid.bytes, &grid.lengths);
                let g = g.narrow(1, closed.len() as i64, 1);
                state = Some(g.shallow_clone());
                g
            }
        };
        let mut slots = vec![BYTE_PAD as i64; l as usize];
        for (i, &b) in open.iter().enumerate() {
            slots[i] = b as i64;
        }
        let chunk = Tensor::from_slice(&slots).view([1, 1, l]).to_device(device);
        let logits = model.decode(&chunk, &g).view([l, BYTE_CLASSES]).get(open.len() as i64);
        let mut banned = vec![BYTE_PAD as i64];
        if open.is_empty() {
            banned.push(EOC);
        }
        let logits = logits.index_fill(0, &Tensor::from_slice(&banned).to_device(device), f64::NEG_INFINITY);
        let next = sampler.sample(&logits.unsqueeze(0), cfg)?[0];
        if next == EOC {
            closed.push(open.len());
            open.clear();
            state = None;
            continue;
        }
        let byte = next as u32;
        open.push(byte);
        bytes.push(byte);
        out.push(byte);
        on_byte(byte);
        if cfg.eos_token_ids.contains(&next) {
            break;
        }
    }
    Ok(out)
}

/// The config of the byte encoder and decoder blocks: the model's norm and MLP kind at the
/// local width, dense bidirectional-capable attention, no positions of their own (slot
/// embeddings are added to the inputs).
fn local_config(cfg: &ModelConfig, b: &BytesConfig) -> ModelConfig {
    ModelConfig {
        model_type: ModelType::Stlm,
        hidden_size: b.local_hidden_size,
        intermediate_size: b.local_intermediate_size,
        num_hidden_layers: b.encoder_layers.max(b.decoder_layers).max(1),
        num_attention_heads: b.local_heads,
        num_key_value_heads: b.local_heads,
        head_dim: None,
        position: PositionKind::None,
        rope_scaling: None,
        partial_rotary_factor: 1.0,
        residual_scales: false,
        qk_norm: false,
        attention_out_bias: None,
        cdmoe: None,
        moe: None,
        bytes: None,
        attention: Vec::new(),
        ..cfg.clone()
    }
}

/// Entropy (nats) of a byte model's prediction of each byte of `row` from the bytes before it;
/// the first byte, predicted from nothing, gets +infinity (it always starts a chunk).
pub fn next_byte_entropies(model: &DecoderModel, row: &[u32]) -> Vec<f32> {
    if row.is_empty() {
        return Vec::new();
    }
    let _g = tch::no_grad_guard();
    let ids: Vec<i64> = row.iter().map(|&b| b as i64).collect();
    let window = model.config.max_position_embeddings as usize;
    let mut out = vec![f32::INFINITY];
    // Windows of the model's context; each byte's entropy from the window that holds it.
    for start in (0..row.len() - 1).step_by(window) {
        let end = (start + window).min(row.len() - 1);
        let x = Tensor::from_slice(&ids[start..end]).unsqueeze(0).to_device(model.device());
        let logp = model.forward(&x).squeeze_dim(0).log_softmax(-1, Kind::Float);
        let h = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float);
        out.extend(Vec::<f32>::try_from(h.to_device(Device::Cpu)).expect("float entropies"));
    }
    out
}

/// The chunks of `text`'s bytes under the chunker `spec` (a TOML inline table as in a config,
/// `{ kind = "whitespace", max = 8 }`; an entropy chunker loads its model): the chunk lengths
/// and each chunk's text (lossy where a chunk splits a UTF-8 character).
pub fn chunk_text(spec: &str, text: &str) -> Result<(Vec<usize>, Vec<String>)> {
    let bad = |m: String| ModelError::Input(format!("chunker {spec}: {m}"));
    let mut table = toml::from_str::<toml::Table>(&format!("chunker = {spec}")).map_err(|e| bad(format!("not a TOML inline table ({})", e.message())))?;
    let value = table.remove("chunker").ok_or_else(|| bad("no table".into()))?;
    let kind: ChunkerKind = value.try_into().map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
    let tok = stlm_tokenizers::Tokenizer::bytes();
    let tok_err = |e: stlm_tokenizers::TokenizerError| bad(e.to_string());
    let ids = tok.encode(text, false).map_err(tok_err)?;
    let chunker = Chunker::new(&kind).map_err(tok_err)?;
    let lengths = match &kind {
        ChunkerKind::Entropy { model, .. } => {
            let m = crate::load_model(model, Device::Cpu, stlm_core::DType::Float32)?;
            chunker.chunk_with_entropies(&ids, &next_byte_entropies(&m, &ids)).map_err(tok_err)?
        }
        _ => chunker.chunk(&ids).map_err(tok_err)?,
    };
    let mut at = 0;
    let mut chunks = Vec::with_capacity(lengths.len());
    for &n in &lengths {
        chunks.push(tok.decode(&ids[at..at + n], false).map_err(tok_err)?);
        at += n;
    }
    Ok((lengths, chunks))
}

