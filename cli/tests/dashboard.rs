//! The dashboard in a real browser: Debian's headless `chromium` loads every page from a
//! coordinator of a 3-replica cluster that ran jobs, imported and appended a dataset and
//! registered a model; the DOM holds the expected rows and curve points, and a screenshot of
//! each page is kept under target/test-artifacts/dashboard/ (with `job compare --plot`'s PNG
//! of the same runs). With the leader SIGKILLed, a
//! follower still serves a job's page with its curves. `.ci/run` installs `chromium`; without
//! it this test fails and says so.

mod common;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no chromium on the PATH: install Debian's `chromium` package (`apt-get install chromium`; .ci/run does)"))
}

/// The page's DOM after load, as headless Chromium serializes it.
fn dom(url: &str) -> String {
    let out = Command::new(chromium()).args(["--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors", "--virtual-time-budget=5000", "--dump-dom", url]).output().unwrap();
    assert!(out.status.success(), "chromium --dump-dom {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A screenshot of the page, kept as a test artifact.
fn screenshot(url: &str, name: &str) -> PathBuf {
    let dir = repo().join("target/test-artifacts/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&file);
    let out = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors", "--hide-scrollbars", "--window-size=1280,1800"])
        .arg(format!("--screenshot={}", file.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(out.status.success() && file.metadata().is_ok_and(|m| m.len() > 1000), "chromium --screenshot {url}: {}", String::from_utf8_lossy(&out.stderr));
    file
}

/// The rows of table `id` in `dom`: each row's cells, tags stripped.
fn rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom.find(&format!("<table id=\"{id}\"")).unwrap_or_else(|| panic!("no table {id} in {dom}"));
    let table = &dom[start..start + dom[start..].find("</table>").unwrap()];
    table
        .split("<tr>")
        .skip(2) // before the first row, and the header
        .map(|r| r.split("<td>").skip(1).map(|c| strip(c.split("</td>").next().unwrap_or(""))).collect())
        .collect()
}

fn strip(html: &str) -> String {
    let mut out = String::new();
    let mut tag = false;
    for c in html.chars() {
        match c {
            '<' => tag = true,
            '>' => tag = false,
            c if !tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// Each curve of `dom`: (label, points drawn), checked against its polyline's points.
fn curves(dom: &str) -> Vec<(String, usize)> {
    dom.split("<polyline").skip(1)
        .map(|p| {
            let attr = |name: &str| p.split(&format!(" {name}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or_default().to_string();
            let count: usize = attr("data-points").parse().unwrap();
            assert_eq!(attr("points").split_whitespace().count(), count, "a curve's points and its count");
            (attr("data-label"), count)
        })
        .collect()
}

fn http_addr(c: &UpCluster, n: u32) -> String {
    std::fs::read_to_string(c.dir().join("coordinators").join(n.to_string()).join("http.addr")).unwrap().trim().to_string()
}

/// `url` with a viewer's token (a browser's first visit: the server sets a cookie and
/// redirects to the page without it; each Chromium run here starts without cookies).
fn with_token(url: &str, token: &str) -> String {
    format!("{url}{}token={token}", if url.contains('?') { '&' } else { '?' })
}

#[test]
fn every_dashboard_page_loads_in_chromium_with_its_rows_and_curves_and_survives_a_leader_kill() {
    let c = UpCluster::start_with(&["--coordinators", "3", "--workers", "2"]);
    let [x, y] = write_tiny_idx(c.tmp.path());
    ok(c.cmd(&["data", "import", "tiny", "--records", "0:384"]).arg(&x).arg(&y));
    ok(c.cmd(&["data", "append", "tiny", "--records", "384:512"]).arg(&x).arg(&y));
    let spec = |lr: &str, tag: &str| {
        format!(
            "name = \"tiny-{tag}\"\ngroup = \"dash\"\n[model]\nkind = \"mlp\"\nhidden = [8]\n[dataset]\nname = \"tiny\"\ntrain = [0, 448]\ntest = [448, 512]\n\
             [training]\nepochs = 4\nbatch_size = 32\nseed = 2\n[training.optimizer]\nkind = \"sgd\"\nlr = {lr}\n[cluster]\nworkers = 2\n[register]\nname = \"tiny-m\"\n"
        )
    };
    let a = c.submit_follow(&c.write_spec("a.toml", &spec("0.1", "a")));
    let b = c.submit_follow(&c.write_spec("b.toml", &spec("0.3", "b")));
    assert_eq!((a["state"].as_str(), b["state"].as_str()), (Some("succeeded"), Some("succeeded")), "{a}\n{b}");
    let (ja, jb) = (a["id"].as_u64().unwrap(), b["id"].as_u64().unwrap());
    let steps = a["step"].as_u64().unwrap() as usize;
    assert_eq!(steps, 4 * 14, "{a}");

    let base = format!("https://{}", http_addr(&c, 1));
    // The dashboard wants a token: a viewer's, given once in the URL. Without one, 401.
    let viewer = json(&mut c.cmd(&["token", "create", "--role", "viewer", "--name", "browser", "--json"]))["token"].as_str().unwrap().to_string();
    let ca = c.dir().join("ca/ca.crt");
    assert_eq!(https_get(&http_addr(&c, 1), "/jobs", &ca, None).unwrap().0, 401);
    let (status, page) = https_get(&http_addr(&c, 1), "/jobs", &ca, Some(&viewer)).unwrap();
    assert!(status == 200 && page.contains("<table id=\"jobs\""), "{status}: {page}");
    let pages = [
        ("cluster", "/".to_string()),
        ("jobs", "/jobs".to_string()),
        ("job", format!("/jobs/{ja}")),
        ("compare", format!("/compare?jobs={ja},{jb}")),
        ("datasets", "/datasets".to_string()),
        ("dataset", "/datasets/tiny".to_string()),
        ("models", "/models".to_string()),
        ("model", "/models/tiny-m".to_string()),
    ];
    for (name, path) in &pages {
        let d = dom(&with_token(&format!("{base}{path}"), &viewer));
        assert!(!d.contains("id=\"error\""), "{name}: {d}");
        match *name {
            "cluster" => {
                let coordinators = rows(&d, "coordinators");
                assert_eq!(coordinators.len(), 3, "{coordinators:?}");
                assert_eq!(coordinators.iter().filter(|r| r[2] == "leader").count(), 1, "{coordinators:?}");
                assert!(coordinators.iter().all(|r| r[3].parse::<u64>().is_ok_and(|t| t >= 1) && r[4].parse::<u64>().is_ok_and(|i| i > 0)), "terms and commit indexes: {coordinators:?}");
                let workers = rows(&d, "workers");
                assert_eq!(workers.len(), 2, "{workers:?}");
                // Idle, or still busy for a moment after the job's end.
                assert!(workers.iter().all(|w| w[1] == "idle" || w[1] == "busy"), "{workers:?}");
            }
            "jobs" => {
                let ids: Vec<String> = rows(&d, "jobs").iter().map(|r| r[0].clone()).collect();
                assert_eq!(ids, [jb.to_string(), ja.to_string()], "newest first");
            }
            "job" => {
                let drawn = curves(&d);
                assert!(drawn.contains(&("loss".to_string(), steps)), "every step's loss drawn: {drawn:?}");
                assert!(drawn.iter().any(|(l, n)| l == "test_accuracy" && *n == 4), "one point per evaluation: {drawn:?}");
                assert!(drawn.iter().any(|(l, n)| l == "samples_per_s" && *n == steps), "{drawn:?}");
                let phases = rows(&d, "phases");
                assert_eq!(phases.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["0", "1"], "a row per rank: {phases:?}");
                assert_eq!(rows(&d, "membership")[0][1], "start");
                assert!(!rows(&d, "checkpoints").is_empty());
                assert!(rows(&d, "summary").iter().any(|r| r[0] == "state" && r[1] == "succeeded"));
                // The log tail: both ranks' lines of the job, from the store.
                let log = rows(&d, "log");
                assert!(log.iter().any(|r| r[0].ends_with("g1-r0") && r[1].contains("joined the collective")), "{log:?}");
                assert!(log.iter().any(|r| r[0].ends_with("g1-r1")), "{log:?}");
            }
            "compare" => {
                let drawn = curves(&d);
                assert!(drawn.contains(&(format!("job {ja} loss"), steps)) && drawn.contains(&(format!("job {jb} loss"), steps)), "both losses overlaid: {drawn:?}");
                let differing = rows(&d, "differing");
                assert!(differing.iter().any(|r| r[0] == "training.optimizer.lr" && r[1] == "0.1000" && r[2] == "0.3000"), "{differing:?}");
            }
            "datasets" => assert_eq!(rows(&d, "datasets")[0][0], "tiny"),
            "dataset" => {
                assert_eq!(rows(&d, "slices").len(), 2, "the import and the append");
                assert_eq!(rows(&d, "versions").len(), 2);
            }
            "models" => assert_eq!(rows(&d, "models")[0][0], "tiny-m"),
            "model" => {
                let versions = rows(&d, "versions");
                assert_eq!(versions.iter().map(|r| r[1].clone()).collect::<Vec<_>>(), [jb.to_string(), ja.to_string()], "{versions:?}");
            }
            _ => unreachable!(),
        }
        screenshot(&with_token(&format!("{base}{path}"), &viewer), name);
    }

    // The same curves overlaid in a PNG by the CLI (kept beside the screenshots).
    let png = repo().join("target/test-artifacts/dashboard/compare-plot.png");
    let _ = std::fs::remove_file(&png);
    ok(&mut c.cmd(&["job", "compare", &ja.to_string(), &jb.to_string(), "--plot", png.to_str().unwrap()]));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR" && bytes.len() > 5000, "{} bytes", bytes.len());
    let missing = c.tmp.path().join("no/such/folder/x.png");
    let e = fails(&mut c.cmd(&["job", "compare", &ja.to_string(), &jb.to_string(), "--plot", missing.to_str().unwrap()]));
    assert!(e.contains("no/such/folder"), "{e}");

    // The leader SIGKILLed: a follower serves the job's page, curves and all.
    let status = json(&mut c.cmd(&["status", "--json"]));
    let leader = status["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader").unwrap().clone();
    let follower = status["coordinators"].as_array().unwrap().iter().find(|r| r["role"] != "leader").unwrap()["id"].as_u64().unwrap();
    assert_eq!(unsafe { libc::kill(leader["pid"].as_i64().unwrap() as i32, libc::SIGKILL) }, 0);
    let url = with_token(&format!("https://{}/jobs/{ja}", http_addr(&c, follower as u32)), &viewer);
    let d = wait_for("a follower's job page", Duration::from_secs(30), || Some(dom(&url)).filter(|d| !d.contains("id=\"error\"")));
    assert!(curves(&d).contains(&("loss".to_string(), steps)), "{d}");
    screenshot(&url, "job-after-leader-kill");
    let cluster = dom(&with_token(&format!("https://{}/", http_addr(&c, follower as u32)), &viewer));
    assert!(rows(&cluster, "coordinators").iter().any(|r| r[2] == "unreachable"), "the killed one shows as unreachable");
}
