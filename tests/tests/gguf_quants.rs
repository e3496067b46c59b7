//! stlm's Q8_0 and Q4_0 blocks equal the `gguf` package's (ggml's reference quantization, in
//! the xtask's Python environment) byte for byte, and so do the dequantized values: rows of
//! normal values at magnitudes from 0.01 to 30, an all-zero block, a ramp and ties at .5.

use stlm_core::quant::{QuantFormat, QuantMatrix};
use stlm_tests::{reference_python, run_python};
use tch::{Device, Kind, Tensor};

#[test]
fn blocks_equal_the_gguf_packages() {
    let Some(python) = reference_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cols = 256usize;
    tch::manual_seed(0);
    let mut x: Vec<f32> = Vec::try_from(Tensor::randn([64 * cols as i64], (Kind::Float, Device::Cpu))).unwrap();
    for (b, block) in x.chunks_mut(32).enumerate() {
        let scale = [0.01f32, 1.0, 30.0, 0.2][b % 4];
        block.iter_mut().for_each(|v| *v *= scale);
    }
    x[32..64].fill(0.0);
    (0..32).for_each(|i| x[64 + i] = -1.0 + 2.0 * i as f32 / 31.0);
    (0..32).for_each(|i| x[96 + i] = (i as f32 - 16.0) * 0.5);
    let values = dir.path().join("values.f32");
    std::fs::write(&values, x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    run_python(&python, "gguf_quants.py", &[values.to_str().unwrap(), &cols.to_string(), dir.path().to_str().unwrap()]);
    for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
        let m = QuantMatrix::quantize(format, &x, cols).unwrap();
        let theirs = std::fs::read(dir.path().join(format!("{}.bin", format.name()))).unwrap();
        let ours = m.to_bytes();
        assert_eq!(ours.len(), theirs.len(), "{format:?}");
        let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{format:?}: {differing} of {} bytes differ", ours.len());
        let deq: Vec<f32> = std::fs::read(dir.path().join(format!("{}.f32", format.name())))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(m.dequantize(), deq, "{format:?}: dequantized values");
    }
}
