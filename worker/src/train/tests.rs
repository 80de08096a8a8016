use super::lanes::{lanes_of, subtrees, LanePass};
use super::*;
use crate::collective::testing::tcp_rings;
use shoal_core::dataset::{write_shards, Records};
use shoal_core::idx::IdxData;

#[test]
fn lanes_split_like_the_issue_says_and_decompose_into_whole_subtrees() {
    let split: Vec<usize> = (0..3).map(|r| lanes_of(8, r, 3).len()).collect();
    assert_eq!(split, [3, 3, 2]);
    let mut out = Vec::new();
    subtrees(0, 8, &(0..3), &mut out);
    assert_eq!(out, [0..2, 2..3]);
    out.clear();
    subtrees(0, 8, &(3..6), &mut out);
    assert_eq!(out, [3..4, 4..6]);
    out.clear();
    subtrees(0, 8, &(0..8), &mut out);
    assert_eq!((out.len(), out[0].clone()), (1, 0..8));
}

/// The root gradient of the lane tree, computed on `world` ranks of a real TCP ring.
fn lane_gradients(k: usize, world: usize, ds: &ShardedDataset, spec: &JobSpec, params: &[f32], batch: &[u64]) -> Vec<Vec<f32>> {
    let rings = tcp_rings(world, Wire::F32, Duration::from_secs(20));
    std::thread::scope(|s| {
        let hs: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(r, mut ring)| {
                s.spawn(move || {
                    let mut net = crate::model::build(&spec.model, &ds.feature_shape, ds.classes as u64, spec.training.seed).unwrap();
                    let np = net.layout().num_params();
                    let mut lanes = Lanes::new(k, r, world, np);
                    let (mut p, mut g, mut ctl) = (params.to_vec(), vec![0.0; np], Control::default());
                    let mut pass = LanePass { net: &mut *net, params: &mut p, ds, batch, step: 0 };
                    lanes.gradients(&mut pass, &mut g, &mut ctl, None, &mut ring).unwrap();
                    g
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn lanes_give_the_same_gradient_bits_on_any_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = shoal_core::rng::SplitMix64::new(3);
    let recs = Records { features: IdxData::U8((0..64 * 6).map(|_| rng.below(256) as u8).collect()), feature_shape: vec![6], labels: (0..64).map(|i| i % 3).collect(), targets: None };
    let folder = shoal_core::dataset::import_dir("d", "t").unwrap();
    let info = write_shards(dir.path(), "d", &folder, &recs, 2).unwrap();
    let ds = ShardedDataset::open(&shoal_core::store::Store::local(dir.path()), &info).unwrap();
    let spec = JobSpec::parse(
        "name = \"t\"\n[model]\nkind = \"mlp\"\nhidden = [7]\n[dataset]\nname = \"d\"\ntrain = [0, 64]\n\
         [training]\nepochs = 1\nbatch_size = 24\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n",
    )
    .unwrap();
    let mut net = crate::model::build(&spec.model, &[6], 3, 1).unwrap();
    let params = net.layout().init(1);
    let batch: Vec<u64> = (0..24).map(|i| (i * 7) % 64).collect();
    for k in [8, 6] {
        let want = lane_gradients(k, 1, &ds, &spec, &params, &batch).remove(0);
        for world in 2..=k {
            for (r, got) in lane_gradients(k, world, &ds, &spec, &params, &batch).iter().enumerate() {
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{k} lanes on {world} ranks: rank {r} differs");
            }
        }
    }
    // Without the fixed tree the bits do depend on the split: the test can see a change.
    let mut whole = vec![0.0; params.len()];
    let mut buf = BatchBuf::default();
    buf.read(&ds, batch.iter().copied()).unwrap();
    net.forward_backward(&mut params.clone(), &buf.batch(&batch, 0), 1.0, &mut whole, &[0], &mut |_, _| {}).unwrap();
    let want = lane_gradients(8, 1, &ds, &spec, &params, &batch).remove(0);
    assert!(whole.iter().zip(&want).any(|(a, b)| a.to_bits() != b.to_bits()), "one pass over the batch happens to give the tree's bits");
}

#[test]
fn control_values_stay_exact_on_a_bf16_wire() {
    let world = 3;
    let mine = |r: usize| Control {
        loss: 0.1 + r as f32,
        due: r == 0,
        done: r != 1,
        failed: false,
        // Far past f32's 24 bits, let alone bf16's 8.
        records: (1 << 40) + 12_345 + r as u64,
        digest: RecordDigest::of(r as u64 * 100..r as u64 * 100 + 77),
        first_bad: [None, Some(9_999_999), Some(777)][r],
    };
    let rings = tcp_rings(world, Wire::Bf16, Duration::from_secs(20));
    let got: Vec<(Sums, Vec<Vec<u64>>, Vec<f32>)> = std::thread::scope(|s| {
        let hs: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(r, mut ring)| {
                s.spawn(move || {
                    let sums = reduce_controls(&mut ring, &mine(r)).unwrap();
                    let counts = gather_u64s(&mut ring, &[4_095 + r as u64, 1 << 33]).unwrap();
                    // The same values on the gradients' wire: what this used to be.
                    let mut on_wire = vec![4_095.0f32, 257.0];
                    ring.all_reduce(&mut on_wire).unwrap();
                    (sums, counts, on_wire)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut digest = RecordDigest::default();
    for r in 0..world {
        let d = mine(r).digest;
        digest.add_sums(d.lo as u64, d.hi as u64);
    }
    let want = Sums {
        loss: 0.1f32 + 1.1 + 2.1,
        due: true,
        done: 2,
        failed: 0,
        records: 3 * (1 << 40) + 3 * 12_345 + 3,
        digest,
        bad_loss: vec![],
        first_bad: Some(777),
    };
    assert_eq!(digest, RecordDigest::of((0..77).chain(100..177).chain(200..277)));
    for (r, (sums, counts, on_wire)) in got.iter().enumerate() {
        assert_eq!(*sums, want, "rank {r}");
        assert!(sums.diverged(), "a rank found a bad gradient");
        assert_eq!(*counts, vec![vec![4_095, 1 << 33], vec![4_096, 1 << 33], vec![4_097, 1 << 33]]);
        // Without the exact path these would be wrong: the test can see the difference.
        assert_ne!(on_wire, &vec![3.0 * 4_095.0, 3.0 * 257.0], "bf16 rounded nothing: the wire was not bf16");
    }
}

#[test]
fn control_values_round_trip_and_refuse_odd_lengths() {
    let c = Control { loss: f32::NAN, due: false, done: true, failed: true, records: u64::MAX - 1, digest: RecordDigest::from_packed(0xABC_DEF), first_bad: Some(0) };
    let back = Control::decode(&c.encode()).unwrap();
    assert!(back.loss.is_nan());
    assert_eq!(Control { loss: 0.0, ..back }, Control { loss: 0.0, ..c });
    assert_eq!(Control::decode(&Control::default().encode()).unwrap(), Control::default());
    assert!(Control::decode(&[0; CONTROL_BYTES - 1]).is_none());
}

/// A two-rank job's pieces: a dataset of 64 records of 6 features, an MLP 6-7-3, its spec.
fn tiny_job(dir: &std::path::Path, extra: &str) -> (ShardedDataset, Layout, JobSpec) {
    let mut rng = shoal_core::rng::SplitMix64::new(3);
    let recs = Records { features: IdxData::U8((0..64 * 6).map(|_| rng.below(256) as u8).collect()), feature_shape: vec![6], labels: (0..64).map(|i| i % 3).collect(), targets: None };
    let folder = shoal_core::dataset::import_dir("d", "t").unwrap();
    let info = write_shards(dir, "d", &folder, &recs, 2).unwrap();
    let spec = JobSpec::parse(&format!(
        "name = \"t\"\n[model]\nkind = \"mlp\"\nhidden = [7]\n[dataset]\nname = \"d\"\ntrain = [0, 64]\n\
         [training]\nepochs = 1\nbatch_size = 24\n{extra}[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9\n"
    ))
    .unwrap();
    let model = crate::model::build(&spec.model, &[6], 3, spec.training.seed).unwrap().layout().clone();
    (ShardedDataset::open(&shoal_core::store::Store::local(dir), &info).unwrap(), model, spec)
}

/// One step on each of two ranks of a real TCP ring (`cuts`: the buckets; `lanes`: that
/// many lanes instead), rank 1 writing a NaN into its own gradient at `poison`. Returns
/// each rank's state after the step, the sums, and the divergence every rank found.
fn one_step(cuts: &[usize], lanes: Option<usize>, poison: Option<usize>) -> Vec<(TrainState, Sums, Option<Divergence>)> {
    let dir = tempfile::tempdir().unwrap();
    let (ds, model, spec) = tiny_job(dir.path(), "");
    let batch: Vec<u64> = (0..24).map(|i| (i * 7) % 64).collect();
    let (ds, model, spec, batch) = (&ds, &model, &spec, &batch);
    let rings = tcp_rings(2, Wire::F32, Duration::from_secs(20));
    std::thread::scope(|s| {
        let hs: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(r, mut ring)| {
                s.spawn(move || {
                    let np = model.num_params();
                    let mut net = crate::model::build(&spec.model, &ds.feature_shape, ds.classes as u64, spec.training.seed).unwrap();
                    let mut state = TrainState::fresh(model, spec);
                    let strategy = match lanes {
                        Some(k) => Strategy::Lanes(Lanes::new(k, r, 2, np)),
                        None => Strategy::Buckets(cuts.to_vec()),
                    };
                    let mut steps = StepLoop::new(&mut *net, ds, strategy, r * 12..(r + 1) * 12, 0.5, crate::collective::chunk(np, 2, r));
                    let poison = poison.filter(|_| r == 1);
                    let (_, sums) = steps.step(&mut state, StepInput { batch, step: 0, poison, vote: &mut |_| {}, ring: &mut ring }).unwrap();
                    let found = sums.diverged().then(|| {
                        let own = steps.own_first_bad(&mut state.params, (batch, 0), poison).unwrap();
                        Divergence::found(5, &sums, &steps.grads, own, model, &mut ring).unwrap()
                    });
                    (state, sums, found)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_bad_gradient_is_found_before_the_optimizer_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model, spec) = tiny_job(dir.path(), "");
    let fresh = TrainState::fresh(&model, &spec);
    let bias = model.params.last().unwrap().offset;
    let starts = crate::model::build(&spec.model, &[6], 3, 0).unwrap().layer_starts();
    let mut one_bucket = None;
    for (what, cuts, lanes) in [("one bucket", vec![0], None), ("a bucket per layer", starts.clone(), None), ("lanes", vec![0], Some(4))] {
        let good = one_step(&cuts, lanes, None);
        // One bucket updates in the all-gather's pieces (`split_step`), buckets after
        // their all-reduces (`settle`): the same sums in the same order, the same bits.
        match (what, &one_bucket) {
            ("one bucket", _) => one_bucket = Some(good[0].0.params.clone()),
            ("a bucket per layer", Some(p)) => assert!(good[0].0.params.iter().zip(p).all(|(a, b)| a.to_bits() == b.to_bits()), "one bucket and a bucket per layer differ"),
            _ => {}
        }
        for (state, sums, found) in &good {
            assert!(!sums.diverged() && found.is_none(), "{what}: {sums:?}");
            assert_eq!((state.opt.step, sums.records), (1, 24), "{what}");
            assert_ne!(state.params, fresh.params, "{what}: a good step moves the parameters");
        }
        assert_eq!(good[0].0.params, good[1].0.params, "{what}");
        for poison in [bias, 3] {
            let bad = one_step(&cuts, lanes, Some(poison));
            for (r, (state, sums, found)) in bad.iter().enumerate() {
                assert_eq!(sums.first_bad, Some(poison as u64), "{what}, rank {r}");
                // Bitwise the state before the step: the optimizer never ran.
                assert_eq!(state.opt.step, 0, "{what}");
                assert!(state.params.iter().zip(&fresh.params).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}, rank {r}: parameters changed");
                assert!(state.opt.buffers.iter().flatten().all(|v| v.to_bits() == 0), "{what}, rank {r}: momentum changed");
                let d = found.as_ref().unwrap();
                let tensor = if poison == bias { "2.bias" } else { "0.weight" };
                assert_eq!((d.step, d.ranks.as_slice()), (5, &[1][..]), "{what}");
                assert_eq!(d.tensor.as_deref(), Some(tensor), "{what}");
                assert!(d.value.is_nan());
            }
        }
    }
}

#[test]
fn a_divergence_says_step_tensor_rank_and_checkpoint() {
    let d = Divergence { step: 5, tensor: Some("2.bias".into()), value: f32::NAN, ranks: vec![1], checkpoint: Ok(Some(4)) };
    let m = d.to_string();
    assert!(m.starts_with("diverged at step 5: "), "{m}");
    assert!(m.contains("tensor 2.bias is NaN") && m.contains("rank 1") && m.contains("checkpoint step 4"), "{m}");
    let d = Divergence { tensor: None, value: f32::INFINITY, ranks: vec![], checkpoint: Ok(None), ..d };
    let m = d.to_string();
    assert!(m.starts_with("diverged at step 5: the loss is inf") && m.contains("overflowed") && m.contains("no step was done"), "{m}");
}

#[test]
fn buckets_close_at_layer_starts_once_big_enough() {
    // Layers start at 0, 100, 130, 135; 140 parameters.
    let starts = [135, 130, 100, 0];
    assert_eq!(bucket_cuts(&starts, 140, 0), vec![0], "0: one bucket");
    assert_eq!(bucket_cuts(&starts, 140, 1), vec![135, 130, 100, 0]);
    assert_eq!(bucket_cuts(&starts, 140, 10), vec![130, 100, 0]);
    assert_eq!(bucket_cuts(&starts, 140, 41), vec![0], "the rest is too small to close a bucket before 0");
    assert_eq!(bucket_cuts(&starts, 140, 40), vec![100, 0]);
    assert_eq!(bucket_cuts(&starts, 140, 1000), vec![0]);
}
