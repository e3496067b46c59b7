//! Matrix-vector products over block-quantized weights (Q8_0, Q4_0 in ggml's layouts, see
//! [`crate::quant`]) for batch-1 decoding: the activation is quantized per block of 32 on the fly
//! ([`QuantizedVector`]: int8 values, a float32 scale and the block's sum), and each block's dot
//! product is an integer one, scaled by the two blocks' scales.
//!
//! For a weight block with scale `d_w` and values `q` and an activation block with scale `d_x`
//! and values `p`: Q8_0 gives `d_w d_x Σ q_j p_j`, Q4_0 (`q` in 0..15, value `q - 8`) gives
//! `d_w d_x (Σ q_j p_j - 8 Σ p_j)`. [`QuantRows::matvec`] picks the kernel at run time:
//! AVX-512 VNNI (256-bit `vpdpbusd`), AVX-VNNI, AVX2 (`vpmaddubsw`), or portable Rust; each is
//! tested against the portable one, which is tested against a float64 computation. Unlike
//! ggml, the activation's scale stays float32 (ggml rounds it to f16): a little more accurate,
//! no slower.

use crate::quant::{BlockQ4_0, BlockQ8_0, QuantMatrix, QK};
use crate::spin::SpinPool;
use half::f16;
use std::sync::Mutex;

/// Fewest weights [`QuantRows::matvec_split`] gives one worker.
pub const QSPLIT_MIN_WEIGHTS: usize = 64 * 1024;

/// An activation vector quantized to blocks of 32 int8 values with a float32 scale each
/// (round to nearest, the block's largest magnitude maps to 127), and each block's value sum.
#[derive(Debug, Clone, Default)]
pub struct QuantizedVector {
    qs: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<i32>,
}

impl QuantizedVector {
    /// An empty vector; [`QuantizedVector::quantize`] fills it (reusing its memory).
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `x` (a multiple of 32 values) into this vector.
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(x.len() % QK == 0, "a quantized vector holds whole blocks of {QK}, not {} values", x.len());
        let blocks = x.len() / QK;
        self.qs.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.sums.resize(blocks, 0);
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in self.qs[b * QK..(b + 1) * QK].iter_mut().zip(xb) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            self.d[b] = d;
            self.sums[b] = sum;
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.qs.len()
    }

    /// Whether the vector holds no values.
    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }
}

thread_local! {
    /// The input of this thread's quantized products, reused from call to call.
    static INPUT: std::cell::RefCell<QuantizedVector> = std::cell::RefCell::new(QuantizedVector::new());
}

/// Calls `f` with `x` quantized (into this thread's reused buffer): what every quantized product
/// of a float row starts with.
pub fn with_quantized<R>(x: &[f32], f: impl FnOnce(&QuantizedVector) -> R) -> R {
    INPUT.with(|q| {
        let mut q = q.borrow_mut();
        q.quantize(x);
        f(&q)
    })
}

/// A row-major matrix of quantized blocks: row `r` is blocks `r * cols / 32 ..` of `blocks`.
#[derive(Debug, Clone, Copy)]
pub enum QuantRows<'a> {
    /// Q8_0 blocks.
    Q8_0 {
        /// Every row's blocks, row after row.
        blocks: &'a [BlockQ8_0],
        /// Values per row (a multiple of 32).
        cols: usize,
    },
    /// Q4_0 blocks.
    Q4_0 {
        /// Every row's blocks, row after row.
        blocks: &'a [BlockQ4_0],
        /// Values per row (a multiple of 32).
        cols: usize,
    },
}

impl QuantMatrix {
    /// A borrowed view for the integer kernels.
    pub fn rows(&self) -> QuantRows<'_> {
        match self {
            QuantMatrix::Q8_0 { blocks, cols } => QuantRows::Q8_0 { blocks, cols: *cols },
            QuantMatrix::Q4_0 { blocks, cols } => QuantRows::Q4_0 { blocks, cols: *cols },
        }
    }
}

/// Which integer kernel runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKernel {
    /// Portable Rust.
    Portable,
    /// AVX2: `vpmaddubsw` and `vpmaddwd`.
    Avx2,
    /// AVX-VNNI (VEX-encoded `vpdpbusd` on 256-bit registers).
    AvxVnni,
    /// AVX-512 VNNI with AVX-512VL (`vpdpbusd` on 256-bit registers).
    Avx512Vnni,
}

impl QKernel {
    /// The fastest kernel this CPU has.
    pub fn best() -> QKernel {
        *QKernel::available().last().unwrap_or(&QKernel::Portable)
    }

    /// Every kernel this CPU can run, slowest first (detected once).
    pub fn available() -> &'static [QKernel] {
        static KERNELS: std::sync::OnceLock<Vec<QKernel>> = std::sync::OnceLock::new();
        KERNELS.get_or_init(|| {
            let mut out = vec![QKernel::Portable];
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") && has!("f16c") {
                    out.push(QKernel::Avx2);
                    if has!("avxvnni") {
                        out.push(QKernel::AvxVnni);
                    }
                    if has!("avx512vnni") && has!("avx512vl") {
                        out.push(QKernel::Avx512Vnni);
                    }
                }
            }
            out
        })
    }

    /// Its name, as benchmarks print it.
    pub fn name(self) -> &'static str {
        match self {
            QKernel::Portable => "portable",
            QKernel::Avx2 => "avx2",
            QKernel::AvxVnni => "avx-vnni",
            QKernel::Avx512Vnni => "avx512-vnni",
        }
    }
}

impl<'a> QuantRows<'a> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        match *self {
            QuantRows::Q8_0 { blocks, cols } => blocks.len() * QK / cols.max(1),
            QuantRows::Q4_0 { blocks, cols } => blocks.len() * QK / cols.max(1),
        }
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        match *self {
            QuantRows::Q8_0 { cols, .. } | QuantRows::Q4_0 { cols, .. } => cols,
        }
    }

    /// Rows `start..start + n`.
    pub fn narrow(&self, start: usize, n: usize) -> QuantRows<'a> {
        let per = self.cols() / QK;
        match *self {
            QuantRows::Q8_0 { blocks, cols } => QuantRows::Q8_0 { blocks: &blocks[start * per..(start + n) * per], cols },
            QuantRows::Q4_0 { blocks, cols } => QuantRows::Q4_0 { blocks: &blocks[start * per..(start + n) * per], cols },
        }
    }

    /// The kernel [`QuantRows::matvec_add`] uses: for Q8_0 AVX2 where the CPU has it (its
    /// sign trick and `vpmaddubsw` measured 10-20% faster than `vpdpbusd` on the project's
    /// Xeon, `benches/benches/qmatvec.rs`), for Q4_0 (unsigned nibbles, no sign trick) the
    /// newest the CPU has.
    pub fn kernel(&self) -> QKernel {
        match self {
            QuantRows::Q8_0 { .. } if QKernel::available().contains(&QKernel::Avx2) => QKernel::Avx2,
            _ => QKernel::best(),
        }
    }

    /// `y[r] += dot(row r, x)` with [`QuantRows::kernel`].
    pub fn matvec_add(&self, x: &QuantizedVector, y: &mut [f32]) {
        self.matvec_add_with(self.kernel(), x, y)
    }

    /// `y += W x` with the rows split over the workers of `pool` (blocks of at least
    /// [`QSPLIT_MIN_WEIGHTS`] weights, so small products stay on one thread).
    pub fn matvec_add_split(&self, x: &QuantizedVector, y: &mut [f32], pool: &SpinPool) {
        let rows = self.rows();
        let parts = pool.threads().min(rows * self.cols() / QSPLIT_MIN_WEIGHTS).max(1);
        if parts == 1 {
            return self.matvec_add(x, y);
        }
        let block = rows.div_ceil(parts).div_ceil(4) * 4;
        let chunks: Vec<Mutex<&mut [f32]>> = y.chunks_mut(block).map(Mutex::new).collect();
        let kernel = self.kernel();
        pool.run(&|i| {
            if let Some(chunk) = chunks.get(i) {
                let mut chunk = chunk.lock().unwrap_or_else(|e| e.into_inner());
                self.narrow(i * block, chunk.len()).matvec_add_with(kernel, x, &mut chunk);
            }
        });
    }

    /// `y[r] += dot(row r, x)` with `kernel` (which this CPU must have: see [`QKernel::available`]).
    pub fn matvec_add_with(&self, kernel: QKernel, x: &QuantizedVector, y: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        assert!(cols % QK == 0 && x.len() == cols && y.len() == rows, "quantized matvec: {rows}x{cols} matrix, x {}, y {}", x.len(), y.len());
        assert!(QKernel::available().contains(&kernel), "the {} kernel does not run on this CPU", kernel.name());
        let per = cols / QK;
        match (*self, kernel) {
            (QuantRows::Q8_0 { blocks, .. }, QKernel::Portable) => rows_of(blocks, per, y, |w| portable::dot_q8_0(w, x)),
            (QuantRows::Q4_0 { blocks, .. }, QKernel::Portable) => rows_of(blocks, per, y, |w| portable::dot_q4_0(w, x)),
            #[cfg(target_arch = "x86_64")]
            (QuantRows::Q8_0 { blocks, .. }, k) => {
                // SAFETY: `available` found the kernel's CPU features (asserted above); `blocks`
                // holds `y.len()` rows of `per` blocks and `x` holds `per` blocks (asserted).
                unsafe { x86::matvec_q8_0(k, blocks, per, x, y) }
            }
            #[cfg(target_arch = "x86_64")]
            (QuantRows::Q4_0 { blocks, .. }, k) => {
                // SAFETY: as above.
                unsafe { x86::matvec_q4_0(k, blocks, per, x, y) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable kernel is available off x86-64"),
        }
    }
}

/// `y_p += W_p x` for several matrices reading the same input (q, k and v; gate and up), split
/// over the workers of `pool` in one round: each worker takes its share of every matrix's rows,
/// so the pool synchronises once instead of once per matrix.
pub fn matvec_add_split_many(parts: &mut [(QuantRows<'_>, &mut [f32])], x: &QuantizedVector, pool: &SpinPool) {
    let weights: usize = parts.iter().map(|(m, _)| m.rows() * m.cols()).sum();
    let workers = pool.threads().min(weights / QSPLIT_MIN_WEIGHTS).max(1);
    if workers == 1 {
        return parts.iter_mut().for_each(|(m, y)| m.matvec_add(x, y));
    }
    // (worker, rows, their outputs) for every part's share.
    let mut shares: Vec<(usize, QuantRows<'_>, Mutex<&mut [f32]>)> = Vec::new();
    for (m, y) in parts.iter_mut() {
        let block = m.rows().div_ceil(workers).div_ceil(4) * 4;
        for (i, chunk) in y.chunks_mut(block.max(1)).enumerate() {
            shares.push((i, m.narrow(i * block, chunk.len()), Mutex::new(chunk)));
        }
    }
    pool.run(&|w| {
        for (_, m, y) in shares.iter().filter(|(i, _, _)| *i == w) {
            let mut y = y.lock().unwrap_or_else(|e| e.into_inner());
            m.matvec_add_with(m.kernel(), x, &mut y);
        }
    });
}

/// `y[r] += dot(r-th run of `per` blocks)` for every row.
fn rows_of<B>(blocks: &[B], per: usize, y: &mut [f32], dot: impl Fn(&[B]) -> f32) {
    for (yr, w) in y.iter_mut().zip(blocks.chunks_exact(per)) {
        *yr += dot(w);
    }
}

mod portable {
    use super::*;

    /// One row of Q8_0 blocks dotted with `x`.
    pub fn dot_q8_0(w: &[BlockQ8_0], x: &QuantizedVector) -> f32 {
        let mut s = 0.0f32;
        for (b, wb) in w.iter().enumerate() {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            let dot: i32 = wb.qs.iter().zip(xq).map(|(&a, &c)| a as i32 * c as i32).sum();
            s += f16::from_bits(wb.d).to_f32() * x.d[b] * dot as f32;
        }
        s
    }

    /// One row of Q4_0 blocks dotted with `x`.
    pub fn dot_q4_0(w: &[BlockQ4_0], x: &QuantizedVector) -> f32 {
        let mut s = 0.0f32;
        for (b, wb) in w.iter().enumerate() {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            let mut dot = 0i32;
            for (j, &q) in wb.qs.iter().enumerate() {
                dot += (q & 0x0F) as i32 * xq[j] as i32 + (q >> 4) as i32 * xq[j + QK / 2] as i32;
            }
            s += f16::from_bits(wb.d).to_f32() * x.d[b] * (dot - 8 * x.sums[b]) as f32;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::kernels::avx2::hsum;
    use std::arch::x86_64::*;


    /// Eight i32 lanes of `Σ u_j s_j` over groups of four bytes (`u` unsigned, `s` signed).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    unsafe fn dot_avxvnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
    }

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn dot_avx512vnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    }

    /// The 32 values of a Q4_0 block as unsigned bytes 0..15, in value order: the 16 bytes
    /// loaded into both halves (one broadcast load), the upper half shifted right by 4 bits (per
    /// 32-bit lane: the mask then keeps each byte's own high nibble), masked.
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(qs: *const u8) -> __m256i {
        let b = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs as *const __m128i));
        _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0)), _mm256_set1_epi8(0x0F))
    }

    /// The four sums of `a[0..4]`'s lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum4(a: [__m256; 4]) -> __m128 {
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1))
    }

    /// Adds the four sums of `acc` (minus `minus`) to `y[0..4]`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add4(acc: [__m256; 4], minus: [f32; 4], y: &mut [f32]) {
        let s = _mm_sub_ps(hsum4(acc), _mm_loadu_ps(minus.as_ptr()));
        _mm_storeu_ps(y.as_mut_ptr(), _mm_add_ps(_mm_loadu_ps(y.as_ptr()), s));
    }

    /// Rows taken together: each activation block is loaded once for all of them, and their
    /// sums are reduced together. Rows are contiguous, so the group reads one stream.
    const GROUP: usize = 4;

    /// The scales `d_w * d_x` of block `b` of the `GROUP` rows at `base` (rows of `per` blocks;
    /// rows past `n` repeat row `n - 1`, whose sums are then not used): the four f16 scales
    /// converted in one instruction.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales4<B>(base: *const B, per: usize, b: usize, n: usize, d: impl Fn(&B) -> u16, dx: f32) -> __m128 {
        let row = |i: usize| d(&*base.add(i.min(n - 1) * per + b)) as i16;
        let d16 = _mm_set_epi16(0, 0, 0, 0, row(3), row(2), row(1), row(0));
        _mm_mul_ps(_mm_cvtph_ps(d16), _mm_set1_ps(dx))
    }

    /// Lane `i` of `d` in all eight lanes.
    #[target_feature(enable = "avx2")]
    unsafe fn lane(d: __m128, i: usize) -> __m256 {
        _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d), _mm256_set1_epi32(i as i32))
    }

    /// Instantiates the matrix-vector kernels of one dot-product instruction: `$feat` are the
    /// target features, `$dot` the 4-way byte dot product (unsigned times signed).
    macro_rules! kernels {
        ($q8:ident, $q4:ident, $feat:literal, $dot:ident) => {
            /// `y[r] += dot(row r, x)` over Q8_0 rows of `per` blocks.
            #[target_feature(enable = $feat)]
            unsafe fn $q8(w: &[BlockQ8_0], per: usize, x: &QuantizedVector, y: &mut [f32]) {
                let (xq, xd) = (x.qs.as_ptr(), x.d.as_ptr());
                let mut r = 0;
                while r < y.len() {
                    let n = GROUP.min(y.len() - r);
                    let base = w.as_ptr().add(r * per);
                    let mut acc = [_mm256_setzero_ps(); GROUP];
                    for b in 0..per {
                        let xv = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
                        let d = scales4(base, per, b, n, |wb: &BlockQ8_0| wb.d, *xd.add(b));
                        for (i, a) in acc.iter_mut().enumerate() {
                            let wb = &*base.add(i.min(n - 1) * per + b);
                            let wv = _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i);
                            // |w| as unsigned times x with w's sign.
                            let lanes = $dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), lane(d, i), *a);
                        }
                    }
                    match n {
                        GROUP => add4(acc, [0.0; GROUP], &mut y[r..r + GROUP]),
                        _ => (0..n).for_each(|i| y[r + i] += hsum(acc[i])),
                    }
                    r += n;
                }
            }

            /// `y[r] += dot(row r, x)` over Q4_0 rows of `per` blocks: the nibbles (0..15)
            /// times x, minus 8 times the block's sum of x.
            #[target_feature(enable = $feat)]
            unsafe fn $q4(w: &[BlockQ4_0], per: usize, x: &QuantizedVector, y: &mut [f32]) {
                let (xq, xd, xs) = (x.qs.as_ptr(), x.d.as_ptr(), x.sums.as_ptr());
                let mut r = 0;
                while r < y.len() {
                    let n = GROUP.min(y.len() - r);
                    let base = w.as_ptr().add(r * per);
                    let mut acc = [_mm256_setzero_ps(); GROUP];
                    let mut minus = _mm_setzero_ps();
                    for b in 0..per {
                        let xv = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
                        let d = scales4(base, per, b, n, |wb: &BlockQ4_0| wb.d, *xd.add(b));
                        minus = _mm_fmadd_ps(d, _mm_set1_ps((8 * *xs.add(b)) as f32), minus);
                        for (i, a) in acc.iter_mut().enumerate() {
                            let wb = &*base.add(i.min(n - 1) * per + b);
                            let lanes = $dot(nibbles(wb.qs.as_ptr()), xv);
                            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), lane(d, i), *a);
                        }
                    }
                    let mut m = [0.0f32; GROUP];
                    _mm_storeu_ps(m.as_mut_ptr(), minus);
                    match n {
                        GROUP => add4(acc, m, &mut y[r..r + GROUP]),
                        _ => (0..n).for_each(|i| y[r + i] += hsum(acc[i]) - m[i]),
                    }
                    r += n;
                }
            }
        };
    }

    kernels!(q8_avx2, q4_avx2, "avx2,fma,f16c", dot_avx2);
    kernels!(q8_avxvnni, q4_avxvnni, "avx2,fma,f16c,avxvnni", dot_avxvnni);
    kernels!(q8_avx512vnni, q4_avx512vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_avx512vnni);

    /// `y[r] += dot(row r, x)` over Q8_0 rows of `per` blocks, by `kernel`.
    ///
    /// # Safety
    /// The CPU must have `kernel`'s features; `w` must hold `y.len() * per` blocks and `x`
    /// `32 * per` values.
    pub unsafe fn matvec_q8_0(kernel: QKernel, w: &[BlockQ8_0], per: usize, x: &QuantizedVector, y: &mut [f32]) {
        match kernel {
            QKernel::Portable => rows_of(w, per, y, |row| portable::dot_q8_0(row, x)),
            QKernel::Avx2 => q8_avx2(w, per, x, y),
            QKernel::AvxVnni => q8_avxvnni(w, per, x, y),
            QKernel::Avx512Vnni => q8_avx512vnni(w, per, x, y),
        }
    }

    /// As [`matvec_q8_0`] over Q4_0 rows.
    ///
    /// # Safety
    /// As [`matvec_q8_0`].
    pub unsafe fn matvec_q4_0(kernel: QKernel, w: &[BlockQ4_0], per: usize, x: &QuantizedVector, y: &mut [f32]) {
        match kernel {
            QKernel::Portable => rows_of(w, per, y, |row| portable::dot_q4_0(row, x)),
            QKernel::Avx2 => q4_avx2(w, per, x, y),
            QKernel::AvxVnni => q4_avxvnni(w, per, x, y),
            QKernel::Avx512Vnni => q4_avx512vnni(w, per, x, y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_q4_0, dequantize_q8_0, quantize_q4_0, quantize_q8_0};
    use proptest::prelude::*;

    /// `W x` in float64 from the dequantized weights and the dequantized activation, with
    /// `Σ |w_j x_j|` per row (the scale of float32 rounding errors).
    fn reference(w: &[f32], rows: usize, x: &QuantizedVector) -> Vec<(f64, f64)> {
        let cols = x.len();
        let xs: Vec<f64> = (0..cols).map(|j| x.qs[j] as f64 * x.d[j / QK] as f64).collect();
        (0..rows)
            .map(|r| {
                let row = &w[r * cols..(r + 1) * cols];
                (row.iter().zip(&xs).map(|(&a, &b)| a as f64 * b).sum(), row.iter().zip(&xs).map(|(&a, &b)| (a as f64 * b).abs()).sum())
            })
            .collect()
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        // A small LCG: deterministic, with varying magnitudes per block and exact zeros.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = ((s >> 33) as f64 / (1u64 << 31) as f64) as f32 * 2.0 - 1.0;
                let scale = [0.01f32, 1.0, 30.0, 0.0][(i / QK) % 4];
                u * scale
            })
            .collect()
    }

    fn check(rows: usize, blocks: usize, seed: u64) {
        let cols = blocks * QK;
        let w = values(rows * cols, seed);
        let mut x = QuantizedVector::new();
        x.quantize(&values(cols, seed + 1));
        let q8 = quantize_q8_0(&w).unwrap();
        let q4 = quantize_q4_0(&w).unwrap();
        let (mut w8, mut w4) = (vec![0.0; w.len()], vec![0.0; w.len()]);
        dequantize_q8_0(&q8, &mut w8).unwrap();
        dequantize_q4_0(&q4, &mut w4).unwrap();
        for (m, deq) in [(QuantRows::Q8_0 { blocks: &q8, cols }, &w8), (QuantRows::Q4_0 { blocks: &q4, cols }, &w4)] {
            let want = reference(deq, rows, &x);
            for &kernel in QKernel::available() {
                let mut y = vec![0.5f32; rows];
                m.matvec_add_with(kernel, &x, &mut y);
                for (r, (&a, &(e, size))) in y.iter().zip(&want).enumerate() {
                    let tol = 1e-6 * blocks as f64 * size + 1e-6;
                    assert!(((a as f64 - 0.5) - e).abs() <= tol, "{} row {r}: {a} - 0.5 vs {e} (tolerance {tol})", kernel.name());
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_float64_reference() {
        check(7, 5, 0);
        check(1, 1, 3);
        check(33, 9, 11);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn every_kernel_matches_on_any_shape(rows in 1usize..20, blocks in 1usize..12, seed in 0u64..1000) {
            check(rows, blocks, seed);
        }
    }

    #[test]
    fn the_activation_is_quantized_per_block_with_its_sum() {
        let mut x = QuantizedVector::new();
        let v: Vec<f32> = (0..64).map(|i| if i < 32 { i as f32 - 16.0 } else { 0.0 }).collect();
        x.quantize(&v);
        assert_eq!(x.d[0], 16.0 / 127.0);
        assert_eq!(x.qs[0], -127);
        assert_eq!(x.qs[16], 0);
        assert_eq!(x.sums[0], x.qs[..32].iter().map(|&q| q as i32).sum::<i32>());
        assert_eq!((x.d[1], x.sums[1]), (0.0, 0));
    }

    #[test]
    fn one_round_over_several_matrices_equals_each_alone() {
        let cols = 256;
        let (a, b) = (quantize_q8_0(&values(700 * cols, 7)).unwrap(), quantize_q4_0(&values(300 * cols, 8)).unwrap());
        let (ma, mb) = (QuantRows::Q8_0 { blocks: &a, cols }, QuantRows::Q4_0 { blocks: &b, cols });
        let mut x = QuantizedVector::new();
        x.quantize(&values(cols, 9));
        let (mut ya, mut yb) = (vec![0.25; 700], vec![-1.0; 300]);
        ma.matvec_add(&x, &mut ya);
        mb.matvec_add(&x, &mut yb);
        let (mut za, mut zb) = (vec![0.25; 700], vec![-1.0; 300]);
        matvec_add_split_many(&mut [(ma, &mut za[..]), (mb, &mut zb[..])], &x, &SpinPool::new(2));
        assert_eq!((ya, yb), (za, zb));
    }

    #[test]
    fn split_products_equal_the_single_thread_one() {
        let (rows, cols) = (600, 256);
        let w = values(rows * cols, 5);
        let q4 = quantize_q4_0(&w).unwrap();
        let m = QuantRows::Q4_0 { blocks: &q4, cols };
        let mut x = QuantizedVector::new();
        x.quantize(&values(cols, 6));
        let (mut a, mut b) = (vec![0.0; rows], vec![0.0; rows]);
        m.matvec_add(&x, &mut a);
        m.matvec_add_split(&x, &mut b, &SpinPool::new(2));
        assert_eq!(a, b);
    }
}
