//! The pipeline spec's tests: parsing, errors naming the step and key, references, conditions, cache settings, gates and appends.
use super::*;

const TRAIN: &str = r#"
[step.spec]
name = "mlp"
[step.spec.dataset]
name = "mnist"
test = [9000, 10000]
[step.spec.model]
kind = "mlp"
hidden = [32]
[step.spec.training]
epochs = 1
batch_size = 64
[step.spec.training.optimizer]
kind = "sgd"
lr = 0.05
"#;

fn pipeline(rest: &str) -> String {
    format!("name = \"p\"\n[[step]]\nname = \"train\"\nkind = \"train\"\n{TRAIN}\n{rest}")
}

fn err(text: &str) -> String {
    PipelineSpec::parse(text).unwrap_err().to_string()
}

const SCORE: &str = "[[step]]\nname = \"score\"\nkind = \"evaluate\"\nneeds = [\"train\"]\nmodel = \"{steps.train.model}\"\ndataset = \"mnist@1\"\nrecords = [0, 100]\n";

#[test]
fn a_valid_pipeline_parses_and_renders_references() {
    let p = PipelineSpec::parse(&pipeline(&format!("{SCORE}when = \"steps.train.test_accuracy >= 0.9 and not (steps.train.step == 0)\"\n"))).unwrap();
    assert_eq!(p.steps.len(), 2);
    let score = p.step("score").unwrap();
    assert_eq!(score.needs, ["train"]);
    let text = score.render(&|r| (r.to_string() == "steps.train.model").then(|| "job:7".to_string())).unwrap();
    let batch = crate::batch::BatchSpec::parse(&text).unwrap();
    assert_eq!(batch.operator.model.as_deref(), Some("job:7"));
    assert_eq!(batch.input.version, Some(1));
    assert_eq!(batch.input.records, Some([0, 100]));
    let outputs = |acc: &'static str| move |r: &OutputRef| match r.output.as_str() {
        "test_accuracy" => Some(acc.to_string()),
        "step" => Some("20".to_string()),
        _ => None,
    };
    let when = score.when.as_ref().unwrap();
    assert!(when.eval(&outputs("0.95")).unwrap());
    assert!(!when.eval(&outputs("0.85")).unwrap());
    // A missing output is an error, not false.
    assert!(when.eval(&|_| None).unwrap_err().contains("has no output"));
}

#[test]
fn errors_name_the_step_and_the_key() {
    let e = err(&pipeline("[[step]]\nname = \"score\"\nkind = \"evaluate\"\nneeds = [\"trian\"]\nmodel = \"x\"\ndataset = \"d\"\n"));
    assert!(e.contains("step \"score\": needs: there is no step \"trian\""), "{e}");
    let e = err(&pipeline("[[step]]\nname = \"score\"\nkind = \"evaluate\"\nmodel = \"{steps.train.model}\"\ndataset = \"d\"\n"));
    assert!(e.contains("step \"score\": model:") && e.contains("not upstream"), "{e}");
    let e = err(&pipeline("[[step]]\nname = \"score\"\nkind = \"evaluate\"\nneeds = [\"train\"]\nmodel = \"{steps.train.modle}\"\ndataset = \"d\"\n"));
    assert!(e.contains("step \"score\": model:") && e.contains("no output \"modle\""), "{e}");
    let e = err(&pipeline("[[step]]\nname = \"score\"\nkind = \"evaluate\"\nneeds = [\"train\"]\nmodel = \"{steps.nope.model}\"\ndataset = \"d\"\n"));
    assert!(e.contains("names no step \"nope\""), "{e}");
    let e = err(&pipeline("[[step]]\nname = \"x\"\nkind = \"sleep\"\n"));
    assert!(e.contains("step \"x\": kind:"), "{e}");
    let e = err(&pipeline("[[step]]\nname = \"x\"\nkind = \"register\"\nmodel = \"job:1\"\nname2 = \"m\"\n"));
    assert!(e.contains("step \"x\": name2: unknown key"), "{e}");
    let e = err(&pipeline("[[step]]\nname = \"x\"\nkind = \"register\"\nmodel = \"job:1\"\n"));
    assert!(e.contains("step \"x\": as: missing"), "{e}");
    let e = err(&pipeline("[[step]]\nname = \"x\"\nkind = \"register\"\nneeds = [\"train\"]\nmodel = \"job:1\"\nas = \"m\"\nwhen = \"steps.train.test_accuracy >\"\n"));
    assert!(e.contains("step \"x\": when:"), "{e}");
    let e = err(&pipeline("[[step]]\nname = \"train\"\nkind = \"register\"\nmodel = \"job:1\"\n"));
    assert!(e.contains("two steps"), "{e}");
    // The step's job spec is checked too, named by step.
    let e = err(&pipeline(&TRAIN.replace("epochs = 1", "epochs = 0").replace("[step.spec]", "[[step]]\nname = \"t2\"\nkind = \"train\"\n[step.spec]")));
    assert!(e.contains("step \"t2\": spec:") && e.contains("training.epochs"), "{e}");
    assert!(err("name = \"p\"\n").contains("step: a pipeline needs at least one"));
    let trigger = |t: &str| pipeline("").replacen("name = \"p\"\n", &format!("name = \"p\"\n[trigger]\n{t}\n"), 1);
    assert!(err(&trigger("on_append = \"d\"\ndebounce = 5")).contains("trigger.debounce: unknown key"));
    assert!(err(&trigger("on_append = \"d\"\nmin_new_records = 0")).contains("trigger.min_new_records: must be"));
    assert!(err(&trigger("min_new_records = 2")).contains("trigger.on_append: missing"));
    let schedule = |t: &str| pipeline("").replacen("name = \"p\"\n", &format!("name = \"p\"\n[schedule]\n{t}\n"), 1);
    assert!(err(&schedule("cron = \"0 3 * * *\"")).contains("schedule.cron:"));
    assert!(err(&schedule("cron = \"0 0 3 * * *\"\ntimezone = \"Europe/Lundon\"")).contains("schedule.timezone:"));
    assert!(err(&schedule("cron = \"0 0 3 * * *\"\ncatchup = \"some\"")).contains("schedule.catchup:"));
    assert!(err(&schedule("cron = \"0 0 3 * * *\"\nconcurrency = \"never\"")).contains("schedule.concurrency:"));
    assert!(err(&schedule("cron = \"0 0 3 * * *\"\nmax_catchup = 0")).contains("schedule.max_catchup:"));
    let p = PipelineSpec::parse(&schedule("cron = \"0 0 3 * * *\"\ntimezone = \"Europe/London\"")).unwrap();
    let s = p.schedule.unwrap();
    assert_eq!((s.catchup, s.max_catchup, s.concurrency), (Catchup::Latest, 10, Concurrency::Forbid));
    let p = PipelineSpec::parse(&pipeline("").replacen("name = \"p\"\n", "name = \"p\"\n[trigger]\non_append = \"mnist\"\ndebounce_s = 5\n", 1)).unwrap();
    assert_eq!(p.trigger, Some(TriggerSpec { on_append: "mnist".into(), min_new_records: 1, debounce_s: 5 }));
    assert!(err("name = \"p\"\nschedul = 1\n[[step]]\nname = \"a\"\nkind = \"train\"\n").contains("schedul: unknown key"));
}

#[test]
fn cache_settings_and_gates_are_checked_at_submit() {
    let gate = "[[step]]\nname = \"gate\"\nkind = \"gate\"\nneeds = [\"train\"]\nmodel = \"m@{steps.train.step}\"\nalias = \"prod\"\nholdout = \"d@2\"\n";
    let p = PipelineSpec::parse(&pipeline(gate)).unwrap();
    let (train, g) = (&p.steps[0], &p.steps[1]);
    assert!(train.cache && !g.cache, "train is cached by default, a gate never");
    let rendered = g.render(&|_| Some("3".into())).unwrap();
    let parsed = Gate::parse(&rendered).unwrap();
    assert_eq!((parsed.candidate().unwrap(), parsed.metric.as_str()), (("m".to_string(), 3), "test_accuracy"));
    assert!(parsed.passes(0.9, 0.9) && !parsed.passes(0.89, 0.9));
    let lower = Gate { metric: "test_loss".into(), min_delta: 0.1, ..parsed.clone() };
    assert!(lower.passes(0.3, 0.4) && !lower.passes(0.35, 0.4), "lower is better, by min_delta");
    assert!(err(&pipeline(&gate.replace("alias = \"prod\"\n", ""))).contains("step \"gate\": alias: missing"));
    assert!(err(&pipeline(&format!("{gate}metric = \"auc\"\n"))).contains("step \"gate\": gate: metric: \"auc\""));
    assert!(err(&pipeline(&format!("{gate}cache = true\n"))).contains("step \"gate\": cache: gate steps are never cached"));
    // cache_ignore names keys of the step.
    let train = |extra: &str| pipeline("").replacen("kind = \"train\"\n", &format!("kind = \"train\"\n{extra}\n"), 1);
    assert!(PipelineSpec::parse(&train("cache_ignore = [\"spec.cluster.workers\"]")).is_ok());
    assert!(err(&train("cache_ignore = [\"colour\"]")).contains("cache_ignore: \"colour\" is not a key of a train step"));
    assert!(err(&train("cache = \"yes\"")).contains("cache: must be true or false"));
    // An exec batch is not cached unless asked: the key cannot see its files.
    let exec = "[[step]]\nname = \"x\"\nkind = \"batch\"\n[step.spec]\nname = \"x\"\n[step.spec.input]\ndataset = \"d\"\n[step.spec.operator]\nkind = \"exec\"\ncommand = [\"cp\", \"{input}\", \"{output}\"]\n[step.spec.output]\ndataset = \"o\"\n";
    assert!(!PipelineSpec::parse(&pipeline(exec)).unwrap().steps[1].cache);
    // The material: ignored keys out, keys sorted, references replaced.
    let s = &PipelineSpec::parse(&train("cache_ignore = [\"spec.name\"]")).unwrap().steps[0];
    let m = s.cache_material(&|_| None).unwrap();
    assert!(m.starts_with("kind = \"train\"") && !m.contains("name = \"mlp\"") && m.contains("lr = 0.05"), "{m}");
}

#[test]
fn append_steps_read_their_prefix_and_format() {
    let step = "[[step]]\nname = \"add\"\nkind = \"append\"\ndataset = \"d\"\nformat = \"csv\"\nlabel = \"y\"\n";
    let p = PipelineSpec::parse(&pipeline(step)).unwrap();
    let a = Append::parse(&p.steps[1].render(&|_| None).unwrap()).unwrap();
    assert_eq!(a.prefix(), "incoming/d/");
    assert!(a.reads("incoming/d/day-1.CSV") && !a.reads("incoming/d/notes.txt"));
    let job = crate::batch::BatchSpec::parse(&a.batch_spec("add", &["incoming/d/x.csv".into()]).unwrap()).unwrap();
    assert_eq!((job.input.dataset.as_str(), job.operator.kind.as_str(), job.output.unwrap().dataset.as_str()), ("d", "import", "d"));
    assert!(err(&pipeline(&step.replace("format = \"csv\"\n", ""))).contains("step \"add\": format: missing"));
    assert!(err(&pipeline(&format!("{step}prefix = \"datasets/d/\"\n"))).contains("prefix: \"datasets/d/\" is not a folder under incoming/"));
    assert!(err(&pipeline(&step.replace("label = \"y\"\n", ""))).contains("operator.label"));
    assert!(err(&pipeline(&format!("{step}cache = true\n"))).contains("append steps are never cached"));
}

#[test]
fn cycles_are_refused_naming_the_step() {
    let a = "[[step]]\nname = \"a\"\nkind = \"register\"\nneeds = [\"b\"]\nmodel = \"job:1\"\n";
    let b = "[[step]]\nname = \"b\"\nkind = \"register\"\nneeds = [\"a\"]\nmodel = \"job:1\"\n";
    let e = err(&format!("name = \"p\"\n{a}{b}"));
    assert!(e.contains("step \"a\": needs: \"b\" comes later"), "{e}");
    let e = err("name = \"p\"\n[[step]]\nname = \"a\"\nkind = \"register\"\nneeds = [\"a\"]\nmodel = \"job:1\"\n");
    assert!(e.contains("cannot need itself"), "{e}");
}

#[test]
fn conditions_parse_and_evaluate() {
    let v = |r: &OutputRef| Some(match r.output.as_str() {
        "acc" => "0.91".to_string(),
        "name" => "mnist@3".to_string(),
        _ => return None,
    });
    for (c, want) in [
        ("steps.a.acc >= 0.9", true),
        ("steps.a.acc > 0.91", false),
        ("0.95 > steps.a.acc", true),
        ("steps.a.acc < 1 and steps.a.acc != 0.91", false),
        ("steps.a.acc < 1 or false", true),
        ("not (steps.a.name == 'mnist@3')", false),
        ("steps.a.name == \"mnist@3\" and true", true),
        ("true", true),
    ] {
        assert_eq!(Condition::parse(c).unwrap().eval(&v).unwrap(), want, "{c}");
    }
    for bad in ["", "steps.a.acc >=", "(steps.a.acc > 1", "steps.a.acc > 1 1", "x > 1", "steps.a > 1", "steps.a.acc = 1", "1e999 > steps.a.acc"] {
        assert!(Condition::parse(bad).is_err(), "{bad}");
    }
    assert!(Condition::parse("steps.a.name > 'x'").unwrap().eval(&v).is_err());
    assert!(Condition::parse("steps.a.name > 1").unwrap().eval(&v).is_err());
}
