//! Language models end to end, with real processes, on the bundled English text
//! (data/text/python-docs.txt): a text import (byte tokens, windows of context + 1), a small
//! GPT trained data-parallel until its test bits per byte are well below a unigram model's
//! (about 4.8 on this text), `shoal generate` (deterministic for a seed; a non-text model is
//! refused), the PyTorch module of the model, and an appended text slice firing a
//! retraining template whose model beats its parent's loss on the new text (the `[promote]`
//! gate with `metric = "test_loss"` on that text as holdout).

mod common;

use common::*;

/// The bundled text cut in two at a line break near byte `at`: (first part, the rest).
fn split_text(dir: &std::path::Path, at: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let text = std::fs::read(repo().join("data/text/python-docs.txt")).unwrap();
    let cut = at + text[at..].iter().position(|&b| b == b'\n').unwrap() + 1;
    let (a, b) = (dir.join("docs-a.txt"), dir.join("docs-b.txt"));
    std::fs::write(&a, &text[..cut]).unwrap();
    std::fs::write(&b, &text[cut..]).unwrap();
    (a, b)
}

fn gpt_spec(name: &str, dataset: &str, train: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[model]
kind = "gpt"
blocks = 2
heads = 4
d_model = 64
context = 64
[dataset]
name = "{dataset}"
{train}
[training]
epochs = 1
batch_size = 32
seed = 7
clip_norm = 1.0
[training.optimizer]
kind = "adamw"
lr = 0.003
weight_decay = 0.01
[training.schedule]
kind = "cosine"
warmup_steps = 30
[cluster]
workers = 2
{extra}"#
    )
}

fn metric(j: &serde_json::Value, key: &str) -> f64 {
    j[key].as_f64().unwrap_or_else(|| panic!("no {key}: {j}"))
}

#[test]
fn a_gpt_learns_the_bundled_text_generates_and_retrains_on_an_appended_slice() {
    let c = UpCluster::start(2);
    let (a, b) = split_text(c.tmp.path(), 2_400_000);
    let d = json(c.cmd(&["data", "import", "docs", "--format", "text", "--context", "64", "--json"]).arg(&a));
    let windows = d["records"].as_u64().unwrap();
    assert_eq!((d["feature_shape"].clone(), d["classes"].as_u64(), d["context"].as_u64(), d["stride"].as_u64()), (serde_json::json!([65]), Some(256), Some(64), Some(64)), "{d}");
    assert_eq!(windows, (std::fs::metadata(&a).unwrap().len() - 65) / 64 + 1, "windows every 64 tokens: {d}");
    // The slice's statistics: the tokens its windows cover, and their byte histogram.
    assert_eq!(d["slices"][0]["stats"]["tokens"].as_u64(), Some((windows - 1) * 64 + 65), "{d}");
    assert_eq!(d["slices"][0]["stats"]["bytes"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum::<u64>(), (windows - 1) * 64 + 65);
    // The later text as a dataset of its own: the gate's holdout below.
    ok(c.cmd(&["data", "import", "docs-new", "--format", "text", "--context", "64"]).arg(&b));
    // Wrong inputs name what is wrong.
    let e = fails(c.cmd(&["data", "import", "docs2", "--format", "text"]).arg(&a));
    assert!(e.contains("--context"), "{e}");
    let e = fails(c.cmd(&["data", "append", "docs", "--format", "text", "--context", "32"]).arg(&b));
    assert!(e.contains("--context 64"), "{e}");

    // 1,000 steps on 32,000 windows: far below a unigram model's 4.8 bits per byte.
    let test = format!("train = [0, 32000]\ntest = [{}, {windows}]", windows - 1500);
    let job = c.submit_follow(&c.write_spec("gpt.toml", &gpt_spec("docs-gpt", "docs", &test, "[register]\nname = \"docs-gpt\"\n")));
    assert_eq!(job["state"], "succeeded", "{job}");
    let (bpb, loss) = (metric(&job, "test_bpb"), metric(&job, "test_loss"));
    assert!(bpb < 3.0, "test_bpb {bpb} is not below 3.0: {job}");
    assert!((bpb - loss / std::f64::consts::LN_2).abs() < 1e-9, "bits per byte are the loss in bits: {bpb} against {loss}");
    assert!(metric(&job, "test_accuracy") > 0.3, "next-byte accuracy: {job}");
    assert_eq!(job["results"][0]["param_blake3"], job["results"][1]["param_blake3"], "the ranks end with the same bits: {job}");
    let id = job["id"].to_string();
    let plain = ok(&mut c.cmd(&["job", "status", &id]));
    assert!(plain.contains(&format!("  test_bpb: {bpb:.4}\n")), "{plain}");

    // Generation: the same seed gives the same text; the model learned English-like bytes.
    let generate = |seed: &str| ok(&mut c.cmd(&["generate", &format!("job:{id}"), "--prompt", "The ", "--tokens", "80", "--seed", seed]));
    let (one, again, other) = (generate("5"), generate("5"), generate("6"));
    assert_eq!(one, again, "a seed gives the same text");
    assert_ne!(one, other, "another seed, another text");
    assert!(one.starts_with("The ") && one.len() > 60, "{one}");
    let letters = one.bytes().filter(|b| b.is_ascii_alphabetic() || *b == b' ').count();
    assert!(letters * 10 >= one.len() * 7, "mostly letters and spaces: {one:?}");
    let greedy = json(&mut c.cmd(&["generate", "docs-gpt@1", "--prompt", "The ", "--tokens", "20", "--temperature", "0", "--json"]));
    assert_eq!(greedy["text"].as_str().map(str::len), Some(20), "{greedy}");

    // A model of features and labels cannot generate text: refused, saying why.
    let [x, y] = write_tiny_idx(c.tmp.path());
    ok(c.cmd(&["data", "import", "tiny"]).arg(&x).arg(&y));
    let tiny = "name = \"tiny\"\n[model]\nkind = \"mlp\"\nhidden = [8]\n[dataset]\nname = \"tiny\"\n[training]\nepochs = 1\nbatch_size = 64\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = 1\n";
    let tiny = c.submit_follow(&c.write_spec("tiny.toml", tiny));
    let e = fails(&mut c.cmd(&["generate", &format!("job:{}", tiny["id"]), "--prompt", "x"]));
    assert!(e.contains("not a language model") && e.contains("--format text"), "{e}");
    // A gpt on a dataset of features is refused at submission.
    let e = fails(c.cmd(&["job", "submit"]).arg(c.write_spec("bad.toml", &gpt_spec("bad", "tiny", "", ""))));
    assert!(e.contains("text dataset"), "{e}");

    // The PyTorch module: an embedding, the blocks, the head over the bytes.
    let code = ok(&mut c.cmd(&["model", "torch", "docs-gpt@1"]));
    for want in ["nn.Embedding(256, 64),  # 0: embedding [64] -> [64, 64]", "PositionEmbedding(64, 64)", "Block(64, 4, 256, 0.0),  # 2: transformer_block", "nn.Linear(64, 256, bias=False)", "class Block(nn.Module):", "is_causal=True"] {
        assert!(code.contains(want), "no {want:?} in:\n{code}");
    }

    // Retraining on appended text: the template trains on the new windows (plus a replay of
    // old ones) from the production model, and the gate scores both on the new text.
    ok(&mut c.cmd(&["model", "alias", "docs-gpt", "1", "production"]));
    let template = gpt_spec(
        "docs-retrain",
        "docs",
        "slices = \"new\"\nreplay = 0.1",
        "[init]\nmodel = \"docs-gpt@production\"\n[register]\nname = \"docs-gpt\"\n[promote]\nalias = \"production\"\nmetric = \"test_loss\"\nholdout = \"docs-new\"\n[trigger]\non_append = \"docs\"\n",
    );
    ok(c.cmd(&["job", "schedule"]).arg(c.write_spec("template.toml", &template)));
    let appended = json(c.cmd(&["data", "append", "docs", "--json"]).arg(&b));
    assert_eq!(appended["context"].as_u64(), Some(64), "an append keeps the dataset's windows: {appended}");
    let fired = wait_for("the retraining job", std::time::Duration::from_secs(30), || {
        let jobs = json(&mut c.cmd(&["job", "list", "--json"]));
        jobs.as_array().unwrap().iter().find(|j| j["name"] == "docs-retrain").cloned()
    });
    let retrained = c.wait_end(&fired["id"].to_string());
    assert_eq!(retrained["state"], "succeeded", "{retrained}");
    let v2 = json(&mut c.cmd(&["model", "show", "docs-gpt@2", "--json"]));
    let (candidate, parent) = (metric(&v2, "holdout_score"), metric(&v2, "holder_score"));
    assert!(candidate < parent, "the retrained model's loss on the new text {candidate} is not below its parent's {parent}: {v2}");
    assert_eq!((v2["parent"].as_str(), v2["metric"].as_str()), (Some("docs-gpt@1"), Some("test_loss")), "{v2}");
    assert!(retrained["promotion"].as_str().unwrap_or_default().starts_with("promoted"), "{retrained}");

    // Batch scoring: each window's mean loss per token; over the new text, the parent's loss
    // as the gate measured it.
    let score = "name = \"score-docs\"\nkind = \"batch\"\n[input]\ndataset = \"docs-new\"\n[operator]\nkind = \"score\"\nmodel = \"docs-gpt@1\"\n[output]\ndataset = \"docs-scores\"\n[cluster]\nworkers = 2\n";
    let scored = c.submit_follow(&c.write_spec("score.toml", score));
    assert_eq!(scored["state"], "succeeded", "{scored}");
    let (loss, bpb) = (metric(&scored, "test_loss"), metric(&scored, "test_bpb"));
    assert!((loss - parent).abs() <= 1e-6 * parent, "scoring's loss {loss} is not the gate's {parent}");
    assert!((bpb - loss / std::f64::consts::LN_2).abs() < 1e-9, "{scored}");
    let new = json(&mut c.cmd(&["data", "show", "docs-new", "--json"]));
    let out = json(&mut c.cmd(&["data", "show", "docs-scores", "--json"]));
    assert_eq!((out["records"].clone(), out["feature_shape"].clone()), (new["records"].clone(), serde_json::json!([1])), "{out}");
}

/// Slows every step a little, so that a test can act mid-epoch.
const SLOW: (&str, &str) = ("SHOAL_FAILPOINTS", "step-delay-ms=25");

/// A small GPT with 8 lanes: 100 steps of 16 windows of 32 tokens, a checkpoint every 10.
fn lanes_spec(workers: &str) -> String {
    let s = gpt_spec("gpt-lanes", "small", "train = [0, 1600]\ntest = [1600, 1800]", "[checkpoint]\nevery_steps = 10\n");
    s.replace("blocks = 2\nheads = 4\nd_model = 64\ncontext = 64", "blocks = 2\nheads = 2\nd_model = 32\ncontext = 32")
        .replace("batch_size = 32", "batch_size = 16\nlanes = 8")
        .replace("warmup_steps = 30", "warmup_steps = 10")
        .replace("workers = 2", workers)
}

fn params_hash(job: &serde_json::Value) -> String {
    assert_eq!(job["state"], "succeeded", "{job}");
    let r = job["results"].as_array().unwrap();
    assert!(r.iter().all(|x| x["param_blake3"] == r[0]["param_blake3"]), "{job}");
    r[0]["param_blake3"].as_str().unwrap().to_string()
}

fn submit(c: &UpCluster, file: &str, spec: &str) -> String {
    json(c.cmd(&["job", "submit", "--json"]).arg(c.write_spec(file, spec)))["id"].to_string()
}

#[test]
fn a_gpt_resumes_bitwise_and_with_lanes_ends_with_the_same_bits_on_any_pool() {
    let c = UpCluster::start_env(&["--workers", "3"], &[SLOW]);
    let (a, _) = split_text(c.tmp.path(), 60_000);
    ok(c.cmd(&["data", "import", "small", "--format", "text", "--context", "32"]).arg(&a));

    // Lanes: the same bits on three workers and on two (attention's sums included).
    let three = c.wait_end(&submit(&c, "three.toml", &lanes_spec("workers = 3")));
    let two = c.wait_end(&submit(&c, "two.toml", &lanes_spec("workers = 2")));
    let want = params_hash(&three);
    assert_eq!(params_hash(&two), want, "lanes make a GPT's result independent of the world size");
    assert!(three["test_bpb"].as_f64().is_some(), "{three}");

    // Three workers, one SIGKILLed mid-run: the others go on and end with the same bits.
    let id = submit(&c, "lost.toml", &lanes_spec("workers = 3\nmin_workers = 2"));
    let job = c.wait_job(&id, "training on three workers", std::time::Duration::from_secs(60), |j| j["state"] == "running" && j["step"].as_u64().unwrap_or(0) > 40);
    let workers = job["workers"].as_array().unwrap().clone();
    let list = json(&mut c.cmd(&["worker", "list", "--json"]));
    let victim = list.as_array().unwrap().iter().find(|w| w["id"] == workers[1]).unwrap()["pid"].as_i64().unwrap();
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let lost = c.wait_end(&id);
    assert_eq!(params_hash(&lost), want, "a GPT run that lost a worker ends where the static runs do: {lost}");
    assert!(lost["generation"].as_u64().unwrap() >= 2, "{lost}");

    // Exact resume: the cluster stopped mid-epoch and started again ends with the bits of an
    // uninterrupted run (no lanes: the same pool both times).
    let plain = lanes_spec("workers = 2").replace("\nlanes = 8", "");
    let reference = c.wait_end(&submit(&c, "reference.toml", &plain));
    let id = submit(&c, "resumed.toml", &plain);
    c.wait_job(&id, "a committed checkpoint", std::time::Duration::from_secs(60), |j| j["checkpoint"].as_u64().is_some_and(|s| s >= 30));
    ok(&mut c.cmd(&["down"]));
    ok(shoal().args(["up", "--workers", "3", "--dir"]).arg(c.dir()).env(SLOW.0, SLOW.1));
    let done = c.wait_end(&id);
    assert_eq!(params_hash(&done), params_hash(&reference), "the resumed GPT differs from the uninterrupted one: {done}");
    let from = done["resumed_from"].as_u64().unwrap_or_else(|| panic!("not resumed: {done}"));
    assert!((30..100).contains(&from), "resumed mid-epoch (an epoch is 100 steps) from step {from}: {done}");
    assert_eq!(done["test_loss"], reference["test_loss"], "{done}");
}
