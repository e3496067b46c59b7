//! A preallocated key/value cache for decoding.

use tch::{Device, Kind, Tensor};

/// Keys and values of every layer, `[batch, kv_heads, capacity, head_dim]` each, allocated once.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// Allocates a cache of `capacity` positions for `layers` layers.
    pub fn new(
        layers: usize,
        batch: i64,
        kv_heads: i64,
        head_dim: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        let alloc = || Tensor::zeros([batch, kv_heads, capacity, head_dim], (kind, device));
        KvCache {
            keys: (0..layers).map(|_| alloc()).collect(),
            values: (0..layers).map(|_| alloc()).collect(),
            len: 0,
            capacity,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Writes `k`, `v` (`[batch, kv_heads, s, head_dim]`) of `layer` after the cached positions and
    /// returns views of all `len + s` keys and values. Call [`KvCache::advance`] once every layer
    /// has been updated.
    pub fn update(&self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let s = k.size()[2];
        assert!(self.len + s <= self.capacity, "KV cache overflow: {} + {s} > {}", self.len, self.capacity);
        self.keys[layer].narrow(2, self.len, s).copy_(k);
        self.values[layer].narrow(2, self.len, s).copy_(v);
        (self.keys[layer].narrow(2, 0, self.len + s), self.values[layer].narrow(2, 0, self.len + s))
    }

    /// The key and value buffers of `layer`, `[batch, kv_heads, capacity, head_dim]`
    /// (contiguous), for kernels that write the next position themselves; `&mut` because they
    /// do. Call [`KvCache::advance`] after.
    pub fn buffers_mut(&mut self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Marks `s` more positions as cached.
    pub fn advance(&mut self, s: i64) {
        self.len += s;
    }
}
