//! Datasets: the schema once, every slice once (its shards and statistics), and versions as
//! prefixes of the slices. An append adds one slice and one version record, so the state
//! grows by what was appended, never by a copy of what was there.

use super::*;
use shoal_proto::{DatasetRecord, DatasetVersionRecord, DatasetVersionSummary, SliceStats};

/// Entries (slices, versions, jobs, models, templates) in one page of a listing.
pub const PAGE: usize = 100;

/// A dataset as the state keeps it.
#[derive(Clone, Debug, Default)]
pub(super) struct Dataset {
    pub(super) rec: DatasetRecord,
    /// The sum of every slice's statistics (the latest version's), for the next append's
    /// drift check; None once a slice carries none. Derived: rebuilt from the slices on
    /// restore, in the same order, so every replica holds the same bits.
    total: Option<SliceStats>,
}

/// How much of a version a reply carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetView {
    /// Schema, records and counts: no slices, shards or statistics.
    Summary,
    /// Every shard in record order and the version's statistics, no slices: what a worker
    /// reads (assignments) and an export needs.
    Shards,
    /// One page of slices (with their shards and statistics) and of versions, newest first.
    Page(usize),
    /// The newest slice alone (with its shards and statistics) and the version's statistics:
    /// a registration's answer.
    Newest,
}

/// A page token: the page number as text (empty: the first).
pub fn page_number(token: &str) -> Result<usize, ApplyError> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse::<usize>().ok().filter(|p| *p < 1 << 32).ok_or_else(|| ApplyError::invalid(format!("page {token:?} is not a page token from an earlier reply")))
}

/// The items of page `page` of `n` items listed newest first: indices into the oldest-first
/// list, and the next page's token (empty when this is the last).
pub fn page_range(n: usize, page: usize) -> (std::ops::Range<usize>, String) {
    let skip = page.saturating_mul(PAGE).min(n);
    let (hi, lo) = (n - skip, (n - skip).saturating_sub(PAGE));
    let next = if lo > 0 { (page + 1).to_string() } else { String::new() };
    (lo..hi, next)
}

impl Dataset {
    fn new(rec: DatasetRecord) -> Dataset {
        let mut d = Dataset { rec, total: None };
        d.total = d.sum_stats(d.rec.slices.len());
        d
    }

    /// A dataset from a snapshot of before slices were kept once: every version was a full
    /// copy; the latest holds every slice, and each version's slice count is its own.
    fn from_copies(versions: Vec<DatasetInfo>) -> Option<Dataset> {
        let latest = versions.last()?.clone();
        let mut slices = latest.slices.clone();
        if slices.is_empty() {
            slices.push(DatasetSlice { first: 0, records: latest.records, folder: dataset::shard_folder(&latest).map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(), ..Default::default() });
        }
        for s in slices.iter_mut() {
            s.shards = latest.shards.iter().filter(|sh| std::path::Path::new(&sh.path).parent() == Some(std::path::Path::new(&s.folder))).cloned().collect();
        }
        if let Some(t) = latest.transform.clone() {
            if let Some(s) = slices.last_mut() {
                s.transform = Some(t);
            }
        }
        let rec = DatasetRecord {
            name: latest.name.clone(),
            feature_shape: latest.feature_shape.clone(),
            classes: latest.classes,
            feature_dtype: latest.feature_dtype.clone(),
            target_width: latest.target_width,
            class_names: latest.class_names.clone(),
            settings: latest.settings.clone(),
            slices,
            context: latest.context,
            stride: latest.stride,
            versions: versions
                .iter()
                .map(|v| DatasetVersionRecord { version: v.version, slices: v.slices.len().max(1) as u32, records: v.records, created_index: v.created_index, classes: v.classes })
                .collect(),
        };
        Some(Dataset::new(rec))
    }

    /// The sum of the first `n` slices' statistics (None if one has none).
    fn sum_stats(&self, n: usize) -> Option<SliceStats> {
        let mut all = SliceStats::default();
        for s in &self.rec.slices[..n] {
            shoal_core::stats::add(&mut all, s.stats.as_ref()?);
        }
        (n > 0).then_some(all)
    }

    /// Version `v` (0: the latest).
    pub(super) fn version(&self, v: u64) -> Option<&DatasetVersionRecord> {
        if v == 0 {
            return self.rec.versions.last();
        }
        // Versions are 1, 2, 3, ...: version v is the v-th, unless an old log says otherwise.
        match self.rec.versions.get(v as usize - 1) {
            Some(r) if r.version == v => Some(r),
            _ => self.rec.versions.iter().find(|r| r.version == v),
        }
    }

    /// Version `v` as a reply or an assignment carries it.
    pub(super) fn info(&self, v: &DatasetVersionRecord, view: DatasetView) -> DatasetInfo {
        let n = (v.slices as usize).min(self.rec.slices.len());
        let prefix = &self.rec.slices[..n];
        let mut info = DatasetInfo {
            name: self.rec.name.clone(),
            version: v.version,
            records: v.records,
            feature_shape: self.rec.feature_shape.clone(),
            classes: self.rec.classes,
            created_index: v.created_index,
            feature_dtype: self.rec.feature_dtype.clone(),
            target_width: self.rec.target_width,
            context: self.rec.context,
            stride: self.rec.stride,
            settings: self.rec.settings.clone(),
            class_names: self.rec.class_names.clone(),
            transform: prefix.iter().rev().find_map(|s| s.transform.clone()),
            slice_count: n as u32,
            version_count: self.rec.versions.len() as u32,
            ..Default::default()
        };
        let stats = || if n == self.rec.slices.len() { self.total.clone() } else { self.sum_stats(n) };
        match view {
            DatasetView::Summary => {}
            DatasetView::Shards => {
                info.shards = prefix.iter().flat_map(|s| s.shards.iter().cloned()).collect();
                info.stats = stats();
            }
            DatasetView::Newest => {
                if let Some(s) = prefix.last() {
                    info.shards = s.shards.clone();
                    info.slices = vec![s.clone()];
                }
                info.stats = stats();
            }
            DatasetView::Page(page) => {
                let (slices, next_slices) = page_range(n, page);
                let upto = self.rec.versions.iter().take_while(|r| r.version <= v.version).count();
                let (versions, next_versions) = page_range(upto, page);
                info.shards = prefix[slices.clone()].iter().flat_map(|s| s.shards.iter().cloned()).collect();
                info.slices = prefix[slices].iter().rev().cloned().collect();
                info.versions = self.rec.versions[versions]
                    .iter()
                    .rev()
                    .map(|r| DatasetVersionSummary { version: r.version, records: r.records, slices: r.slices, created_index: r.created_index })
                    .collect();
                info.next_page = if next_slices.is_empty() { next_versions } else { next_slices };
                info.stats = stats();
            }
        }
        info
    }
}

/// A registration's statistics, checked before they are added up in the apply: counts that
/// no slice of `records` records can have would overflow or poison the sums on every replica.
fn check_stats(name: &str, records: u64, s: &SliceStats, text: Option<(u32, u32)>) -> Result<(), ApplyError> {
    let bad = |what: String| Err(ApplyError::invalid(format!("dataset {name}: the slice's statistics are not those of {records} records: {what}")));
    if let Some((context, stride)) = text {
        // A text slice's histogram counts its tokens, which its windows cover.
        let most = (records.saturating_add(1)).saturating_mul(u64::from(stride.max(context + 1)));
        let counted = s.label_counts.iter().try_fold(0u64, |a, b| a.checked_add(*b));
        if counted != Some(s.tokens) || s.tokens > most || s.label_counts.len() > 256 || !s.features.is_empty() {
            return bad(format!("a text slice of {} tokens with a byte histogram of {counted:?}", s.tokens));
        }
        return Ok(());
    }
    for (j, f) in s.features.iter().enumerate() {
        if f.count.checked_add(f.missing).is_none_or(|n| n > records) {
            return bad(format!("feature {j} counts {} values and {} missing", f.count, f.missing));
        }
        if f.bins.iter().try_fold(0u64, |a, b| a.checked_add(*b)).is_none_or(|n| n > records) {
            return bad(format!("feature {j}'s histogram holds more values than records"));
        }
        if !(f.sum.is_finite() && f.sum_sq.is_finite()) {
            return bad(format!("feature {j}'s sums are not finite"));
        }
    }
    if s.label_counts.iter().try_fold(0u64, |a, b| a.checked_add(*b)).is_none_or(|n| n > records) {
        return bad("the label histogram holds more labels than records".into());
    }
    Ok(())
}

impl StateMachine {
    /// Adds a dataset version (`info.append`: a slice on the latest version; else a new
    /// dataset), checked against the state in log order.
    pub(super) fn register_dataset(&mut self, index: u64, mut info: DatasetInfo) -> Result<DatasetInfo, ApplyError> {
        dataset::validate_name(&info.name).map_err(ApplyError::invalid)?;
        let latest = self.datasets.get(&info.name).and_then(|d| d.version(0).map(|v| (d, v)));
        let next = latest.map(|(_, v)| v.version).unwrap_or(0) + 1;
        // Version 0 asks for the next one: the version, and whether the name exists,
        // are decided here, in log order, not by an importer that read "the latest"
        // from some replica.
        if info.version == 0 {
            info.version = next;
        } else if info.version != next {
            return Err(ApplyError::conflict(format!("dataset {} version {} cannot be registered: the next version is {next}", info.name, info.version)));
        }
        match (info.append, latest) {
            (false, Some((_, v))) => {
                return Err(ApplyError::conflict(format!(
                    "dataset {} exists (version {}): add records to it as a new slice with `shoal data append {} FILES...`",
                    info.name, v.version, info.name
                )))
            }
            (true, None) => return Err(ApplyError::not_found(format!("dataset {} does not exist: create it with `shoal data import {} FILES...`", info.name, info.name))),
            _ => {}
        }
        if info.shards.is_empty() || info.records == 0 {
            return Err(ApplyError::invalid(format!("dataset {} has no records", info.name)));
        }
        let feature_len = info.feature_shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let text_ok = info.context == 0 || (info.target_width == 0 && info.stride > 0 && u64::from(info.context) <= shoal_core::spec::MAX_CONTEXT && info.feature_shape == [u64::from(info.context) + 1] && info.feature_dtype == "u8" && info.classes == shoal_core::text::VOCAB);
        if !text_ok {
            return Err(ApplyError::invalid(format!(
                "dataset {}: text windows of context {} and stride {} must be u8 records of [context + 1] tokens over {} byte values",
                info.name, info.context, info.stride, shoal_core::text::VOCAB
            )));
        }
        let labels_ok = match info.target_width {
            0 => info.classes > 0,
            w => info.classes == 0 && info.class_names.is_empty() && w <= MAX_TARGETS,
        };
        if info.feature_shape.is_empty() || info.feature_shape.contains(&0) || !labels_ok || feature_len.is_none_or(|n| n > MAX_FEATURES) {
            return Err(ApplyError::invalid(format!(
                "dataset {}: feature shape {:?}, {} classes and {} targets per record are not usable",
                info.name, info.feature_shape, info.classes, info.target_width
            )));
        }
        // The new shards must live in one folder of their own under datasets/<name>/ (no
        // `..`, no absolute paths), a folder no other slice uses: an import or append can
        // only ever touch its own files.
        let root = std::path::Path::new("datasets").join(&info.name);
        for shard in &info.shards {
            let p = std::path::Path::new(&shard.path);
            let plain = p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !(plain && p.starts_with(&root) && p.components().count() == 4) {
                return Err(ApplyError::invalid(format!("dataset {}: shard path {:?} is not a file in a folder of {}", info.name, shard.path, root.display())));
            }
        }
        let folder = dataset::shard_folder(&info).ok_or_else(|| ApplyError::invalid(format!("dataset {}: shards must all be in one folder", info.name)))?.to_string_lossy().into_owned();
        if let Some((d, _)) = latest {
            if let Some(i) = d.rec.slices.iter().position(|s| s.folder == folder) {
                let holder = d.rec.versions.iter().find(|v| v.slices as usize > i).map(|v| v.version).unwrap_or_default();
                return Err(ApplyError::conflict(format!("dataset {}: folder {folder} already holds version {holder}", info.name)));
            }
        }
        let sum = info.shards.iter().try_fold(0u64, |a, s| a.checked_add(s.records));
        if sum != Some(info.records) {
            return Err(ApplyError::invalid(format!("dataset {}: shards hold {sum:?} records, manifest says {}", info.name, info.records)));
        }
        let mut slice = info.slices.pop().unwrap_or_default();
        if let Some(s) = &slice.stats {
            check_stats(&info.name, info.records, s, (info.context > 0).then_some((info.context, info.stride)))?;
        }
        slice.records = info.records;
        slice.blake3 = dataset::slice_digest(&info.shards);
        slice.folder = folder;
        slice.shards = std::mem::take(&mut info.shards);
        // A transform job's append brings its own fit; other slices keep the one there is.
        slice.transform = info.transform.take();
        let name = info.name.clone();
        match latest {
            None => {
                slice.first = 0;
                let rec = DatasetRecord {
                    name: info.name,
                    feature_shape: info.feature_shape,
                    classes: info.classes,
                    feature_dtype: info.feature_dtype,
                    target_width: info.target_width,
                    class_names: info.class_names,
                    settings: info.settings,
                    slices: vec![slice],
                    context: info.context,
                    stride: info.stride,
                    versions: vec![DatasetVersionRecord { version: info.version, slices: 1, records: info.records, created_index: index, classes: info.classes }],
                };
                self.datasets.insert(name.clone(), Dataset::new(rec));
            }
            Some((base, v)) => {
                // The schema: what every slice must match.
                let b = &base.rec;
                if info.feature_shape != b.feature_shape {
                    return Err(ApplyError::invalid(format!("dataset {}: the slice's features have shape {:?}; the dataset's are {:?}", name, info.feature_shape, b.feature_shape)));
                }
                if (info.context, info.stride) != (b.context, b.stride) {
                    let kind = |c: u32, s: u32| if c == 0 { "records of features".to_string() } else { format!("text windows of --context {c} --stride {s}") };
                    return Err(ApplyError::invalid(format!("dataset {}: the slice holds {}; the dataset holds {}", name, kind(info.context, info.stride), kind(b.context, b.stride))));
                }
                if info.target_width != b.target_width {
                    let kind = |w: u32| if w == 0 { "class labels".to_string() } else { format!("{w} float target(s) per record") };
                    let hint = if b.target_width == 0 { " (class labels come from an integer y, or a CSV column named by --label)" } else { " (targets come from a float y, or a CSV column named by --target)" };
                    return Err(ApplyError::invalid(format!("dataset {}: the slice has {}; the dataset has {}{hint}", name, kind(info.target_width), kind(b.target_width))));
                }
                if !b.feature_dtype.is_empty() && info.feature_dtype != b.feature_dtype {
                    return Err(ApplyError::invalid(format!("dataset {}: the slice's features are {}; the dataset's are {}", name, info.feature_dtype, b.feature_dtype)));
                }
                if info.class_names.len() > b.class_names.len() && info.class_names.starts_with(&b.class_names) && !b.class_names.is_empty() {
                    return Err(ApplyError::invalid(format!(
                        "dataset {}: the slice has label {:?}, unknown to the dataset (classes: {})",
                        name,
                        info.class_names[b.class_names.len()],
                        b.class_names.join(", ")
                    )));
                }
                if !info.class_names.starts_with(&b.class_names) || (b.class_names.is_empty() && !info.class_names.is_empty()) {
                    return Err(ApplyError::invalid(format!("dataset {}: the slice's labels are {}; the dataset's are {}", name, label_kind(&info.class_names), label_kind(&b.class_names))));
                }
                if info.classes > b.classes {
                    return Err(ApplyError::invalid(format!("dataset {}: the slice has label {}, unknown to the dataset (classes 0..{})", name, info.classes - 1, b.classes)));
                }
                Self::check_drift(base, &mut slice)?;
                let records = v.records.checked_add(info.records).ok_or_else(|| ApplyError::invalid(format!("dataset {name}: too many records")))?;
                slice.first = v.records;
                let d = self.datasets.get_mut(&name).expect("looked up above");
                match (&mut d.total, &slice.stats) {
                    (Some(t), Some(s)) => shoal_core::stats::add(t, s),
                    (t, _) => *t = None,
                }
                d.rec.slices.push(slice);
                let slices = d.rec.slices.len() as u32;
                d.rec.versions.push(DatasetVersionRecord { version: info.version, slices, records, created_index: index, classes: d.rec.classes });
            }
        }
        if info.version > 1 {
            self.fire_templates(index, &name, info.version);
        }
        self.fire_pipelines(index, &name, info.version);
        Ok(self.dataset_view(&name, info.version, DatasetView::Newest).expect("just registered"))
    }

    /// Checks an appended slice's statistics against `base` (the version it is appended to):
    /// its histograms must use the first slice's bins; its drift is recorded in it, and a
    /// drift beyond the dataset's thresholds is refused (`on_drift = "reject"`) or noted.
    pub(super) fn check_drift(base: &Dataset, slice: &mut DatasetSlice) -> Result<(), ApplyError> {
        let name = &base.rec.name;
        let (Some(new), Some(all)) = (slice.stats.as_ref(), base.total.as_ref()) else { return Ok(()) };
        // Slices without histograms (batch outputs: their tasks' bins do not add up) cannot
        // be compared.
        let unbinned = |s: &SliceStats| s.features.iter().any(|f| f.bins.is_empty());
        if base.rec.slices.iter().any(|s| s.stats.as_ref().is_none_or(unbinned)) || unbinned(new) {
            return Ok(());
        }
        // The total keeps the first slice's bins (sums keep the first operand's ranges).
        let same_bins = new.features.len() == all.features.len() && new.features.iter().zip(&all.features).all(|(a, b)| a.lo == b.lo && a.hi == b.hi && a.bins.len() == b.bins.len());
        if !same_bins {
            return Err(ApplyError::invalid(format!("dataset {name}: the slice's statistics are binned over other ranges than the dataset's first slice (append again)")));
        }
        let (label, feature, at) = shoal_core::stats::drift(all, new);
        (slice.label_js, slice.feature_js, slice.feature_js_at) = (label, feature, at as u64);
        let settings = base.rec.settings.clone().unwrap_or_else(default_dataset_settings);
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
            return Err(ApplyError::conflict(format!("dataset {name}: the slice was not added: {drift}; the dataset rejects drift (`shoal data set {name} --on-drift warn` accepts it)")));
        }
        slice.drift = drift;
        Ok(())
    }

    /// `shoal data set`: the thresholds of the dataset's next appends.
    pub(super) fn set_dataset_settings(&mut self, r: shoal_proto::DatasetSettingsRequest) -> Result<DatasetInfo, ApplyError> {
        let d = self.datasets.get_mut(&r.name).ok_or_else(|| ApplyError::not_found(format!("dataset {} does not exist", r.name)))?;
        let mut settings = d.rec.settings.clone().unwrap_or_else(default_dataset_settings);
        for (key, v) in [("--max-label-js", r.max_label_js), ("--max-feature-js", r.max_feature_js)] {
            if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                return Err(ApplyError::invalid(format!("{key} must be 0 to 1 (a Jensen-Shannon divergence, base 2), got {}", v.unwrap_or_default())));
            }
        }
        settings.max_label_js = r.max_label_js.unwrap_or(settings.max_label_js);
        settings.max_feature_js = r.max_feature_js.unwrap_or(settings.max_feature_js);
        if let Some(on) = r.on_drift {
            if on != "warn" && on != "reject" {
                return Err(ApplyError::invalid(format!("--on-drift must be warn or reject, not {on:?}")));
            }
            settings.on_drift = on;
        }
        // Settings are not data: they belong to the dataset, for its next appends.
        d.rec.settings = Some(settings);
        Ok(self.dataset_view(&r.name, 0, DatasetView::Summary).expect("exists"))
    }

    /// Version `version` (0: the latest) of dataset `name`, summarised: schema, records and
    /// counts, without its slices or shards.
    /// The records of version `version` (0: the latest) of dataset `name`, and its number.
    pub(super) fn version_records(&self, name: &str, version: u64) -> Option<(u64, u64)> {
        self.datasets.get(name)?.version(version).map(|v| (v.version, v.records))
    }

    pub fn dataset(&self, name: &str, version: u64) -> Option<DatasetInfo> {
        self.dataset_view(name, version, DatasetView::Summary)
    }

    /// Version `version` (0: the latest) of dataset `name` as `view` says.
    pub fn dataset_view(&self, name: &str, version: u64, view: DatasetView) -> Option<DatasetInfo> {
        let d = self.datasets.get(name)?;
        Some(d.info(d.version(version)?, view))
    }

    /// The files every slice of dataset `name` was read from (as its registration gave them).
    pub(super) fn dataset_sources(&self, name: &str) -> BTreeSet<&str> {
        self.datasets.get(name).map(|d| d.rec.slices.iter().flat_map(|s| s.sources.iter().map(String::as_str)).collect()).unwrap_or_default()
    }

    /// Whether dataset `name` exists (any version).
    pub fn has_dataset(&self, name: &str) -> bool {
        self.datasets.contains_key(name)
    }

    /// One page of the datasets in the order of their names (each its latest version,
    /// summarised), and the next page's token (empty: the last).
    pub fn datasets_page(&self, page: usize) -> (Vec<DatasetInfo>, String) {
        let skip = page.saturating_mul(PAGE);
        let list = self.datasets.values().skip(skip).take(PAGE).filter_map(|d| Some(d.info(d.version(0)?, DatasetView::Summary))).collect();
        let next = if self.datasets.len() > skip + PAGE { (page + 1).to_string() } else { String::new() };
        (list, next)
    }

    /// Every dataset's name and the folders its slices use (relative to the store).
    pub fn dataset_folders(&self) -> impl Iterator<Item = (&str, &str)> {
        self.datasets.values().flat_map(|d| d.rec.slices.iter().map(move |s| (d.rec.name.as_str(), s.folder.as_str())))
    }

    pub(super) fn datasets_for_snapshot(&self) -> impl Iterator<Item = &DatasetRecord> {
        self.datasets.values().map(|d| &d.rec)
    }

    pub(super) fn restore_datasets(&mut self, records: Vec<DatasetRecord>, copies: Vec<DatasetInfo>) {
        for rec in records {
            self.datasets.insert(rec.name.clone(), Dataset::new(rec));
        }
        let mut by_name: BTreeMap<String, Vec<DatasetInfo>> = BTreeMap::new();
        for d in copies {
            by_name.entry(d.name.clone()).or_default().push(d);
        }
        for (name, versions) in by_name {
            if let Some(d) = Dataset::from_copies(versions) {
                self.datasets.insert(name, d);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_run_newest_first_and_end() {
        assert_eq!(page_range(0, 0), (0..0, String::new()));
        assert_eq!(page_range(5, 0), (0..5, String::new()));
        assert_eq!(page_range(250, 0), (150..250, "1".to_string()));
        assert_eq!(page_range(250, 1), (50..150, "2".to_string()));
        assert_eq!(page_range(250, 2), (0..50, String::new()));
        assert_eq!(page_range(250, 9), (0..0, String::new()));
        assert_eq!(page_range(200, 1), (0..100, String::new()));
        assert!(page_number("x").is_err());
        assert_eq!(page_number("").unwrap(), 0);
    }
}
