//! Reading (txt, jsonl, parquet, the built-in stories), token shards and their cache, and
//! batches; bad input names the file and line.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use stlm_data::{
    read_documents, tokenize_corpus, OnBadLine, OnInvalidUtf8, ReadOptions, ShardOptions, Source, TokenBatches,
};
use stlm_tokenizers::{BpeOptions, Tokenizer};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn docs_with(path: &Path, opts: &ReadOptions) -> Vec<String> {
    let mut out = Vec::new();
    read_documents(path, opts, |d| {
        out.push(d);
        ControlFlow::Continue(())
    })
    .unwrap();
    out
}

fn docs(path: &Path) -> Vec<String> {
    docs_with(path, &ReadOptions::default())
}

fn read_err(path: &Path, opts: &ReadOptions) -> String {
    read_documents(path, opts, |_| ControlFlow::Continue(())).unwrap_err().to_string()
}

#[test]
fn txt_and_jsonl_documents() {
    let dir = tempfile::tempdir().unwrap();
    let t = write(dir.path(), "a.txt", "One.\nStill one.\n\nTwo<|endoftext|>Three\n\n\n");
    assert_eq!(docs(&t), ["One.\nStill one.", "Two", "Three"]);
    let sep = ReadOptions { separator: Some("===".into()), ..Default::default() };
    let t = write(dir.path(), "b.txt", "Para one.\n\nPara two.\n===\nNext doc.\n");
    assert_eq!(docs_with(&t, &sep), ["Para one.\n\nPara two.", "Next doc."]);
    let j = write(dir.path(), "b.jsonl", "{\"text\": \"hello\"}\n\n{\"text\": \"world\", \"id\": 2}\n");
    assert_eq!(docs(&j), ["hello", "world"]);
    let body = ReadOptions { text_field: "body".into(), ..Default::default() };
    let j = write(dir.path(), "c.jsonl", "{\"body\": \"x\"}\n");
    assert_eq!(docs_with(&j, &body), ["x"]);
    // The consumer can stop early.
    let mut first = Vec::new();
    read_documents(&t, &sep, |d| {
        first.push(d);
        ControlFlow::Break(())
    })
    .unwrap();
    assert_eq!(first.len(), 1);
}

#[test]
fn parquet_documents() {
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.parquet");
    let schema = "message schema { REQUIRED INT32 id; REQUIRED BYTE_ARRAY text (UTF8); }";
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
    let props = WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build();
    let mut writer = SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), schema, Arc::new(props)).unwrap();
    for group in [["a story", "another"], ["third", "fourth, ünïcode"]] {
        let mut rg = writer.next_row_group().unwrap();
        let mut id = rg.next_column().unwrap().unwrap();
        id.typed::<Int32Type>().write_batch(&[1, 2], None, None).unwrap();
        id.close().unwrap();
        let mut text = rg.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = group.iter().map(|s| ByteArray::from(*s)).collect();
        text.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
        text.close().unwrap();
        rg.close().unwrap();
    }
    writer.close().unwrap();
    assert_eq!(docs(&path), ["a story", "another", "third", "fourth, ünïcode"]);
    let e = read_err(&path, &ReadOptions { text_field: "content".into(), ..Default::default() });
    assert!(e.contains("train.parquet") && e.contains("no column `content`") && e.contains("id, text"), "{e}");
    let junk = write(dir.path(), "junk.parquet", "not parquet at all");
    assert!(read_err(&junk, &ReadOptions::default()).contains("junk.parquet"));
}

#[test]
fn bad_input_names_file_and_line_or_is_skipped_by_flag() {
    let dir = tempfile::tempdir().unwrap();
    let stop = ReadOptions::default();
    let j = write(dir.path(), "b.jsonl", "{\"text\": \"ok\"}\n{not json}\n{\"body\": 1}\n{\"text\": \"fine\"}\n");
    let e = read_err(&j, &stop);
    assert!(e.contains("b.jsonl:2") && e.contains("not JSON") && e.contains("bad_lines"), "{e}");
    let skip = ReadOptions { on_bad_line: OnBadLine::Skip, ..Default::default() };
    assert_eq!(docs_with(&j, &skip), ["ok", "fine"]);
    let j = write(dir.path(), "c.jsonl", "{\"body\": \"ok\"}\n");
    let e = read_err(&j, &stop);
    assert!(e.contains("c.jsonl:1") && e.contains("`text`"), "{e}");

    let t = dir.path().join("d.txt");
    std::fs::write(&t, b"fine\n\xff\xfe bad\nend\n").unwrap();
    let e = read_err(&t, &stop);
    assert!(e.contains("d.txt:2") && e.contains("UTF-8"), "{e}");
    let replace = ReadOptions { on_invalid_utf8: OnInvalidUtf8::Replace, ..Default::default() };
    assert_eq!(docs_with(&t, &replace), ["fine\n\u{fffd}\u{fffd} bad\nend"]);
    let skip = ReadOptions { on_invalid_utf8: OnInvalidUtf8::Skip, ..Default::default() };
    assert_eq!(docs_with(&t, &skip), ["fine\nend"]);

    assert!(read_err(&dir.path().join("missing.txt"), &stop).contains("missing.txt"));
    let e = read_err(&write(dir.path(), "x.csv", "a,b\n"), &stop);
    assert!(e.contains("x.csv") && e.contains(".csv"), "{e}");
}

fn tokenizer(files: &[PathBuf]) -> Tokenizer {
    Tokenizer::train_bpe(files, &BpeOptions { vocab_size: 300, show_progress: false, ..Default::default() }).unwrap()
}

fn shard_opts(cache: &Path) -> ShardOptions {
    ShardOptions { read: ReadOptions::default(), val_fraction: 0.1, seed: 5, cache_dir: cache.into(), progress: false }
}

#[test]
fn shards_split_cache_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let stories: String =
        (0..300).map(|i| format!("Story {i}: the cat sat on the mat and saw {} birds.\n\n", i % 7)).collect();
    let f = write(dir.path(), "s.txt", &stories);
    let g = write(dir.path(), "t.jsonl", &"{\"text\": \"A dog ran to the park.\"}\n".repeat(50));
    let tok = tokenizer(std::slice::from_ref(&f));
    let cache = dir.path().join("cache");
    let sources = [Source::File(f.clone()), Source::File(g.clone())];
    let a = tokenize_corpus(&sources, &tok, &shard_opts(&cache)).unwrap();
    assert_eq!(a.documents(), 350);
    assert_eq!(a.shards[0].header.dtype, stlm_data::shards::TokenDtype::U16);
    let val_docs = a.shards[0].header.val.documents;
    assert!(val_docs > 10 && val_docs < 60, "about 10% of 300 documents held out: {val_docs}");

    // The tokens on disk are the documents' ids, each followed by end-of-text.
    let eot = tok.eos_id().unwrap() as i64;
    let mut expected = Vec::new();
    read_documents(&g, &ReadOptions::default(), |d| {
        expected.extend(tok.encode(&d, false).unwrap().into_iter().map(i64::from));
        expected.push(eot);
        ControlFlow::Continue(())
    })
    .unwrap();
    let s1 = &a.shards[1];
    let mut joined = s1.train.to_vec();
    joined.extend(s1.val.to_vec());
    joined.sort();
    expected.sort();
    assert_eq!(joined, expected, "train + val hold every token of every document");

    // Cached: the same files give the same shards without tokenizing (files untouched).
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let files: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 2 * 5, "per source: header, and tokens + document starts for each split");
    let before: Vec<_> = files.iter().map(|p| mtime(p)).collect();
    let b = tokenize_corpus(&sources, &tok, &shard_opts(&cache)).unwrap();
    assert_eq!(a.shards[0].train.to_vec(), b.shards[0].train.to_vec());
    assert_eq!(before, files.iter().map(|p| mtime(p)).collect::<Vec<_>>());
    // A different split seed or an edited file is a different key.
    let other = tokenize_corpus(&sources[..1], &tok, &ShardOptions { seed: 6, ..shard_opts(&cache) }).unwrap();
    assert_ne!(other.shards[0].header.key, a.shards[0].header.key);
    std::fs::write(&g, "{\"text\": \"Changed.\"}\n".repeat(50)).unwrap();
    let c = tokenize_corpus(&sources, &tok, &shard_opts(&cache)).unwrap();
    assert_ne!(c.shards[1].header.key, a.shards[1].header.key);
    assert_eq!(c.shards[0].header.key, a.shards[0].header.key);

    let batches = TokenBatches::new(a, 4, 16, 9, tch::Device::Cpu).unwrap();
    let (x, y) = batches.train_batch(3, 1);
    assert_eq!(x.size(), [4, 16]);
    assert!(x.narrow(1, 1, 15).equal(&y.narrow(1, 0, 15)), "targets are inputs shifted by one");
    assert!(x.equal(&batches.train_batch(3, 1).0));
    assert!(!x.equal(&batches.train_batch(4, 1).0));
    assert!(batches.val_batch(2).0.equal(&batches.val_batch(2).0));
    let e = TokenBatches::new(b, 4, 100_000, 9, tch::Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("seq_len"), "{e}");

    let empty = write(dir.path(), "e.txt", "\n\n");
    let e = tokenize_corpus(&[Source::File(empty)], &tok, &shard_opts(&cache)).err().unwrap().to_string();
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn builtin_stories_are_a_source() {
    let dir = tempfile::tempdir().unwrap();
    let source = Source::Builtin { stories: 200, seed: 1 };
    let texts = stlm_data::sample_documents(std::slice::from_ref(&source), &ReadOptions::default(), 10_000).unwrap();
    assert!(texts.len() < 200 && texts.iter().map(String::len).sum::<usize>() >= 10_000);
    let sample = dir.path().join("sample.txt");
    std::fs::write(&sample, texts.join("\n\n")).unwrap();
    let tok = tokenizer(&[sample]);
    let corpus = tokenize_corpus(&[source], &tok, &shard_opts(dir.path())).unwrap();
    assert_eq!(corpus.documents(), 200);
    assert!(corpus.bytes() > 200 * 500);
}
