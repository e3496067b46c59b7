//! CPU kernels for batch-1 decoding: a matrix-vector product and row norms over plain `f32`
//! slices, and tensor wrappers that libtorch callers use.
//!
//! Decoding one token at batch 1 is matrix-vector products over every weight, plus a few
//! vector operations. libtorch sends the products to MKL, whose matrix-vector product runs on its
//! generic code path on AMD CPUs, and pays a few microseconds of dispatch per operation. The
//! slice kernels here ([`Rows::matvec_add`], [`rms_norm_row`], [`layer_norm_row`]) are what
//! stlm-model's fused decoding step is built from; [`small_batch_linear`] and
//! [`small_batch_rms_norm`] put them behind tensors for the libtorch path. References: a float64
//! computation (tests below); speed: `benches/benches/linear.rs` against libtorch's `linear`.

use crate::spin::SpinPool;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Most rows (`batch * seq`) [`small_batch_linear`] takes: the matrix-vector kernel beats MKL
/// only for one row (`cargo xtask bench -- linear`).
pub const LINEAR_MAX_ROWS: i64 = 1;

/// Most rows [`small_batch_rms_norm`] takes; larger inputs stay in libtorch.
pub const RMS_NORM_MAX_ROWS: i64 = 16;

/// Fewest weights [`Rows::matvec_add_split`] gives one worker.
pub const SPLIT_MIN_FLOATS: usize = 16 * 1024;


/// A row-major float32 matrix borrowed as a slice: row `r` is `data[r * stride..][..cols]`.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> Rows<'a> {
    /// A view of `rows` rows of `cols` floats spaced `stride` apart; `None` when `data` is too
    /// short or `stride < cols`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Option<Self> {
        let needed = if rows == 0 { 0 } else { (rows - 1) * stride + cols };
        (stride >= cols && data.len() >= needed).then_some(Rows { data, rows, cols, stride })
    }

    /// The rows of a 2-d float32 CPU tensor whose columns are contiguous (column stride 1);
    /// `None` for anything else. The view reads the tensor's memory: nothing may write to the
    /// tensor while it is alive.
    pub fn from_tensor(t: &'a Tensor) -> Option<Self> {
        if t.device() != Device::Cpu || t.kind() != Kind::Float || t.dim() != 2 {
            return None;
        }
        let (size, stride) = (t.size(), t.stride());
        let (rows, cols) = (size[0] as usize, size[1] as usize);
        if (cols > 1 && stride[1] != 1) || (rows > 1 && stride[0] < size[1]) {
            return None;
        }
        let stride = if rows > 1 { stride[0] as usize } else { cols };
        let len = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * stride + cols };
        // SAFETY: a CPU float32 tensor of this size and these (non-negative, checked) strides
        // owns `len` floats from its data pointer; the borrow of `t` keeps the storage alive.
        let data = if len == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, len) } };
        Some(Rows { data, rows, cols, stride })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &'a [f32] {
        &self.data[r * self.stride..r * self.stride + self.cols]
    }

    /// Rows `start..start + n` as a view.
    pub fn narrow(&self, start: usize, n: usize) -> Rows<'a> {
        assert!(start + n <= self.rows, "rows {start}..{} of {}", start + n, self.rows);
        let data = if n == 0 { &[][..] } else { &self.data[start * self.stride..] };
        Rows { data, rows: n, cols: self.cols, stride: self.stride }
    }

    /// `y += W x` with the rows split over the workers of `pool` (in blocks of at least
    /// [`SPLIT_MIN_FLOATS`] weights, so small products stay on one thread).
    pub fn matvec_add_split(&self, x: &[f32], y: &mut [f32], pool: &SpinPool) {
        let parts = pool.threads().min(self.rows * self.cols / SPLIT_MIN_FLOATS).max(1);
        if parts == 1 {
            return self.matvec_add(x, y);
        }
        // Row blocks of equal size (rounded to four rows); each worker locks its own.
        let block = self.rows.div_ceil(parts).div_ceil(4) * 4;
        let chunks: Vec<Mutex<&mut [f32]>> = y.chunks_mut(block).map(Mutex::new).collect();
        pool.run(&|i| {
            if let Some(chunk) = chunks.get(i) {
                let mut chunk = chunk.lock().unwrap_or_else(|e| e.into_inner());
                self.narrow(i * block, chunk.len()).matvec_add(x, &mut chunk);
            }
        });
    }

    /// `y += W x` (`x` has `cols` entries, `y` has `rows`).
    pub fn matvec_add(&self, x: &[f32], y: &mut [f32]) {
        assert!(x.len() == self.cols && y.len() == self.rows, "matvec: {}x{} matrix, x {}, y {}", self.rows, self.cols, x.len(), y.len());
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked above); the view's invariant gives
                // `rows` rows of `cols` floats spaced `stride` apart inside `data`.
                unsafe { avx2::matvec_add(x, self.data.as_ptr(), self.stride, y) };
                return;
            }
        }
        for (r, yr) in y.iter_mut().enumerate() {
            *yr += self.row(r).iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `y[r] += dot(row r, x)` one row at a time with four accumulators over 32 floats, the
    /// tail in scalar code: one sequential stream through the matrix. Decoding reads every
    /// weight once per token, from memory rather than cache; four rows read at a time (this
    /// kernel's first version) are four short streams that starve the hardware prefetcher: a
    /// 15M-parameter model decoded at two thirds of this kernel's speed (docs/results/generation.md).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `w` must point to `y.len()` rows of `x.len()` readable
    /// floats spaced `stride` apart.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matvec_add(x: &[f32], w: *const f32, stride: usize, y: &mut [f32]) {
        let n = x.len();
        let (n32, n8) = (n / 32 * 32, n / 8 * 8);
        let xp = x.as_ptr();
        for (r, yr) in y.iter_mut().enumerate() {
            let p = w.add(r * stride);
            let mut a = [_mm256_setzero_ps(); 4];
            let mut k = 0;
            while k < n32 {
                for (j, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(k + 8 * j)), _mm256_loadu_ps(xp.add(k + 8 * j)), *acc);
                }
                k += 32;
            }
            while k < n8 {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(k)), _mm256_loadu_ps(xp.add(k)), a[0]);
                k += 8;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
            for (kk, &xv) in x.iter().enumerate().skip(n8) {
                s += *p.add(kk) * xv;
            }
            *yr += s;
        }
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * weight` for one row.
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = x.iter().map(|&v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((y, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *y = v * scale * w;
    }
}

/// `out = (x - mean) / sqrt(var + eps) * weight + bias` for one row (biased variance, as
/// `torch.nn.LayerNorm`).
pub fn layer_norm_row(x: &[f32], weight: &[f32], bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let scale = 1.0 / (var + eps).sqrt();
    for (i, (y, &v)) in out.iter_mut().zip(x).enumerate() {
        *y = (v - mean) * scale * weight[i] + bias.map_or(0.0, |b| b[i]);
    }
}

/// True when libtorch records gradients on this thread.
pub fn grad_enabled() -> bool {
    // SAFETY: sets the thread-local grad mode and puts the previous value back at once.
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// A contiguous float32 CPU tensor's elements as a slice (`None` otherwise); nothing may write to
/// the tensor while the slice is alive.
pub fn f32_slice(t: &Tensor) -> Option<&[f32]> {
    let ok = t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous();
    // SAFETY: a contiguous CPU float32 tensor holds `numel` floats from its data pointer,
    // alive as long as the borrow of `t`.
    ok.then(|| if t.numel() == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) } })
}

/// `x W^T + b` for `x` `[.., in]`, `weight` `[out, in]` (rows contiguous) and `bias` `[out]`,
/// when everything is float32 on the CPU, `x` has at most [`LINEAR_MAX_ROWS`] rows and no
/// gradient is needed; `None` otherwise, and the caller uses libtorch.
pub fn small_batch_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float;
    if !cpu_f32(x) || !bias.is_none_or(cpu_f32) {
        return None;
    }
    let w = Rows::from_tensor(weight)?;
    let mut shape = x.size();
    if shape.last() != Some(&(w.cols() as i64)) || w.cols() == 0 || w.rows() == 0 {
        return None;
    }
    if bias.is_some_and(|b| b.size() != [w.rows() as i64]) {
        return None;
    }
    let rows = x.numel() / w.cols();
    if rows == 0 || rows as i64 > LINEAR_MAX_ROWS {
        return None;
    }
    let needs_grad = x.requires_grad() || weight.requires_grad() || bias.is_some_and(Tensor::requires_grad);
    if needs_grad && grad_enabled() {
        return None;
    }
    let x = x.contiguous();
    // A fresh output that starts as the bias (`copy` never aliases it) or zeros.
    let out = match bias {
        Some(b) => b.copy(),
        None => Tensor::zeros([w.rows() as i64], (Kind::Float, Device::Cpu)),
    };
    let xs = f32_slice(&x)?;
    // SAFETY: `out` is a new contiguous float32 buffer of `rows` floats that nothing else reads
    // or writes while this slice lives.
    let ys = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, w.rows()) };
    w.matvec_add(xs, ys);
    *shape.last_mut().expect("x has a last dimension") = w.rows() as i64;
    Some(out.view(shape.as_slice()))
}

/// RMSNorm `x / sqrt(mean(x^2) + eps) * weight` over the last dimension for at most
/// [`RMS_NORM_MAX_ROWS`] float32 rows on the CPU without gradients; `None` otherwise. libtorch's
/// `rms_norm` costs about 18 us a call at decoding sizes, this loop about 1 us.
pub fn small_batch_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Option<Tensor> {
    let dim = *weight.size().first()?;
    if weight.dim() != 1 || x.size().last() != Some(&dim) || dim == 0 || x.device() != Device::Cpu {
        return None;
    }
    let rows = x.numel() as i64 / dim;
    if rows == 0 || rows > RMS_NORM_MAX_ROWS || ((x.requires_grad() || weight.requires_grad()) && grad_enabled()) {
        return None;
    }
    let (x, weight) = (x.contiguous(), weight.contiguous());
    let (xs, ws) = (f32_slice(&x)?, f32_slice(&weight)?);
    let out = Tensor::empty(x.size(), (Kind::Float, Device::Cpu));
    // SAFETY: `out` is a new contiguous float32 buffer of `rows * dim` floats that nothing else
    // reads or writes while this slice lives.
    let ys = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, xs.len()) };
    for (xr, yr) in xs.chunks_exact(dim as usize).zip(ys.chunks_exact_mut(dim as usize)) {
        rms_norm_row(xr, ws, eps as f32, yr);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let y = x.to_kind(Kind::Double).matmul(&w.to_kind(Kind::Double).tr());
        match b {
            Some(b) => y + b.to_kind(Kind::Double),
            None => y,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Agrees with a float64 computation for contiguous and row-sliced weights, with and
        /// without bias, at sizes that exercise the vector body and both tails of the kernel;
        /// column-major weights are left to libtorch.
        #[test]
        fn matches_float64(seed in 0i64..10_000, in_dim in 1i64..70, out_dim in 1i64..90, layout in 0u8..3, with_bias: bool) {
            tch::manual_seed(seed);
            let opts = (Kind::Float, Device::Cpu);
            let w = match layout {
                0 => Tensor::randn([out_dim, in_dim], opts),
                1 => Tensor::randn([out_dim, in_dim], opts).tr().contiguous().tr(),
                _ => Tensor::randn([out_dim + 5, in_dim + 3], opts).narrow(0, 3, out_dim).narrow(1, 2, in_dim),
            };
            let b = with_bias.then(|| Tensor::randn([out_dim], opts));
            let x = Tensor::randn([1, 1, in_dim], opts);
            let _g = tch::no_grad_guard();
            let got = small_batch_linear(&x, &w, b.as_ref());
            if layout == 1 && in_dim > 1 && out_dim > 1 {
                prop_assert!(got.is_none(), "column-major weights go to libtorch");
                return Ok(());
            }
            let got = got.expect("kernel applies");
            prop_assert_eq!(got.size(), vec![1, 1, out_dim]);
            let diff = (got.to_kind(Kind::Double) - reference(&x, &w, b.as_ref())).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-4 * (in_dim as f64).sqrt(), "max abs diff {}", diff);
        }
    }

    #[test]
    fn matvec_matches_float64_on_large_and_small_matrices() {
        tch::manual_seed(4);
        let opts = (Kind::Float, Device::Cpu);
        for (out_dim, in_dim) in [(2049i64, 257i64), (4001, 131), (700, 750), (9, 7)] {
            let w = Tensor::randn([out_dim, in_dim], opts);
            let x = Tensor::randn([in_dim], opts);
            let data = Vec::<f32>::try_from(&w.view([-1])).unwrap();
            let rows = Rows::new(&data, out_dim as usize, in_dim as usize, in_dim as usize).unwrap();
            let xs = Vec::<f32>::try_from(&x).unwrap();
            let want = reference(&x.view([1, -1]), &w, None).view([-1]);
            let mut y = vec![0f32; out_dim as usize];
            rows.matvec_add(&xs, &mut y);
            let d = (Tensor::from_slice(&y).to_kind(Kind::Double) - &want).abs().max().double_value(&[]);
            assert!(d < 1e-4 * (in_dim as f64).sqrt(), "{out_dim}x{in_dim}: {d}");
        }
    }

    #[test]
    fn rows_views_check_their_bounds() {
        let data: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert!(Rows::new(&data, 3, 3, 4).is_none(), "needs 2 * 4 + 3 = 11 floats");
        assert!(Rows::new(&data, 2, 3, 2).is_none(), "stride below the row length");
        let rows = Rows::new(&data, 3, 2, 4).expect("needs 10 floats");
        assert_eq!(rows.row(2), &[8.0, 9.0]);
        assert_eq!(rows.narrow(1, 2).row(0), &[4.0, 5.0]);
        let mut y = vec![1.0; 3];
        rows.matvec_add(&[1.0, -1.0], &mut y);
        assert_eq!(y, vec![0.0, 0.0, 0.0]);
        let t = Tensor::from_slice(&data).view([2, 5]);
        let view = Rows::from_tensor(&t).expect("row-major");
        assert_eq!(view.row(1), &data[5..]);
        assert!(Rows::from_tensor(&t.tr()).is_none(), "column-major");
    }

    #[test]
    fn layer_norm_matches_float64() {
        tch::manual_seed(2);
        let x = Tensor::randn([37], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
        let (w, b) = (Tensor::randn([37], (Kind::Float, Device::Cpu)), Tensor::randn([37], (Kind::Float, Device::Cpu)));
        let want = x.to_kind(Kind::Double).layer_norm([37], Some(&w.to_kind(Kind::Double)), Some(&b.to_kind(Kind::Double)), 1e-5, false);
        let mut out = vec![0f32; 37];
        let s = |t: &Tensor| Vec::<f32>::try_from(t).unwrap();
        layer_norm_row(&s(&x), &s(&w), Some(&s(&b)), 1e-5, &mut out);
        let diff = (Tensor::from_slice(&out).to_kind(Kind::Double) - want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn rms_norm_matches_float64() {
        tch::manual_seed(1);
        let _g = tch::no_grad_guard();
        for (rows, dim) in [(1i64, 256i64), (3, 7), (16, 64)] {
            let x = Tensor::randn([1, rows, dim], (Kind::Float, Device::Cpu)) * 3.0;
            let w = Tensor::randn([dim], (Kind::Float, Device::Cpu));
            let got = small_batch_rms_norm(&x, &w, 1e-6).expect("kernel applies");
            let xd = x.to_kind(Kind::Double);
            let want = &xd * (xd.square().mean_dim(-1, true, Kind::Double) + 1e-6).rsqrt() * w.to_kind(Kind::Double);
            let diff = (got.to_kind(Kind::Double) - want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "rows {rows} dim {dim}: {diff}");
        }
        assert!(small_batch_rms_norm(
            &Tensor::randn([17, 4], (Kind::Float, Device::Cpu)),
            &Tensor::ones([4], (Kind::Float, Device::Cpu)),
            1e-6
        )
        .is_none());
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([8, 4], opts).set_requires_grad(true);
        let x = Tensor::randn([1, 4], opts);
        assert!(grad_enabled());
        assert!(small_batch_linear(&x, &w, None).is_none(), "gradients are needed");
        let _g = tch::no_grad_guard();
        assert!(!grad_enabled());
        assert!(small_batch_linear(&x, &w, None).is_some());
        assert!(small_batch_linear(&Tensor::randn([2, 4], opts), &w, None).is_none(), "too many rows");
        assert!(small_batch_linear(&x.to_kind(Kind::Double), &w, None).is_none(), "not float32");
        assert!(small_batch_linear(&Tensor::randn([1, 5], opts), &w, None).is_none(), "shape mismatch");
        // The bias is never written to.
        let b = Tensor::randn([8], opts);
        let before = b.copy();
        let _ = small_batch_linear(&Tensor::randn([1, 4], opts), &w, Some(&b)).unwrap();
        assert!(b.equal(&before));
    }
}
