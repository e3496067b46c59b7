//! Files: atomic writes, memory-mapped safetensors, JSON with errors naming the field.

use crate::{CoreError, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The temporary sibling of `path` that a write goes to before the rename.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `path` through `write(tmp)` to a temporary sibling, then renames it over `path`:
/// a crash never leaves a half-written `path`.
pub fn atomic_write<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let tmp = temporary_path(path);
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| CoreError::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn atomic_write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write(path, |tmp| std::fs::write(tmp, bytes).map_err(|e| CoreError::io(tmp, e)))
}

/// Reads and parses a JSON file; errors name the file and the field path.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| field_error(path, e.path(), e.inner()))
}

/// The `[key]` table of the TOML `text` read from `path`, as `T`; `T::default()` when the table
/// is absent. Errors name the file and the field (`train.lr`).
pub fn toml_table<T: serde::de::DeserializeOwned + Default>(text: &str, path: &Path, key: &str) -> Result<T> {
    let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| CoreError::format(path, e.message()))?;
    match doc.remove(key) {
        None => Ok(T::default()),
        Some(value @ toml::Value::Table(_)) => serde_path_to_error::deserialize(value).map_err(|e| {
            CoreError::format(path, format!("field `{key}.{}`: {}", e.path(), e.inner().message().trim()))
        }),
        Some(_) => Err(CoreError::format(path, format!("field `{key}` must be a table"))),
    }
}

/// Checks that the TOML `text` read from `path` has no top-level tables besides `known`.
pub fn toml_known_tables(text: &str, path: &Path, known: &[&str]) -> Result<()> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| CoreError::format(path, e.message()))?;
    match doc.iter().find(|(k, v)| v.is_table() && !known.contains(&k.as_str())) {
        Some((k, _)) => Err(CoreError::format(path, format!("unknown table `[{k}]` (known: {})", known.join(", ")))),
        None => Ok(()),
    }
}

fn field_error(path: &Path, field: &serde_path_to_error::Path, err: &impl std::fmt::Display) -> CoreError {
    let field = field.to_string();
    let msg = err.to_string();
    if field == "." {
        CoreError::format(path, msg)
    } else {
        CoreError::format(path, format!("field `{field}`: {msg}"))
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file (memory-mapped) onto the CPU, by name.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    // SAFETY: the map is read-only and dropped before this function returns; the tensors copy
    // their bytes out of it.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CoreError::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| CoreError::format(path, format!("not a valid safetensors file ({e})")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| CoreError::format(path, format!("tensor `{name}`: unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        out.insert(name, t);
    }
    Ok(out)
}

struct TensorView<'a> {
    tensor: &'a Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl View for TensorView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut data = vec![0u8; self.data_len()];
        self.tensor.copy_data_u8(&mut data, self.tensor.numel());
        Cow::Owned(data)
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// Writes named tensors to a safetensors file atomically, with `{"format": "pt"}` metadata as
/// transformers writes it. Tensors are moved to the CPU and made contiguous first.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous())).collect();
    let mut views = Vec::with_capacity(cpu.len());
    for (name, t) in &cpu {
        let dtype = dtype_of(t.kind())
            .ok_or_else(|| CoreError::Invalid(format!("tensor `{name}`: cannot save kind {:?}", t.kind())))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        views.push((name.as_str(), TensorView { tensor: t, dtype, shape }));
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    atomic_write(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, metadata, tmp).map_err(|e| CoreError::format(tmp, e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let a = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]);
        let b = Tensor::from_slice(&[1i64, 2, 3]);
        write_safetensors(&path, &[("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())]).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert!(back["a"].equal(&a));
        assert!(back["b"].equal(&b));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = read_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("m.safetensors") && err.contains("not a valid safetensors"), "{err}");
    }

    #[test]
    fn json_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct C {
            hidden_size: i64,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"hidden_size": "big"}"#).unwrap();
        let err = read_json::<C>(&path).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn failed_atomic_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.txt");
        atomic_write_bytes(&path, b"old").unwrap();
        let r = atomic_write(&path, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(CoreError::Invalid("boom".into()))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
