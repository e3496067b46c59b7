//! Block-quantized weights in ggml's layouts, so that a GGUF file is a copy of the blocks: Q8_0
//! (32 int8 values and one f16 scale, 34 bytes) and Q4_0 (32 4-bit values and one f16 scale,
//! 18 bytes). Quantization and dequantization follow ggml's reference functions
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `dequantize_row_q8_0/q4_0`) value for value:
//! the scale is computed in float32, rounded to f16 (nearest even) for storage, and the values
//! are quantized with the float32 scale's inverse.

use crate::error::CoreError;
use half::f16;

/// Values per block of both formats (ggml's `QK8_0` and `QK4_0`).
pub const QK: usize = 32;

/// ggml's `block_q8_0`: `d` (f16 bits) and 32 signed 8-bit values, `x ≈ qs[j] · d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// The scale, f16 bits.
    pub d: u16,
    /// The values.
    pub qs: [i8; QK],
}

/// ggml's `block_q4_0`: `d` (f16 bits) and 32 4-bit values in 16 bytes, `x ≈ (q - 8) · d`; byte
/// `j` holds value `j` in its low nibble and value `j + 16` in its high nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// The scale, f16 bits.
    pub d: u16,
    /// The nibbles.
    pub qs: [u8; QK / 2],
}

/// Checks that `out` has room for exactly the values of `blocks` blocks.
fn check_out(what: &str, blocks: usize, out: usize) -> Result<(), CoreError> {
    if out != blocks * QK {
        return Err(CoreError::Invalid(format!("{what}: {blocks} blocks hold {} values, not {out}", blocks * QK)));
    }
    Ok(())
}

fn check_len(what: &str, n: usize) -> Result<usize, CoreError> {
    if n % QK != 0 {
        return Err(CoreError::Invalid(format!("{what}: {n} values are not whole blocks of {QK}")));
    }
    Ok(n / QK)
}

/// `x` (a multiple of 32 values, e.g. a weight row) as Q8_0 blocks.
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<BlockQ8_0>, CoreError> {
    check_len("Q8_0", x.len())?;
    Ok(x.chunks_exact(QK)
        .map(|b| {
            let (d, id) = QuantFormat::Q8_0.block_scale(b);
            BlockQ8_0 { d: f16::from_f32(d).to_bits(), qs: std::array::from_fn(|j| QuantFormat::Q8_0.code(b[j], id) as i8) }
        })
        .collect())
}

/// The values of Q8_0 `blocks`, written to `out` (32 per block).
pub fn dequantize_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) -> Result<(), CoreError> {
    check_out("Q8_0", blocks.len(), out.len())?;
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16::from_bits(b.d).to_f32();
        for (v, &q) in y.iter_mut().zip(&b.qs) {
            *v = q as f32 * d;
        }
    }
    Ok(())
}

/// `x` (a multiple of 32 values) as Q4_0 blocks: the value of largest magnitude maps to -8 exactly.
pub fn quantize_q4_0(x: &[f32]) -> Result<Vec<BlockQ4_0>, CoreError> {
    check_len("Q4_0", x.len())?;
    Ok(x.chunks_exact(QK)
        .map(|b| {
            let (d, id) = QuantFormat::Q4_0.block_scale(b);
            let nibble = |v: f32| QuantFormat::Q4_0.code(v, id) as u8;
            BlockQ4_0 { d: f16::from_f32(d).to_bits(), qs: std::array::from_fn(|j| nibble(b[j]) | (nibble(b[j + QK / 2]) << 4)) }
        })
        .collect())
}

/// The values of Q4_0 `blocks`, written to `out` (32 per block).
pub fn dequantize_q4_0(blocks: &[BlockQ4_0], out: &mut [f32]) -> Result<(), CoreError> {
    check_out("Q4_0", blocks.len(), out.len())?;
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16::from_bits(b.d).to_f32();
        for (j, &q) in b.qs.iter().enumerate() {
            y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            y[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
    Ok(())
}

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantFormat {
    /// [`BlockQ8_0`]: 8.5 bits per weight.
    Q8_0,
    /// [`BlockQ4_0`]: 4.5 bits per weight.
    Q4_0,
}

impl QuantFormat {
    /// Its name (`q8_0`, `q4_0`), as files and the command line spell it.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    /// Bytes per block of [`QK`] values.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            QuantFormat::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
        }
    }

    /// Bits per weight (the scale included).
    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() * 8) as f64 / QK as f64
    }

    /// ggml's float32 scale `d` of a block's values `x` and its inverse (0 when `d` is 0): Q8_0
    /// `max |x| / 127`, Q4_0 the value of largest magnitude `/ -8`. The block stores `d` as f16;
    /// values are coded with the float32 inverse.
    pub fn block_scale(self, x: &[f32]) -> (f32, f32) {
        let d = match self {
            QuantFormat::Q8_0 => x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0,
            QuantFormat::Q4_0 => {
                let (mut amax, mut max) = (0.0f32, 0.0f32);
                for &v in x {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                max / -8.0
            }
        };
        (d, if d != 0.0 { 1.0 / d } else { 0.0 })
    }

    /// ggml's code of `v` in a block whose scale's inverse is `id`: Q8_0 `round(v · id)` (halves
    /// away from zero) in -127..=127; Q4_0 `v · id + 8.5` truncated (C's `(int8_t)`), in 0..=15.
    /// The clamps change nothing for the block's own values; they bound values updated after the
    /// scale was chosen (GPTQ's).
    pub fn code(self, v: f32, id: f32) -> i32 {
        match self {
            QuantFormat::Q8_0 => (v * id).round().clamp(-127.0, 127.0) as i32,
            QuantFormat::Q4_0 => ((v * id + 8.5).floor() as i32).clamp(0, 15),
        }
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "q8_0" => Ok(QuantFormat::Q8_0),
            "q4_0" => Ok(QuantFormat::Q4_0),
            _ => Err(CoreError::Invalid(format!("quantization format `{s}`: expected q8_0 or q4_0"))),
        }
    }
}

/// A row-major matrix `[rows, cols]` of quantized blocks (`cols` a multiple of [`QK`]).
#[derive(Debug, Clone, PartialEq)]
pub enum QuantMatrix {
    /// Q8_0 blocks, row after row.
    Q8_0 {
        /// The blocks.
        blocks: Vec<BlockQ8_0>,
        /// Values per row.
        cols: usize,
    },
    /// Q4_0 blocks, row after row.
    Q4_0 {
        /// The blocks.
        blocks: Vec<BlockQ4_0>,
        /// Values per row.
        cols: usize,
    },
}

impl QuantMatrix {
    /// `values` (`rows * cols`, row-major) quantized to `format`; `cols` must be a multiple of
    /// [`QK`] (blocks never cross rows).
    pub fn quantize(format: QuantFormat, values: &[f32], cols: usize) -> Result<Self, CoreError> {
        if cols == 0 || cols % QK != 0 || values.len() % cols != 0 {
            return Err(CoreError::Invalid(format!("rows of {cols} values do not divide into blocks of {QK}")));
        }
        Ok(match format {
            QuantFormat::Q8_0 => QuantMatrix::Q8_0 { blocks: quantize_q8_0(values)?, cols },
            QuantFormat::Q4_0 => QuantMatrix::Q4_0 { blocks: quantize_q4_0(values)?, cols },
        })
    }

    /// Its format.
    pub fn format(&self) -> QuantFormat {
        match self {
            QuantMatrix::Q8_0 { .. } => QuantFormat::Q8_0,
            QuantMatrix::Q4_0 { .. } => QuantFormat::Q4_0,
        }
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        let (n, cols) = match self {
            QuantMatrix::Q8_0 { blocks, cols } => (blocks.len(), *cols),
            QuantMatrix::Q4_0 { blocks, cols } => (blocks.len(), *cols),
        };
        (n * QK / cols, cols)
    }

    /// Every value, dequantized (row-major).
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = self.shape();
        let mut out = vec![0.0; rows * cols];
        let done = match self {
            QuantMatrix::Q8_0 { blocks, .. } => dequantize_q8_0(blocks, &mut out),
            QuantMatrix::Q4_0 { blocks, .. } => dequantize_q4_0(blocks, &mut out),
        };
        done.expect("the output holds every block");
        out
    }

    /// The blocks as ggml stores them (little-endian `d`, then the values): what a GGUF tensor
    /// and a quantized model's safetensors entry hold.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.byte_len());
        match self {
            QuantMatrix::Q8_0 { blocks, .. } => blocks.iter().for_each(|b| {
                out.extend_from_slice(&b.d.to_le_bytes());
                out.extend(b.qs.iter().map(|&q| q as u8));
            }),
            QuantMatrix::Q4_0 { blocks, .. } => blocks.iter().for_each(|b| {
                out.extend_from_slice(&b.d.to_le_bytes());
                out.extend_from_slice(&b.qs);
            }),
        }
        out
    }

    /// Bytes of [`QuantMatrix::to_bytes`].
    pub fn byte_len(&self) -> usize {
        let (rows, cols) = self.shape();
        rows * cols / QK * self.format().block_bytes()
    }

    /// The matrix `[rows, cols]` of `format` in `bytes` (as [`QuantMatrix::to_bytes`] writes);
    /// an error says how the length differs.
    pub fn from_bytes(format: QuantFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, CoreError> {
        if cols == 0 || cols % QK != 0 {
            return Err(CoreError::Invalid(format!("rows of {cols} values do not divide into blocks of {QK}")));
        }
        let size = format.block_bytes();
        let want = rows * cols / QK * size;
        if bytes.len() != want {
            return Err(CoreError::Invalid(format!(
                "{} [{rows}, {cols}] needs {want} bytes, got {}",
                format.name(),
                bytes.len()
            )));
        }
        let d = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
        Ok(match format {
            QuantFormat::Q8_0 => QuantMatrix::Q8_0 {
                blocks: bytes
                    .chunks_exact(size)
                    .map(|c| {
                        let mut qs = [0i8; QK];
                        qs.iter_mut().zip(&c[2..]).for_each(|(q, &b)| *q = b as i8);
                        BlockQ8_0 { d: d(c), qs }
                    })
                    .collect(),
                cols,
            },
            QuantFormat::Q4_0 => QuantMatrix::Q4_0 {
                blocks: bytes
                    .chunks_exact(size)
                    .map(|c| {
                        let mut qs = [0u8; QK / 2];
                        qs.copy_from_slice(&c[2..]);
                        BlockQ4_0 { d: d(c), qs }
                    })
                    .collect(),
                cols,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn blocks_have_ggmls_sizes() {
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), 18);
    }

    /// Values worked out by hand from ggml's reference rules.
    #[test]
    fn hand_worked_blocks() {
        let mut x = [0.0f32; QK];
        (x[0], x[1], x[2], x[3]) = (1.0, -2.0, 0.5, 0.0078125);
        let b = &quantize_q8_0(&x).unwrap()[0];
        // d = 2/127; 1.0 -> 63.5 rounds away from zero to 64; -2 -> -127; 0.5 -> 31.75 -> 32;
        // 0.0078125 -> 0.496 -> 0.
        assert_eq!(&b.qs[..4], &[64, -127, 32, 0]);
        assert_eq!(b.d, f16::from_f32(2.0 / 127.0).to_bits());

        let mut x = [0.0f32; QK];
        (x[0], x[1], x[2], x[16], x[17]) = (-4.0, 2.0, 1.0, 3.75, -0.75);
        let b = &quantize_q4_0(&x).unwrap()[0];
        // max = -4 -> d = 0.5, id = 2: -4 -> 0.5 -> 0; 2 -> 12.5 -> 12; 1 -> 10; 0 -> 8;
        // 3.75 -> 16 -> 15 (clamped); -0.75 -> 7.
        assert_eq!(b.d, f16::from_f32(0.5).to_bits());
        assert_eq!(b.qs[0], 0 | (15 << 4));
        assert_eq!(b.qs[1], 12 | (7 << 4));
        assert_eq!(b.qs[2], 10 | (8 << 4));
        let mut y = [0.0f32; QK];
        dequantize_q4_0(std::slice::from_ref(b), &mut y).unwrap();
        assert_eq!((y[0], y[1], y[2], y[16], y[17]), (-4.0, 2.0, 1.0, 3.5, -0.5));

        let zero = quantize_q8_0(&[0.0; QK]).unwrap()[0];
        assert_eq!((zero.d, zero.qs), (0, [0; QK]));
        let zero = quantize_q4_0(&[0.0; QK]).unwrap()[0];
        // 0 / -8 is -0.0 in float32, stored as f16 0x8000, as ggml stores it.
        assert_eq!((zero.d, zero.qs), (0x8000, [0x88; QK / 2]));
        assert!(quantize_q8_0(&[1.0; 33]).unwrap_err().to_string().contains("33 values"));
        assert!(dequantize_q4_0(&[zero], &mut [0.0; 31]).is_err());
    }

    #[test]
    fn matrices_round_trip_through_bytes() {
        let values: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.37).sin() * (1 + i % 7) as f32).collect();
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let m = QuantMatrix::quantize(format, &values, 64).unwrap();
            assert_eq!((m.shape(), m.format()), ((3, 64), format));
            let bytes = m.to_bytes();
            assert_eq!(bytes.len(), 3 * 2 * format.block_bytes());
            assert_eq!(QuantMatrix::from_bytes(format, 3, 64, &bytes).unwrap(), m);
            let e = QuantMatrix::from_bytes(format, 3, 64, &bytes[1..]).unwrap_err().to_string();
            assert!(e.contains(format.name()) && e.contains(&format!("got {}", bytes.len() - 1)), "{e}");
            assert_eq!(format.name().parse::<QuantFormat>().unwrap(), format);
        }
        assert!(QuantMatrix::quantize(QuantFormat::Q8_0, &values, 48).is_err());
        assert_eq!(QuantFormat::Q8_0.bits_per_weight(), 8.5);
        assert_eq!(QuantFormat::Q4_0.bits_per_weight(), 4.5);
    }

    proptest! {
        /// Every value comes back within half a step (plus the f16 rounding of the scale), in
        /// float64.
        #[test]
        fn round_trips_stay_within_half_a_step(x in proptest::collection::vec(-100.0f32..100.0, QK * 3)) {
            let mut y = vec![0.0f32; x.len()];
            dequantize_q8_0(&quantize_q8_0(&x).unwrap(), &mut y).unwrap();
            for (b, (xs, ys)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                let amax = xs.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
                let step = amax / 127.0;
                for (a, q) in xs.iter().zip(ys) {
                    let err = (*a as f64 - *q as f64).abs();
                    prop_assert!(err <= step / 2.0 + 127.0 * step * 1e-3 + 1e-6, "Q8_0 block {b}: {a} -> {q}");
                }
            }
            dequantize_q4_0(&quantize_q4_0(&x).unwrap(), &mut y).unwrap();
            for (xs, ys) in x.chunks(QK).zip(y.chunks(QK)) {
                let amax = xs.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
                let step = amax / 8.0;
                for (a, q) in xs.iter().zip(ys) {
                    // The largest positive value may clamp at 7 steps: one step off at most.
                    let err = (*a as f64 - *q as f64).abs();
                    prop_assert!(err <= step + 8.0 * step * 1e-3 + 1e-6, "Q4_0: {a} -> {q}");
                }
            }
        }
    }
}

