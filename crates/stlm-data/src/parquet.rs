//! `.parquet` input (the format Hugging Face datasets are stored in): one string column, read
//! row group by row group through the record API, so only one row group is in memory at a time.

use crate::{DataError, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::RowAccessor;
use parquet::schema::types::Type;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

/// Streams the strings of column `field` of the parquet file at `path` to `on_doc`.
pub(crate) fn read_parquet(path: &Path, field: &str, mut on_doc: impl FnMut(String) -> ControlFlow<()>) -> Result<()> {
    let format = |message: String| DataError::Format { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })?;
    let reader = SerializedFileReader::new(file).map_err(|e| format(format!("not a readable parquet file ({e})")))?;
    let schema = reader.metadata().file_metadata().schema();
    let columns: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
    let column = schema
        .get_fields()
        .iter()
        .find(|f| f.name() == field)
        .ok_or_else(|| format(format!("no column `{field}` (columns: {})", columns.join(", "))))?;
    let projection = Type::group_type_builder(schema.name())
        .with_fields(vec![Arc::clone(column)])
        .build()
        .map_err(|e| format(e.to_string()))?;
    let rows = reader.get_row_iter(Some(projection)).map_err(|e| format(e.to_string()))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| format(format!("row {i}: {e}")))?;
        let text = row.get_string(0).map_err(|e| format(format!("row {i}: column `{field}` is not a string ({e})")))?;
        if on_doc(text.clone()).is_break() {
            break;
        }
    }
    Ok(())
}

/// Every row (up to `limit`) of the parquet file at `path` as a JSON object, nested columns
/// (lists, structs) included: the records of a Hugging Face dataset split.
pub fn parquet_records(path: &Path, limit: usize) -> Result<Vec<serde_json::Value>> {
    let format = |message: String| DataError::Format { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })?;
    let reader = SerializedFileReader::new(file).map_err(|e| format(format!("not a readable parquet file ({e})")))?;
    let rows = reader.get_row_iter(None).map_err(|e| format(e.to_string()))?;
    let mut out = Vec::new();
    for (i, row) in rows.take(limit).enumerate() {
        out.push(row.map_err(|e| format(format!("row {i}: {e}")))?.to_json_value());
    }
    Ok(out)
}
