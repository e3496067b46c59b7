//! Training and validation batches: windows of `seq + 1` tokens drawn from the mapped shards as
//! a pure function of (seed, step, micro), so a resumed run sees exactly the batches of an
//! uninterrupted one.

use crate::shards::{TokenArray, TokenizedCorpus};
use crate::{DataError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

/// The window starts of one split, across its shards.
struct Windows {
    /// (shard index, cumulative window count up to and including this shard).
    ends: Vec<(usize, u64)>,
}

impl Windows {
    fn new(arrays: &[&TokenArray], seq: i64) -> Self {
        let mut total = 0u64;
        let mut ends = Vec::new();
        for (i, a) in arrays.iter().enumerate() {
            let count = (a.len() as i64 - seq).max(0) as u64;
            if count > 0 {
                total += count;
                ends.push((i, total));
            }
        }
        Windows { ends }
    }

    fn total(&self) -> u64 {
        self.ends.last().map_or(0, |e| e.1)
    }

    /// The shard and start of window `k` (0 <= k < total).
    fn locate(&self, k: u64) -> (usize, usize) {
        let pos = self.ends.partition_point(|&(_, end)| end <= k);
        let before = if pos == 0 { 0 } else { self.ends[pos - 1].1 };
        (self.ends[pos].0, (k - before) as usize)
    }
}

/// `batch` window indices in `0..total` for micro-batch `micro` of step `step`: a pure function
/// of its arguments (what every training batch of a run is drawn by).
pub fn window_picks(seed: u64, step: u64, micro: u64, batch: usize, total: u64) -> Vec<u64> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (0..batch).map(|_| rng.random_range(0..total)).collect()
}

/// Batches of random windows, a pure function of (seed, step, micro).
pub struct TokenBatches {
    corpus: TokenizedCorpus,
    train: Windows,
    val: Windows,
    batch: i64,
    seq: i64,
    seed: u64,
    device: Device,
    /// This rank and the world size: a rank's batch is its slice of the global batch of
    /// `batch * world` windows.
    shard: (u64, u64),
}

impl TokenBatches {
    /// Batches of `batch` windows of `seq` tokens (plus the next token as target).
    pub fn new(corpus: TokenizedCorpus, batch: i64, seq: i64, seed: u64, device: Device) -> Result<Self> {
        if batch < 1 || seq < 1 {
            return Err(DataError::Invalid(format!("batch_size ({batch}) and seq_len ({seq}) must be at least 1")));
        }
        let train_arrays: Vec<&TokenArray> = corpus.shards.iter().map(|s| &s.train).collect();
        let val_arrays: Vec<&TokenArray> = corpus.shards.iter().map(|s| &s.val).collect();
        let (train, val) = (Windows::new(&train_arrays, seq), Windows::new(&val_arrays, seq));
        for (name, windows, tokens) in
            [("training", &train, corpus.train_tokens()), ("validation", &val, corpus.val_tokens())]
        {
            if windows.total() == 0 {
                return Err(DataError::Invalid(format!(
                    "the {name} split has {tokens} tokens, no file with more than seq_len = {seq}; give more data or a shorter seq_len",
                )));
            }
        }
        Ok(TokenBatches { corpus, train, val, batch, seq, seed, device, shard: (0, 1) })
    }

    /// Batches of rank `rank` of `world` data-parallel ranks: each is rows
    /// `rank * batch .. (rank + 1) * batch` of the global batch a single process with a batch of
    /// `batch * world` windows draws, so the global batch is the same for any world size.
    pub fn sharded(mut self, rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(DataError::Invalid(format!("rank {rank} is not below the world size {world}")));
        }
        self.shard = (rank as u64, world as u64);
        Ok(self)
    }

    /// The corpus the batches are drawn from.
    pub fn corpus(&self) -> &TokenizedCorpus {
        &self.corpus
    }

    fn gather(&self, windows: &Windows, val: bool, picks: impl Iterator<Item = u64>) -> (Tensor, Tensor) {
        let len = (self.seq + 1) as usize;
        let mut ids = Vec::with_capacity(self.batch as usize * len);
        for k in picks {
            let (shard, start) = windows.locate(k);
            let s = &self.corpus.shards[shard];
            (if val { &s.val } else { &s.train }).extend_window(start, len, &mut ids);
        }
        let all = Tensor::from_slice(&ids).view([self.batch, self.seq + 1]).to_device(self.device);
        (all.narrow(1, 0, self.seq), all.narrow(1, 1, self.seq))
    }

    /// Inputs and targets `[batch, seq]` of micro-batch `micro` of step `step`.
    pub fn train_batch(&self, step: u64, micro: u64) -> (Tensor, Tensor) {
        let (rank, world) = self.shard;
        let picks = window_picks(self.seed, step, micro, (self.batch as u64 * world) as usize, self.train.total());
        let mine = picks.into_iter().skip((rank * self.batch as u64) as usize).take(self.batch as usize);
        self.gather(&self.train, false, mine)
    }

    /// Validation batch `index`: evenly spread windows, the same every time.
    pub fn val_batch(&self, index: u64) -> (Tensor, Tensor) {
        let total = self.val.total();
        let (rank, world) = self.shard;
        let (b, n) = (self.batch as u64, self.batch as u64 * world);
        let stride = 7919 * self.seq as u64;
        let picks = (rank * b..(rank + 1) * b).map(move |i| ((index * n + i) * stride) % total);
        self.gather(&self.val, true, picks)
    }
}
