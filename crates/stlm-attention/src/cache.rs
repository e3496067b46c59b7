//! A preallocated key/value cache for decoding: a full cache per layer, or a rolling one for
//! sliding-window layers.

use tch::{Device, Kind, Tensor};

/// Keys and values of every layer, allocated once: `[batch, kv_heads, slots, head_dim]` each,
/// where a full layer has a slot per position and a sliding-window layer (window `w`, `g` global
/// tokens) only `g + w`: position `p >= g` lives in slot `g + (p - g) % w`, overwriting the
/// position `w` before it, which no later query can see.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// `(window, global_tokens)` of rolling layers.
    windows: Vec<Option<(i64, i64)>>,
    len: i64,
    capacity: i64,
}

/// What attention over the cache sees after [`KvCache::update`].
pub struct CachedKeys {
    /// `[batch, kv_heads, keys, head_dim]`.
    pub keys: Tensor,
    /// `[batch, kv_heads, keys, head_dim]`.
    pub values: Tensor,
    /// Positions of the keys (`[keys]`, int64) when they are not `0..len + s` (rolling layers).
    pub positions: Option<Tensor>,
}

impl KvCache {
    /// A cache of `capacity` positions for `layers` layers, each with a slot per position.
    pub fn new(
        layers: usize,
        batch: i64,
        kv_heads: i64,
        head_dim: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        Self::with_windows(&vec![None; layers], batch, kv_heads, head_dim, capacity, kind, device)
    }

    /// A cache of `capacity` positions where layer `i` keeps a rolling window of keys when
    /// `windows[i]` is `Some((window, global_tokens))`, and every position otherwise.
    pub fn with_windows(
        windows: &[Option<(i64, i64)>],
        batch: i64,
        kv_heads: i64,
        head_dim: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        let layers: Vec<_> = windows.iter().map(|&w| (w, kv_heads)).collect();
        Self::with_layers(&layers, batch, head_dim, capacity, kind, device)
    }

    /// [`KvCache::with_windows`] where layer `i` also has its own number of key/value heads:
    /// `layers[i] = (window, kv_heads)`.
    pub fn with_layers(
        layers: &[(Option<(i64, i64)>, i64)],
        batch: i64,
        head_dim: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        let slots = |w: &Option<(i64, i64)>| w.map_or(capacity, |(w, g)| (w + g).min(capacity));
        let alloc = |(w, heads): &(Option<(i64, i64)>, i64)| Tensor::zeros([batch, *heads, slots(w), head_dim], (kind, device));
        KvCache {
            keys: layers.iter().map(alloc).collect(),
            values: layers.iter().map(alloc).collect(),
            windows: layers.iter().map(|(w, _)| *w).collect(),
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

    /// Number of layers it holds keys and values for.
    pub fn num_layers(&self) -> usize {
        self.keys.len()
    }

    /// Forgets every position from `len` on (speculative decoding drops rejected drafts), so the
    /// next write goes to position `len`. Refused (`Err` with the reason) when a layer keeps a
    /// rolling window, whose slots the forgotten positions may have overwritten.
    pub fn rewind(&mut self, len: i64) -> Result<(), String> {
        if self.windows.iter().any(Option::is_some) {
            return Err("a sliding-window layer's rolling cache cannot forget positions".into());
        }
        if !(0..=self.len).contains(&len) {
            return Err(format!("cannot rewind a cache of {} positions to {len}", self.len));
        }
        self.len = len;
        Ok(())
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Writes `k`, `v` (`[batch, kv_heads, s, head_dim]`, positions `len..len + s`) of `layer`
    /// and returns the keys and values its queries attend to: every cached position and the new
    /// ones (a full layer), or the positions still in the window and the new ones (a rolling
    /// layer, with their positions). Call [`KvCache::advance`] once every layer has been updated.
    pub fn update(&self, layer: usize, k: &Tensor, v: &Tensor) -> CachedKeys {
        let s = k.size()[2];
        assert!(self.len + s <= self.capacity, "KV cache overflow: {} + {s} > {}", self.len, self.capacity);
        let (kc, vc) = (&self.keys[layer], &self.values[layer]);
        let Some((window, global)) = self.windows[layer] else {
            kc.narrow(2, self.len, s).copy_(k);
            vc.narrow(2, self.len, s).copy_(v);
            let n = self.len + s;
            return CachedKeys { keys: kc.narrow(2, 0, n), values: vc.narrow(2, 0, n), positions: None };
        };
        let device = k.device();
        let slot = |p: i64| if p < global { p } else { global + (p - global) % window };
        // Stored positions a new query may still need: the global ones and the last `window`.
        let len = self.len;
        let stored: Vec<i64> = (0..len.min(global)).chain((global.max(len - window)..len).filter(|&p| p >= global)).collect();
        let positions = Tensor::from_slice(&stored.iter().copied().chain(len..len + s).collect::<Vec<_>>()).to_device(device);
        let slots = Tensor::from_slice(&stored.iter().map(|&p| slot(p)).collect::<Vec<_>>()).to_device(device);
        let keys = Tensor::cat(&[&kc.index_select(2, &slots), k], 2);
        let values = Tensor::cat(&[&vc.index_select(2, &slots), v], 2);
        // Write the new positions that later queries can see.
        let keep: Vec<i64> = (0..s).filter(|&i| len + i < global || len + i >= (len + s - window).max(global)).collect();
        if !keep.is_empty() {
            let source = Tensor::from_slice(&keep).to_device(device);
            let target = Tensor::from_slice(&keep.iter().map(|&i| slot(len + i)).collect::<Vec<_>>()).to_device(device);
            let _ = kc.shallow_clone().index_copy_(2, &target, &k.index_select(2, &source));
            let _ = vc.shallow_clone().index_copy_(2, &target, &v.index_select(2, &source));
        }
        CachedKeys { keys, values, positions: Some(positions) }
    }

    /// The key and value buffers of `layer` (full layers: `[batch, kv_heads, capacity,
    /// head_dim]`, contiguous), for kernels that write the next position themselves; `&mut`
    /// because they do. Call [`KvCache::advance`] after.
    pub fn buffers_mut(&mut self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Marks `s` more positions as cached.
    pub fn advance(&mut self, s: i64) {
        self.len += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rolling layer hands out exactly the positions a sliding window (with global tokens) can
    /// still see, with the values written at those positions, over prefills and single steps.
    #[test]
    fn rolling_layers_keep_what_the_window_sees() {
        for (window, global) in [(3, 0), (4, 2), (1, 1)] {
            let mut cache = KvCache::with_windows(&[Some((window, global))], 1, 1, 1, 40, Kind::Float, Device::Cpu);
            let mut pos = 0;
            for s in [5, 1, 1, 3, 1, 1, 1, 7, 1] {
                let vals = Tensor::arange_start(pos, pos + s, (Kind::Float, Device::Cpu)).view([1, 1, s, 1]);
                let seen = cache.update(0, &vals, &vals);
                cache.advance(s);
                let positions: Vec<i64> = Vec::try_from(seen.positions.expect("rolling")).unwrap();
                let keys: Vec<f32> = Vec::try_from(seen.keys.view([-1])).unwrap();
                assert_eq!(positions.iter().map(|&p| p as f32).collect::<Vec<_>>(), keys, "values match positions");
                // Every position the first new query may see is there (its window and globals).
                for p in 0..pos {
                    let visible = p < global || pos - p < window;
                    assert!(!visible || positions.contains(&p), "w {window} g {global}: position {p} missing at {pos}");
                }
                assert!(positions.len() as i64 <= window + global + s);
                pos += s;
            }
        }
    }
}
