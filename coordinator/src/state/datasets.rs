//! Datasets: versions made of slices, registration with schema and drift checks.

use super::*;

impl StateMachine {
    /// Adds a dataset version (`info.append`: a slice on the latest version; else a new
    /// dataset), checked against the state in log order.
    pub(super) fn register_dataset(&mut self, index: u64, mut info: DatasetInfo) -> Result<DatasetInfo, String> {
        dataset::validate_name(&info.name).map_err(|e| e.to_string())?;
        let latest = self.dataset(&info.name, 0);
        let next = latest.map(|d| d.version).unwrap_or(0) + 1;
        // Version 0 asks for the next one: the version, and whether the name exists,
        // are decided here, in log order, not by an importer that read "the latest"
        // from some replica.
        if info.version == 0 {
            info.version = next;
        } else if info.version != next {
            return Err(format!("dataset {} version {} cannot be registered: the next version is {next}", info.name, info.version));
        }
        match (info.append, latest) {
            (false, Some(d)) => {
                return Err(format!(
                    "dataset {} exists (version {}): add records to it as a new slice with `shoal data append {} FILES...`",
                    info.name, d.version, info.name
                ))
            }
            (true, None) => return Err(format!("dataset {} does not exist: create it with `shoal data import {} FILES...`", info.name, info.name)),
            _ => {}
        }
        if info.shards.is_empty() || info.records == 0 {
            return Err(format!("dataset {} has no records", info.name));
        }
        let feature_len = info.feature_shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if info.feature_shape.is_empty() || info.feature_shape.contains(&0) || info.classes == 0 || feature_len.is_none_or(|n| n > MAX_FEATURES) {
            return Err(format!("dataset {}: feature shape {:?} and {} classes are not usable", info.name, info.feature_shape, info.classes));
        }
        // The new shards must live in one folder of their own under datasets/<name>/ (no
        // `..`, no absolute paths), a folder no other slice uses: an import or append can
        // only ever touch its own files.
        let root = std::path::Path::new("datasets").join(&info.name);
        for shard in &info.shards {
            let p = std::path::Path::new(&shard.path);
            let plain = p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !(plain && p.starts_with(&root) && p.components().count() == 4) {
                return Err(format!("dataset {}: shard path {:?} is not a file in a folder of {}", info.name, shard.path, root.display()));
            }
        }
        let folder = dataset::shard_folder(&info).ok_or_else(|| format!("dataset {}: shards must all be in one folder", info.name))?.to_path_buf();
        let used = self.datasets.get(&info.name).into_iter().flatten().find(|d| d.shards.iter().any(|s| std::path::Path::new(&s.path).parent() == Some(&*folder)));
        if let Some(other) = used {
            return Err(format!("dataset {}: folder {} already holds version {}", info.name, folder.display(), other.version));
        }
        let sum = info.shards.iter().try_fold(0u64, |a, s| a.checked_add(s.records));
        if sum != Some(info.records) {
            return Err(format!("dataset {}: shards hold {sum:?} records, manifest says {}", info.name, info.records));
        }
        let mut slice = info.slices.pop().unwrap_or_default();
        slice.records = info.records;
        slice.folder = folder.to_string_lossy().into_owned();
        slice.blake3 = dataset::slice_digest(&info.shards);
        let stored = match latest {
            None => {
                slice.first = 0;
                DatasetInfo { slices: vec![slice], append: false, created_index: index, ..info }
            }
            Some(base) => {
                // The schema: what every slice must match.
                if info.feature_shape != base.feature_shape {
                    return Err(format!("dataset {}: the slice's features have shape {:?}; the dataset's are {:?}", info.name, info.feature_shape, base.feature_shape));
                }
                if !base.feature_dtype.is_empty() && info.feature_dtype != base.feature_dtype {
                    return Err(format!("dataset {}: the slice's features are {}; the dataset's are {}", info.name, info.feature_dtype, base.feature_dtype));
                }
                if info.class_names.len() > base.class_names.len() && info.class_names.starts_with(&base.class_names) && !base.class_names.is_empty() {
                    return Err(format!(
                        "dataset {}: the slice has label {:?}, unknown to the dataset (classes: {})",
                        info.name,
                        info.class_names[base.class_names.len()],
                        base.class_names.join(", ")
                    ));
                }
                if !info.class_names.starts_with(&base.class_names) || (base.class_names.is_empty() && !info.class_names.is_empty()) {
                    return Err(format!("dataset {}: the slice's labels are {}; the dataset's are {}", info.name, label_kind(&info.class_names), label_kind(&base.class_names)));
                }
                if info.classes > base.classes {
                    return Err(format!(
                        "dataset {}: the slice has label {}, unknown to the dataset (classes 0..{})",
                        info.name,
                        info.classes - 1,
                        base.classes
                    ));
                }
                Self::check_drift(&info.name, base, &mut slice)?;
                let records = base.records.checked_add(info.records).ok_or_else(|| format!("dataset {}: too many records", info.name))?;
                let mut slices = base.slices.clone();
                if slices.is_empty() {
                    // A version from before slices: it is one.
                    slices.push(DatasetSlice {
                        first: 0,
                        records: base.records,
                        blake3: dataset::slice_digest(&base.shards),
                        folder: dataset::shard_folder(base).map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
                        ..Default::default()
                    });
                }
                slice.first = base.records;
                slices.push(slice);
                let mut shards = base.shards.clone();
                shards.extend(info.shards);
                DatasetInfo {
                    name: info.name,
                    version: info.version,
                    records,
                    feature_shape: base.feature_shape.clone(),
                    classes: base.classes,
                    shards,
                    created_index: index,
                    slices,
                    feature_dtype: base.feature_dtype.clone(),
                    append: false,
                    settings: base.settings.clone(),
                    class_names: base.class_names.clone(),
                    // A transform job's append brings its own fit; other slices keep the one there is.
                    transform: info.transform.or_else(|| base.transform.clone()),
                }
            }
        };
        self.datasets.entry(stored.name.clone()).or_default().push(stored.clone());
        if stored.version > 1 {
            self.fire_templates(index, &stored.name, stored.version);
        }
        Ok(stored)
    }


    /// Checks an appended slice's statistics against `base` (the version it is appended to):
    /// its histograms must use the first slice's bins; its drift is recorded in it, and a
    /// drift beyond the dataset's thresholds is refused (`on_drift = "reject"`) or noted.
    pub(super) fn check_drift(name: &str, base: &DatasetInfo, slice: &mut DatasetSlice) -> Result<(), String> {
        let (Some(new), Some(first)) = (slice.stats.as_ref(), base.slices.first().and_then(|s| s.stats.as_ref())) else { return Ok(()) };
        // Slices without statistics, or without histograms (batch outputs: their tasks' bins
        // do not add up), cannot be compared.
        let unbinned = |s: &shoal_proto::SliceStats| s.features.iter().any(|f| f.bins.is_empty());
        if base.slices.iter().any(|s| s.stats.as_ref().is_none_or(unbinned)) || unbinned(new) {
            return Ok(());
        }
        let same_bins = new.features.len() == first.features.len() && new.features.iter().zip(&first.features).all(|(a, b)| a.lo == b.lo && a.hi == b.hi);
        if !same_bins {
            return Err(format!("dataset {name}: the slice's statistics are binned over other ranges than the dataset's first slice (append again)"));
        }
        let mut all = shoal_proto::SliceStats::default();
        for s in &base.slices {
            shoal_core::stats::add(&mut all, s.stats.as_ref().expect("checked above"));
        }
        let (label, feature, at) = shoal_core::stats::drift(&all, new);
        (slice.label_js, slice.feature_js, slice.feature_js_at) = (label, feature, at as u64);
        let settings = base.settings.clone().unwrap_or_else(default_dataset_settings);
        let mut over = Vec::new();
        if label > settings.max_label_js {
            over.push(format!("label divergence {label:.4} > {}", settings.max_label_js));
        }
        if feature > settings.max_feature_js {
            over.push(format!("feature {at} divergence {feature:.4} > {}", settings.max_feature_js));
        }
        if over.is_empty() {
            return Ok(());
        }
        let drift = format!("drift: {} (Jensen-Shannon, base 2)", over.join(", "));
        if settings.on_drift == "reject" {
            return Err(format!("dataset {name}: the slice was not added: {drift}; the dataset rejects drift (`shoal data set {name} --on-drift warn` accepts it)"));
        }
        slice.drift = drift;
        Ok(())
    }

    /// Version 0 means the latest.
    pub fn dataset(&self, name: &str, version: u64) -> Option<&DatasetInfo> {
        let versions = self.datasets.get(name)?;
        if version == 0 {
            versions.last()
        } else {
            versions.iter().find(|d| d.version == version)
        }
    }

    pub fn datasets(&self) -> impl Iterator<Item = &DatasetInfo> {
        self.datasets.values().flatten()
    }
}

/// How a dataset's labels are given, for messages.
pub(super) fn label_kind(names: &[String]) -> String {
    if names.is_empty() {
        "integer class ids".into()
    } else {
        format!("the names {}", names.join(", "))
    }
}

/// Drift thresholds of a dataset that has not set its own.
pub(super) fn default_dataset_settings() -> shoal_proto::DatasetSettings {
    shoal_proto::DatasetSettings { max_label_js: 0.1, max_feature_js: 0.1, on_drift: "warn".into() }
}
