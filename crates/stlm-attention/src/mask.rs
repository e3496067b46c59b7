//! Which keys each query may see: causal, none, or an explicit boolean mask.

use tch::{Device, Kind, Tensor};

/// The mask an attention kernel applies.
#[derive(Debug)]
pub enum AttentionMask {
    /// Query i sees keys 0..=i (queries and keys start at the same position).
    Causal,
    /// Every query sees every key (one new token against a cache, or bidirectional attention).
    Full,
    /// Boolean `[batch or 1, 1, q_len, kv_len]`, true where attention is allowed.
    Explicit(Tensor),
}

impl AttentionMask {
    /// The mask for `q_len` new queries after `past_len` cached positions.
    ///
    /// `key_valid` (`[batch, past_len + q_len]`, bool) marks real tokens; padding keys are hidden
    /// from every query except itself, so that a padding query still has one key and no row is
    /// entirely masked (which would give NaN).
    pub fn causal(q_len: i64, past_len: i64, key_valid: Option<&Tensor>, device: Device) -> Self {
        if key_valid.is_none() {
            if q_len == 1 {
                return AttentionMask::Full;
            }
            if past_len == 0 {
                return AttentionMask::Causal;
            }
        }
        let kv_len = past_len + q_len;
        let q_pos = Tensor::arange_start(past_len, kv_len, (Kind::Int64, device)).unsqueeze(1);
        let k_pos = Tensor::arange(kv_len, (Kind::Int64, device)).unsqueeze(0);
        let causal = k_pos.le_tensor(&q_pos); // [q, kv]
        let mask = match key_valid {
            None => causal,
            Some(valid) => {
                let diagonal = k_pos.eq_tensor(&q_pos);
                let valid = valid.to_kind(Kind::Bool).unsqueeze(1); // [b, 1, kv]
                causal.logical_and(&valid).logical_or(&diagonal)
            }
        };
        AttentionMask::Explicit(mask.view([-1, 1, q_len, kv_len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_causal_mask() {
        let AttentionMask::Explicit(m) = AttentionMask::causal(2, 3, None, Device::Cpu) else {
            panic!("expected an explicit mask")
        };
        let rows: Vec<Vec<bool>> = (0..2).map(|i| Vec::<bool>::try_from(m.get(0).get(0).get(i)).unwrap()).collect();
        assert_eq!(rows[0], vec![true, true, true, true, false]);
        assert_eq!(rows[1], vec![true, true, true, true, true]);
        assert!(matches!(AttentionMask::causal(1, 7, None, Device::Cpu), AttentionMask::Full));
        assert!(matches!(AttentionMask::causal(4, 0, None, Device::Cpu), AttentionMask::Causal));
    }

    #[test]
    fn padding_keys_hidden_but_rows_never_empty() {
        let valid = Tensor::from_slice(&[false, true, true]).view([1, 3]);
        let AttentionMask::Explicit(m) = AttentionMask::causal(3, 0, Some(&valid), Device::Cpu) else {
            panic!("expected an explicit mask")
        };
        let m = m.get(0).get(0);
        assert_eq!(Vec::<bool>::try_from(m.get(0)).unwrap(), vec![true, false, false]);
        assert_eq!(Vec::<bool>::try_from(m.get(2)).unwrap(), vec![false, true, true]);
    }
}
