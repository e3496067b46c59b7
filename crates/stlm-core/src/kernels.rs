//! A matrix-vector linear layer and a few-row RMSNorm on the CPU (batch-1 decoding); the linear
//! layer on the `gemm` crate.
//!
//! libtorch's CPU matrix products go through MKL, whose matrix-vector product runs far below the
//! machine's memory bandwidth on AMD CPUs (MKL takes its generic code path there). Decoding one
//! token at batch 1 is nothing but matrix-vector products, so for one row of float32 without
//! gradients this kernel computes `x W^T + b` with the `gemm` crate's AVX2/AVX-512 code
//! instead. Its reference is `libtorch`'s `linear` and a float64 computation (tests below); its
//! speed is measured against libtorch in `benches/benches/linear.rs`.

use tch::{Device, Kind, Tensor};

/// Most rows (`batch * seq`) [`small_batch_linear`] takes: the `gemm` crate beats MKL here only
/// for the matrix-vector product (one row: 28 us against 45 us at 256 -> 1376), and loses from two
/// rows on (174 us against 86 us), measured with `cargo xtask bench -- linear`.
pub const LINEAR_MAX_ROWS: i64 = 1;

/// Most rows [`small_batch_rms_norm`] takes; larger inputs stay in libtorch.
pub const RMS_NORM_MAX_ROWS: i64 = 16;

/// True when libtorch records gradients on this thread.
pub fn grad_enabled() -> bool {
    // SAFETY: sets the thread-local grad mode and puts the previous value back at once.
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// `x W^T + b` for `x` `[.., in]`, `weight` `[out, in]` (any strides) and `bias` `[out]`, when
/// everything is float32 on the CPU, `x` has at most [`LINEAR_MAX_ROWS`] rows and no gradient is
/// needed; `None` otherwise, and the caller uses libtorch.
pub fn small_batch_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float;
    if !cpu_f32(x) || !cpu_f32(weight) || weight.dim() != 2 || !bias.is_none_or(cpu_f32) {
        return None;
    }
    let (out_dim, in_dim) = (weight.size()[0], weight.size()[1]);
    let shape = x.size();
    if shape.last() != Some(&in_dim) || in_dim == 0 || out_dim == 0 || bias.is_some_and(|b| b.size() != [out_dim]) {
        return None;
    }
    let rows = x.numel() as i64 / in_dim;
    if rows == 0 || rows > LINEAR_MAX_ROWS {
        return None;
    }
    let needs_grad = x.requires_grad() || weight.requires_grad() || bias.is_some_and(Tensor::requires_grad);
    if needs_grad && grad_enabled() {
        return None;
    }
    Some(gemm_linear(x, weight, bias, shape))
}

/// The product behind [`small_batch_linear`], for any number of rows; the caller has checked
/// that `x` `[.., in]` (shape `shape`), `weight` `[out, in]` and `bias` `[out]` are float32 on
/// the CPU.
fn gemm_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, mut shape: Vec<i64>) -> Tensor {
    let (out_dim, in_dim) = (weight.size()[0], weight.size()[1]);
    let rows = x.numel() as i64 / in_dim;
    let x = x.contiguous();
    // A fresh output; with a bias it starts as the bias in every row (`repeat` always copies).
    let out = match bias {
        Some(b) => b.unsqueeze(0).repeat([rows, 1]),
        None => Tensor::empty([rows, out_dim], (Kind::Float, Device::Cpu)),
    };
    let (w_rs, w_cs) = (weight.stride()[0] as isize, weight.stride()[1] as isize);
    // SAFETY: `out` is a new contiguous [rows, out] float32 buffer; `x` is contiguous
    // [rows, in] float32; `weight` is [out, in] float32 whose element (n, k) is at
    // n * w_rs + k * w_cs from its data pointer. All three live until the call returns and no
    // other code touches `out` meanwhile.
    unsafe {
        gemm::gemm(
            rows as usize,
            out_dim as usize,
            in_dim as usize,
            out.data_ptr() as *mut f32,
            1,
            out_dim as isize,
            bias.is_some(),
            x.data_ptr() as *const f32,
            1,
            in_dim as isize,
            weight.data_ptr() as *const f32,
            w_rs,
            w_cs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    *shape.last_mut().expect("x has a last dimension") = out_dim;
    out.view(shape.as_slice())
}

/// RMSNorm `x / sqrt(mean(x^2) + eps) * weight` over the last dimension for at most
/// [`RMS_NORM_MAX_ROWS`] float32 rows on the CPU without gradients; `None` otherwise. libtorch's
/// `rms_norm` costs about 18 us a call at decoding sizes, this loop about 1 us.
pub fn small_batch_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Option<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float;
    let dim = *weight.size().first()?;
    if !cpu_f32(x) || !cpu_f32(weight) || weight.dim() != 1 || x.size().last() != Some(&dim) || dim == 0 {
        return None;
    }
    let rows = x.numel() as i64 / dim;
    if rows == 0 || rows > RMS_NORM_MAX_ROWS || ((x.requires_grad() || weight.requires_grad()) && grad_enabled()) {
        return None;
    }
    let (x, weight) = (x.contiguous(), weight.contiguous());
    let out = Tensor::empty(x.size(), (Kind::Float, Device::Cpu));
    let n = (rows * dim) as usize;
    // SAFETY: `x` and `out` are contiguous float32 buffers of `rows * dim` elements and `weight`
    // one of `dim`; `out` is new, so the slices do not alias, and all live until the end.
    let (xs, ws, ys) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, n),
            std::slice::from_raw_parts(weight.data_ptr() as *const f32, dim as usize),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
        )
    };
    for (xr, yr) in xs.chunks_exact(dim as usize).zip(ys.chunks_exact_mut(dim as usize)) {
        let mean_square = xr.iter().map(|&v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (mean_square + eps as f32).sqrt();
        for ((y, &v), &w) in yr.iter_mut().zip(xr).zip(ws) {
            *y = v * scale * w;
        }
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

        /// Agrees with a float64 computation for row-major, column-major and sliced weights, for
        /// one row (the public kernel) and for several (the product behind it).
        #[test]
        fn matches_float64(seed in 0i64..10_000, rows in 1i64..=16, in_dim in 1i64..70, out_dim in 1i64..90, layout in 0u8..3, with_bias: bool) {
            tch::manual_seed(seed);
            let opts = (Kind::Float, Device::Cpu);
            let w = match layout {
                0 => Tensor::randn([out_dim, in_dim], opts),
                1 => Tensor::randn([out_dim, in_dim], opts).tr().contiguous().tr(),
                _ => Tensor::randn([out_dim + 5, in_dim], opts).narrow(0, 3, out_dim),
            };
            let b = with_bias.then(|| Tensor::randn([out_dim], opts));
            let x = Tensor::randn([1, rows, in_dim], opts);
            let _g = tch::no_grad_guard();
            let got = if rows <= LINEAR_MAX_ROWS {
                small_batch_linear(&x, &w, b.as_ref()).expect("kernel applies")
            } else {
                prop_assert!(small_batch_linear(&x, &w, b.as_ref()).is_none());
                gemm_linear(&x, &w, b.as_ref(), x.size())
            };
            prop_assert_eq!(got.size(), vec![1, rows, out_dim]);
            let diff = (got.to_kind(Kind::Double) - reference(&x, &w, b.as_ref())).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-4 * (in_dim as f64).sqrt(), "max abs diff {}", diff);
        }
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
