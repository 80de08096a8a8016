//! `shoal checkpoint` and `shoal model`: a job's checkpoints (list, export) and the model
//! registry (register, aliases, show, list, export, generate, the PyTorch code).

use anyhow::{bail, Context, Result};
use serde_json::json;
use shoal_proto::*;

use crate::args::*;
use crate::{ops, print_json, torch};

pub(crate) async fn checkpoint(cmd: CheckpointCmd) -> Result<()> {
    match cmd {
        CheckpointCmd::List { job, conn, json } => {
            let j = ops::get_job(&conn.client()?, job).await?;
            if json {
                print_json(&serde_json::Value::Array(j.checkpoints.iter().map(ops::checkpoint_json).collect()));
                return Ok(());
            }
            println!("STEP      EPOCH  WORLD  BYTES        COMMITTED                 FILES");
            for m in &j.checkpoints {
                let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
                let files: Vec<String> = m.files.iter().map(|f| format!("{} {}", f.name, &f.blake3[..16.min(f.blake3.len())])).collect();
                println!("{:<9} {:>5}  {:>5}  {:>11}  {:<24}  {}", m.step, m.epoch, m.world_size, bytes, ops::utc(m.committed_unix_ms), files.join(", "));
            }
        }
        CheckpointCmd::Show { job, step, conn, json } => {
            let j = ops::get_job(&conn.client()?, job).await?;
            let m = ops::pick_checkpoint(&j, step)?;
            let v = ops::checkpoint_json(m);
            if json {
                print_json(&v);
            } else {
                println!("checkpoint of job {} at step {} ({})", m.job_id, m.step, m.dir);
                for k in ["epoch", "position", "world_size", "generation", "seed", "model_kind", "optimizer_kind", "optimizer_step", "num_params", "test_accuracy", "bytes", "committed"] {
                    println!("  {k}: {}", ops::human(k, &v[k]));
                }
                for f in &m.files {
                    println!("  {}  {} bytes  rank {}  blake3 {}", f.name, f.bytes, f.rank, f.blake3);
                }
            }
        }
        CheckpointCmd::Export { job, out, step, conn, json } => {
            let client = conn.client()?;
            let j = ops::get_job(&client, job).await?;
            let m = ops::pick_checkpoint(&j, step)?;
            let (_copy, store) = ops::fetch_checkpoint(&client, m).await?;
            let tensors = shoal_worker::checkpoint::export_pytorch(&store, m, &out).with_context(|| format!("exporting checkpoint step {} of job {job}", m.step))?;
            if json {
                print_json(&json!({"job": job, "step": m.step, "model_kind": m.model_kind, "path": out,
                    "tensors": tensors.iter().map(|(n, s)| json!({"name": n, "shape": s, "dtype": "F32"})).collect::<Vec<_>>()}));
            } else {
                println!("exported {} model of job {job} at step {} to {} ({} tensors)", m.model_kind, m.step, out.display(), tensors.len());
            }
        }
    }
    Ok(())
}

pub(crate) async fn model(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Register { name, job, conn, json } => {
            let client = conn.client()?;
            let req = shoal_proto::RegisterModelRequest { name, job_id: job, request_id: shoal_coordinator::client::new_request_id() };
            let m = client.call(|mut c| { let req = req.clone(); async move { c.register_model(req).await } }).await?;
            // Newest first: the version just registered.
            let v = m.versions.first().cloned().unwrap_or_default();
            if json {
                print_json(&ops::model_version_json(&m, &v));
            } else {
                println!("registered {}@{} from job {job}", m.name, v.version);
            }
        }
        ModelCmd::Alias { name, version, alias, expect, conn, json } => {
            let client = conn.client()?;
            let req = shoal_proto::ModelAliasRequest { name, alias: alias.clone(), version, expect, request_id: shoal_coordinator::client::new_request_id() };
            let m = client.call(|mut c| { let req = req.clone(); async move { c.set_model_alias(req).await } }).await?;
            if json {
                print_json(&ops::model_json(&m));
            } else {
                println!("{}@{alias} is version {version}", m.name);
            }
        }
        ModelCmd::List { page, conn, json } => {
            let client = conn.client()?;
            let (models, next) = page.list(&client, |mut c, page| async move { c.list_models(ListModelsRequest { page }).await }).await?;
            if json {
                print_json(&serde_json::Value::Array(models.iter().map(ops::model_json).collect()));
            } else {
                for m in &models {
                    let aliases: Vec<String> = m.aliases.iter().map(|a| format!("{}={}", a.alias, a.version)).collect();
                    println!("{}: {} versions, aliases {}", m.name, m.version_count, if aliases.is_empty() { "-".into() } else { aliases.join(" ") });
                }
            }
            note_next_page(&next, json);
        }
        ModelCmd::Show { reference, page, conn, json } => {
            let client = conn.client()?;
            let (mut m, v) = ops::resolve_model(&client, &reference).await?;
            if v.is_none() && (page.page.is_some() || page.all) {
                let name = m.name.clone();
                let (versions, next) = page
                    .fetch(|page| {
                        let (client, name) = (&client, name.clone());
                        async move {
                            let m = client.call(|mut c| { let req = GetModelRequest { name: name.clone(), page: page.clone() }; async move { c.get_model(req).await } }).await?;
                            Ok((m.versions, m.next_page))
                        }
                    })
                    .await?;
                (m.versions, m.next_page) = (versions, next);
            }
            if v.is_none() {
                note_next_page(&m.next_page, json);
            }
            let out = match &v {
                Some(v) => ops::model_version_json(&m, v),
                None => ops::model_json(&m),
            };
            if json {
                print_json(&out);
            } else {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
        }
        ModelCmd::Lineage { reference, conn, json } => {
            let client = conn.client()?;
            let mut chain = Vec::new();
            let mut next = Some(reference.clone());
            while let Some(r) = next.take() {
                let (m, v) = ops::resolve_model(&client, &r).await?;
                let v = v.with_context(|| format!("{r}: name a version (NAME@VERSION or NAME@ALIAS)"))?;
                if chain.len() > 1000 {
                    bail!("the lineage of {reference} does not end");
                }
                next = (!v.parent.is_empty()).then(|| v.parent.clone());
                let mut entry = ops::model_version_json(&m, &v);
                // Through the pipeline run whose step trained it, if one did (and the job is
                // still kept).
                entry["pipeline_run"] = serde_json::Value::Null;
                if let Ok(job) = ops::get_job(&client, v.job_id).await {
                    if !job.pipeline_run.is_empty() {
                        let req = PipelineRunRequest { id: job.pipeline_run.clone(), request_id: String::new() };
                        if let Ok(run) = client.call(|mut c| { let req = req.clone(); async move { c.get_pipeline_run(req).await } }).await {
                            entry["pipeline_run"] = json!({"id": run.id, "pipeline": run.pipeline, "version": run.version, "spec_blake3": run.spec_blake3,
                                                            "build": run.build, "cause": run.cause, "step": job.pipeline_step});
                        }
                    }
                }
                chain.push(entry);
            }
            if json {
                print_json(&serde_json::Value::Array(chain));
            } else {
                for v in &chain {
                    let mut line = format!("{}@{}  job {}  dataset {} v{}  test_accuracy {}", v["name"].as_str().unwrap_or(""), v["version"], v["job"], v["dataset"].as_str().unwrap_or(""), v["dataset_version"], v["test_accuracy"]);
                    if let Some(run) = v["pipeline_run"].as_object() {
                        line += &format!("  pipeline run {} step {} ({})", run["id"].as_str().unwrap_or(""), run["step"].as_str().unwrap_or(""), run["cause"].as_str().unwrap_or(""));
                    }
                    println!("{line}");
                }
            }
        }
        ModelCmd::Export { reference, out, conn, json } => {
            let client = conn.client()?;
            let (m, v) = ops::resolve_model(&client, &reference).await?;
            let v = v.with_context(|| format!("{reference}: name a version (NAME@VERSION or NAME@ALIAS)"))?;
            let c = v.checkpoint.as_ref().context("the model version has no checkpoint")?;
            let (_copy, store) = ops::fetch_checkpoint(&client, c).await?;
            let tensors = shoal_worker::checkpoint::export_pytorch(&store, c, &out).with_context(|| format!("exporting {}@{}", m.name, v.version))?;
            if json {
                print_json(&json!({"name": m.name, "version": v.version, "model_kind": c.model_kind, "path": out,
                    "tensors": tensors.iter().map(|(n, s)| json!({"name": n, "shape": s, "dtype": "F32"})).collect::<Vec<_>>()}));
            } else {
                println!("exported {}@{} ({} model of job {}) to {} ({} tensors)", m.name, v.version, c.model_kind, v.job_id, out.display(), tensors.len());
            }
        }
        ModelCmd::Torch { reference, out, conn } => {
            let client = conn.client()?;
            // The model's training spec and the dataset version it trained on.
            let (spec_toml, dataset, version, hint) = match reference.strip_prefix("job:") {
                Some(id) => {
                    let id: u64 = id.parse().with_context(|| format!("{reference:?} is not job:ID"))?;
                    let j = ops::get_job(&client, id).await?;
                    if shoal_coordinator::state::is_batch(&j) {
                        bail!("job {id} is a batch job: it has no model");
                    }
                    (j.spec_toml, j.dataset_name, j.dataset_version, format!("job-{id}.safetensors"))
                }
                None => {
                    let (m, v) = ops::resolve_model(&client, &reference).await?;
                    let v = v.with_context(|| format!("{reference}: name a version (NAME@VERSION or NAME@ALIAS) or job:ID"))?;
                    (v.spec_toml, v.dataset_name, v.dataset_version, format!("{}-{}.safetensors", m.name, v.version))
                }
            };
            let spec = shoal_core::JobSpec::parse(&spec_toml).context("the model's training spec")?;
            let d = client
                .call(|mut c| {
                    let req = GetDatasetRequest { name: dataset.clone(), version, shards_only: true, ..Default::default() };
                    async move { c.get_dataset(req).await }
                })
                .await
                .with_context(|| format!("reading dataset {dataset} v{version}, which the model trained on"))?;
            let head = shoal_core::model::Head::of(spec.loss(), d.classes as u64, d.target_width as u64, d.context as u64).map_err(anyhow::Error::msg)?;
            let layout = shoal_core::model::Layout::new(&spec.model, &d.feature_shape, head).map_err(|e| anyhow::anyhow!("{e}"))?;
            let code = torch::sequential_code(&layout, &d.feature_shape, &d.feature_dtype, &hint);
            match out {
                Some(path) => {
                    std::fs::write(&path, &code).with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote the PyTorch module of {reference} to {}", path.display());
                }
                None => print!("{code}"),
            }
        }
    }
    Ok(())
}
