//! The fuzz harnesses as property tests, on a small budget (`SHOAL_FUZZ_CASES` cases per
//! target, 1000 by default): arbitrary bytes, and valid inputs with a few bytes changed,
//! inserted or cut (which reach past the first checks). `cargo fuzz` runs the same harnesses
//! for as long as one likes.

use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("SHOAL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

/// `seed` with edits: (position, byte, kind) each changes, inserts or cuts at position.
fn mutate(seed: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for &(at, byte, kind) in edits {
        let at = if v.is_empty() { 0 } else { at % (v.len() + 1) };
        match kind % 4 {
            0 if at < v.len() => v[at] = byte,
            1 => v.insert(at, byte),
            2 => v.truncate(at),
            _ if at < v.len() => v[at] ^= 1 << (byte % 8),
            _ => v.push(byte),
        }
    }
    v
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..6)
}

fn idx_seed() -> Vec<u8> {
    shoal_core::idx::encode_idx_u8(&[3, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
}

fn npy_seed() -> Vec<u8> {
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut x = b"\x93NUMPY\x01\x00".to_vec();
    x.extend_from_slice(&(h.len() as u16).to_le_bytes());
    x.extend_from_slice(h.as_bytes());
    for f in [1.0f32, 2.0, 3.0, 4.0] {
        x.extend_from_slice(&f.to_le_bytes());
    }
    let mut y = x.clone();
    // Labels: i8 of 2 records, as the same header with another dtype and shape.
    let yh = "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }";
    let mut yh = yh.to_string();
    while !(10 + yh.len() + 1).is_multiple_of(64) {
        yh.push(' ');
    }
    yh.push('\n');
    y.truncate(8);
    y.extend_from_slice(&(yh.len() as u16).to_le_bytes());
    y.extend_from_slice(yh.as_bytes());
    y.extend_from_slice(&0i64.to_le_bytes());
    y.extend_from_slice(&1i64.to_le_bytes());
    let mut out = (x.len() as u16).to_le_bytes().to_vec();
    out.extend(x);
    out.extend(y);
    out
}

fn safetensors_seed() -> Vec<u8> {
    let x: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|f| f.to_le_bytes()).collect();
    let y: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        ("x", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &x).unwrap()),
        ("y", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2], &y).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

const JOB: &str = "name = \"t\"\n[model]\nkind = \"mlp\"\nhidden = [8]\n[dataset]\nname = \"d\"\ntrain = [0, 80]\ntest = [80, 100]\n[training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = 2\n";
const BATCH: &str = "name = \"i\"\nkind = \"batch\"\n[input]\ndataset = \"d\"\n[operator]\nkind = \"import\"\nfiles = [\"incoming/d/a.csv\"]\nformat = \"csv\"\nlabel = \"y\"\n[output]\ndataset = \"d\"\n";

/// Commands of every kind a client or a worker causes, encoded as a log carries them.
fn command_seed() -> Vec<u8> {
    use shoal_proto::{command::Kind, *};
    let kinds = vec![
        Kind::SubmitJob(JOB.into()),
        Kind::SubmitJob(BATCH.into()),
        Kind::RegisterWorker(RegisterWorkerRequest { address: "127.0.0.1:1".into(), ..Default::default() }),
        Kind::JobAssigned(JobAssigned { job_id: 1, generation: 1, ..Default::default() }),
        Kind::UpdateProgress(UpdateProgress { job_id: 1, generation: 1, ..Default::default() }),
        Kind::RankOutcome(OutcomeReport { job_id: 1, generation: 1, worker_id: "w-1".into(), ok: true, ..Default::default() }),
        Kind::CancelJob(1),
        Kind::ResumeJob(ResumeJobRequest { id: 1, workers: 2, ..Default::default() }),
        Kind::RegisterModel(RegisterModelRequest { name: "m".into(), job_id: 1, ..Default::default() }),
        Kind::SetSettings(SettingsRequest { keep_jobs: Some(3), keep_days: Some(1), ..Default::default() }),
        Kind::PruneJobs(true),
    ];
    let mut out = Vec::new();
    for k in kinds {
        let b = Command { kind: Some(k), request_id: "r".into(), proposed_unix_ms: 5, ..Default::default() }.encode_to_vec();
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend(b);
    }
    out
}

fn run(target: &str, data: &[u8]) {
    let f = shoal_fuzz::TARGETS.iter().find(|(n, _)| *n == target).expect("a target").1;
    f(data);
}

macro_rules! fuzzed {
    ($($name:ident: $seed:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]
            $(
                #[test]
                fn $name(bytes in prop::collection::vec(any::<u8>(), 0..1024), e in edits(), pick in any::<bool>()) {
                    let seed: Vec<u8> = $seed;
                    let data = if pick { mutate(&seed, &e) } else { bytes };
                    run(stringify!($name), &data);
                }
            )*
        }
    };
}

fuzzed! {
    listener_messages: command_seed();
    command_apply: command_seed();
    raft_step: vec![1; 64];
    idx: idx_seed();
    csv: b"a,b,label\n1,2,0\n3,4,1\n".to_vec();
    npy: npy_seed();
    safetensors: safetensors_seed();
    shard: { let mut s = vec![2, 0, 1]; s.extend(safetensors_seed()); s };
    text: { let mut s = vec![4, 2]; s.extend_from_slice(b"hello world, hello shoal"); s };
    specs: JOB.as_bytes().to_vec();
    ring_hello: shoal_worker::collective::tcp::encode_hello(1, 2, 0, 2).to_vec();
    token: b"shoal_0123456789abcdef_0123456789abcdef0123456789abcdef0123456789abcdef".to_vec();
    store_key: b"datasets/d/import-1/shard-00000.safetensors".to_vec();
    sealed_records: { let mut s = vec![3, 7, 0]; s.extend((0..600u32).map(|i| (i % 251) as u8)); s };
}

#[test]
fn every_target_has_a_property_test_and_a_libfuzzer_target() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tests = include_str!("properties.rs");
    for (name, _) in shoal_fuzz::TARGETS {
        assert!(tests.contains(&format!("    {name}: ")), "no property test for {name}");
        assert!(here.join(format!("fuzz_targets/{name}.rs")).is_file(), "no fuzz_targets/{name}.rs");
    }
}

/// The seeds are valid inputs: the mutations start from inside the decoders, not at their
/// first check.
#[test]
fn the_seeds_decode() {
    assert!(shoal_core::idx::parse_idx(&idx_seed()).is_ok());
    let n = npy_seed();
    let (x, y) = n[2..].split_at(u16::from_le_bytes([n[0], n[1]]) as usize);
    shoal_core::dataset::records_from_npy(&[("x.npy".into(), x), ("y.npy".into(), y)]).unwrap();
    shoal_core::dataset::records_from_safetensors("s", &safetensors_seed()).unwrap();
    shoal_core::JobSpec::parse(JOB).unwrap();
    shoal_core::batch::BatchSpec::parse(BATCH).unwrap();
    assert!(shoal_worker::collective::tcp::decode_hello(&shoal_worker::collective::tcp::encode_hello(1, 2, 0, 2)).is_ok());
}
