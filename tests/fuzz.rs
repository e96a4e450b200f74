//! Property tests over hostile input, on stable Rust: the route file and config loader take
//! arbitrary YAML and bytes, the trace framing and the spool's segment reader arbitrary
//! bytes. None may panic. Each starts from the seed corpus in `tests/fuzz-seeds/` (the
//! shipped files, an extended route file, a framed message) and mutates it, besides
//! generating input from nothing. `GOMS_FUZZ_CASES` sets the cases per property (default
//! 256, enough for CI's brief run).

use std::path::{Path, PathBuf};

use goms::config::{parse_routes, GomsConfig};
use goms::trace::framing;
use goms::trace::testing::Spool;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("GOMS_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

fn seed(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-seeds")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("seed {}: {e}", path.display()))
}

/// A seed changed the way fuzzers change input: bytes flipped, cut, repeated or inserted.
fn mutated(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        any::<usize>().prop_map(Edit::Cut),
        (any::<usize>(), any::<usize>()).prop_map(|(at, len)| Edit::Repeat(at, len % 64)),
        (
            any::<usize>(),
            prop::sample::select(b" \t\n:-[]{}\"'&*!|>%@`#,?\\".to_vec())
        )
            .prop_map(|(at, byte)| Edit::Insert(at, byte)),
    ];
    (
        prop::sample::select(seeds.to_vec()),
        prop::collection::vec(edit, 1..8),
    )
        .prop_map(|(name, edits)| {
            let mut bytes = seed(name);
            for edit in edits {
                edit.apply(&mut bytes);
            }
            bytes
        })
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Cut(usize),
    Repeat(usize, usize),
    Insert(usize, u8),
}

impl Edit {
    fn apply(self, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let len = bytes.len();
        match self {
            Edit::Set(at, byte) => bytes[at % len] = byte,
            Edit::Cut(at) => bytes.truncate(at % len),
            Edit::Repeat(at, count) => {
                let start = at % len;
                let piece = bytes[start..(start + count).min(len)].to_vec();
                bytes.splice(start..start, piece);
            }
            Edit::Insert(at, byte) => bytes.insert(at % len, byte),
        }
    }
}

fn any_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<Vec<u8>>(),
        "[ -~\t\n]{0,200}".prop_map(String::into_bytes),
    ]
}

fn routes_path() -> PathBuf {
    PathBuf::from("services.yml")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn the_route_parser_never_panics(
        text in prop_oneof![mutated(&["services.yml", "services-extended.yml"]), any_text()],
    ) {
        let text = String::from_utf8_lossy(&text);
        if let Err(error) = parse_routes(&routes_path(), &text) {
            prop_assert!(error.to_string().starts_with("services.yml"), "{}", error);
        }
    }

    #[test]
    fn the_config_loader_never_panics(
        text in prop_oneof![mutated(&["goms.yml"]), any_text()],
    ) {
        let text = String::from_utf8_lossy(&text);
        if let Err(error) = GomsConfig::check_file(Path::new("goms.yml"), &text) {
            prop_assert!(error.to_string().starts_with("goms.yml"), "{}", error);
        }
    }

    #[test]
    fn the_framing_never_panics(
        body in prop_oneof![mutated(&["events.ndjson"]), any::<Vec<u8>>(), lz4_of_mutated()],
        encoding in prop::sample::select(vec![None, Some("lz4"), Some("gzip")]),
    ) {
        if let Ok(lines) = framing::decode(encoding, &body) {
            for line in framing::lines(&lines) {
                prop_assert!(line.end <= lines.len());
            }
        }
    }

    #[test]
    fn the_spool_reader_never_panics(
        segment in prop_oneof![mutated(&["events.ndjson"]), any::<Vec<u8>>()],
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("segment-{:016}.jsonl", 0)), &segment).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        if let Ok(Some(read)) = spool.oldest() {
            let lines = segment.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
            prop_assert!(read.events.len() + read.unreadable <= lines.max(1));
        }
    }
}

/// Valid LZ4 bodies of damaged lines, and LZ4 bodies whose size prefix lies.
fn lz4_of_mutated() -> impl Strategy<Value = Vec<u8>> {
    (mutated(&["events.ndjson"]), any::<u32>(), any::<bool>()).prop_map(|(lines, size, lie)| {
        let mut body = lz4_flex::compress_prepend_size(&lines);
        if lie {
            body[..4].copy_from_slice(&size.to_le_bytes());
        }
        body
    })
}
