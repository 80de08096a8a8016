//! The store: datasets, checkpoints, batch outputs, metric chunks and exports, addressed by
//! keys (relative paths, `/` between parts). A local folder (the default) or an
//! S3-compatible bucket (`s3://BUCKET/PREFIX`, through the `object_store` crate).
//!
//! Nothing here relies on `rename` between keys: every object is written whole under a name
//! no other writer uses (an import's folder, a rank's part, an attempt's output) and becomes
//! part of the job or dataset only when Raft commits its name. So a plain PUT (atomic on S3)
//! and a local temp-file-then-rename are the same contract.
//!
//! Calls block: callers are worker threads and `spawn_blocking` tasks. The object store's I/O
//! runs on a small runtime of its own, so a call works from any thread.

use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt as _, TryStreamExt as _};
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use crate::fsutil::{create_dirs_durably, sync_dir};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{key}: not in the store")]
    NotFound { key: String },
    #[error("{key}: {source}")]
    Io { key: String, source: std::io::Error },
    #[error("{key}: {message}")]
    Object { key: String, message: String },
    #[error("{0}")]
    Config(String),
    /// A key that is not plain, or whose path passes a symbolic link: it could lead out of
    /// the store.
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    fn io(key: &str, source: std::io::Error) -> StoreError {
        if source.kind() == std::io::ErrorKind::NotFound {
            StoreError::NotFound { key: key.to_string() }
        } else {
            StoreError::Io { key: key.to_string(), source }
        }
    }

    fn object(key: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound { key: key.to_string() },
            e => StoreError::Object { key: key.to_string(), message: e.to_string() },
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One object of a listing.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub size: u64,
    pub modified_unix_ms: u64,
}

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Store(Arc<Backend>);

enum Backend {
    Local(PathBuf),
    Object { url: String, objects: Arc<dyn ObjectStore>, prefix: String, cache: Option<Cache> },
}

/// Shards read from an object store, kept in a folder of bounded size, named by their blake3
/// (so a file there is always a verified copy) and evicted oldest-used first.
struct Cache {
    dir: PathBuf,
    limit_bytes: u64,
    lock: Mutex<()>,
}

/// Bytes one ranged GET asks for, and how many are in flight per object read.
const RANGE: u64 = 8 << 20;
const RANGES_IN_FLIGHT: usize = 4;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("shoal-store")
            .enable_all()
            .build()
            .expect("the store's runtime starts (threads and a timer)")
    })
}

/// Runs `f` on the store's runtime and waits for it without entering a runtime here, so it
/// is safe on a thread of another runtime too.
fn block<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().expect("a store call runs to its end (its task does not panic)")
}

/// A key is a relative path of plain parts: no `..`, `.`, empty part or leading `/`.
pub fn check_key(key: &str) -> Result<()> {
    let plain = !key.is_empty() && key.split('/').all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains('\\') && !p.contains('\0'));
    if plain {
        Ok(())
    } else {
        Err(StoreError::Refused(format!("{key:?} is not a store key (a relative path of plain names)")))
    }
}

/// Where key `key` lies in a local store at `root`: refused when the key is not plain or a
/// part of its path below `root` is a symbolic link, which could lead out of the store (a
/// store's own writes never make one). Parts not there yet are fine: a write creates them.
fn confined(root: &Path, key: &str) -> Result<PathBuf> {
    check_key(key)?;
    let mut path = root.to_path_buf();
    for part in key.split('/') {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let below = path.strip_prefix(root).unwrap_or(&path).display().to_string();
                return Err(StoreError::Refused(format!("{key:?}: {below} in the store is a symbolic link; the store follows none (it could lead out of the store)")));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::NotADirectory => return Ok(root.join(key)),
            Err(e) => return Err(StoreError::io(key, e)),
        }
    }
    Ok(path)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.location())
    }
}

impl Store {
    /// `location`: a folder, or `s3://BUCKET[/PREFIX]` (credentials and region from the usual
    /// AWS environment variables; `endpoint`: an S3-compatible server's URL).
    pub fn open(location: &str, endpoint: Option<&str>) -> Result<Store> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/').to_string();
            if bucket.is_empty() {
                return Err(StoreError::Config(format!("--store {location}: no bucket (s3://BUCKET/PREFIX)")));
            }
            if !prefix.is_empty() {
                check_key(&prefix).map_err(|_| StoreError::Config(format!("--store {location}: the prefix is not a plain path")))?;
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(object_store::RetryConfig {
                max_retries: 5,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            });
            if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
                b = b.with_region("us-east-1");
            }
            if let Some(url) = endpoint {
                b = b.with_endpoint(url).with_allow_http(url.starts_with("http://"));
            }
            let objects = b.build().map_err(|e| StoreError::Config(format!("--store {location}: {e}")))?;
            let url = format!("s3://{bucket}{}", if prefix.is_empty() { String::new() } else { format!("/{prefix}") });
            return Ok(Store(Arc::new(Backend::Object { url, objects: Arc::new(objects), prefix, cache: None })));
        }
        if location.contains("://") {
            return Err(StoreError::Config(format!("--store {location}: a folder or s3://BUCKET/PREFIX (no other scheme is supported)")));
        }
        if endpoint.is_some() {
            return Err(StoreError::Config("--store-endpoint applies to an s3:// store".into()));
        }
        Ok(Store::local(location))
    }

    pub fn local(root: impl Into<PathBuf>) -> Store {
        Store(Arc::new(Backend::Local(root.into())))
    }

    /// Reads of an object store's shards go through `dir`, kept under `limit_bytes`.
    pub fn with_cache(self, dir: PathBuf, limit_bytes: u64) -> Result<Store> {
        match &*self.0 {
            Backend::Local(_) => Ok(self),
            Backend::Object { url, objects, prefix, .. } => {
                std::fs::create_dir_all(&dir).map_err(|e| StoreError::Config(format!("--cache-dir {}: {e}", dir.display())))?;
                let cache = Cache { dir, limit_bytes, lock: Mutex::new(()) };
                Ok(Store(Arc::new(Backend::Object { url: url.clone(), objects: objects.clone(), prefix: prefix.clone(), cache: Some(cache) })))
            }
        }
    }

    /// The folder or `s3://` URL, as a user passes it.
    pub fn location(&self) -> String {
        match &*self.0 {
            Backend::Local(root) => root.display().to_string(),
            Backend::Object { url, .. } => url.clone(),
        }
    }

    /// The folder of a local store (None: an object store).
    /// Object `key`'s file in a local store (None for an object store), confined to the
    /// store: a key that is not plain, or whose path passes a symbolic link, is refused.
    pub fn local_path(&self, key: &str) -> Result<Option<PathBuf>> {
        match &*self.0 {
            Backend::Local(root) => confined(root, key).map(Some),
            Backend::Object { .. } => check_key(key).map(|_| None),
        }
    }

    pub fn local_root(&self) -> Option<&Path> {
        match &*self.0 {
            Backend::Local(root) => Some(root),
            Backend::Object { .. } => None,
        }
    }

    fn object_path(prefix: &str, key: &str) -> object_store::path::Path {
        if prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{prefix}/{key}"))
        }
    }

    /// Writes `pieces`, back to back, as object `key`: whole or not at all.
    pub fn put(&self, key: &str, pieces: &[&[u8]]) -> Result<()> {
        check_key(key)?;
        match &*self.0 {
            Backend::Local(root) => put_local(root, key, pieces),
            Backend::Object { objects, prefix, .. } => {
                let payload: PutPayload = pieces.iter().map(|p| bytes::Bytes::copy_from_slice(p)).collect();
                let (objects, path, k) = (objects.clone(), Self::object_path(prefix, key), key.to_string());
                block(async move { objects.put(&path, payload).await.map(|_| ()).map_err(|e| StoreError::object(&k, e)) })
            }
        }
    }

    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        check_key(key)?;
        match &*self.0 {
            Backend::Local(root) => std::fs::read(confined(root, key)?).map_err(|e| StoreError::io(key, e)),
            Backend::Object { objects, prefix, .. } => {
                let (objects, path, k) = (objects.clone(), Self::object_path(prefix, key), key.to_string());
                block(async move {
                    let got = objects.get(&path).await.map_err(|e| StoreError::object(&k, e))?;
                    got.bytes().await.map(|b| b.to_vec()).map_err(|e| StoreError::object(&k, e))
                })
            }
        }
    }

    /// Bytes `range` of object `key`.
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>> {
        check_key(key)?;
        match &*self.0 {
            Backend::Local(root) => {
                use std::io::{Read as _, Seek as _};
                let mut f = std::fs::File::open(confined(root, key)?).map_err(|e| StoreError::io(key, e))?;
                f.seek(std::io::SeekFrom::Start(range.start)).map_err(|e| StoreError::io(key, e))?;
                let mut out = vec![0; (range.end - range.start) as usize];
                f.read_exact(&mut out).map_err(|e| StoreError::io(key, e))?;
                Ok(out)
            }
            Backend::Object { objects, prefix, .. } => {
                let (objects, path, k) = (objects.clone(), Self::object_path(prefix, key), key.to_string());
                block(async move { objects.get_range(&path, range).await.map(|b| b.to_vec()).map_err(|e| StoreError::object(&k, e)) })
            }
        }
    }

    /// The size of object `key`.
    pub fn size(&self, key: &str) -> Result<u64> {
        check_key(key)?;
        match &*self.0 {
            Backend::Local(root) => std::fs::metadata(confined(root, key)?).map(|m| m.len()).map_err(|e| StoreError::io(key, e)),
            Backend::Object { objects, prefix, .. } => {
                let (objects, path, k) = (objects.clone(), Self::object_path(prefix, key), key.to_string());
                block(async move { objects.head(&path).await.map(|m| m.size).map_err(|e| StoreError::object(&k, e)) })
            }
        }
    }

    /// Every object under folder `prefix` (all of them: ""), at any depth, sorted by key.
    pub fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let mut out = match &*self.0 {
            Backend::Local(root) => {
                let mut out = Vec::new();
                let dir = if prefix.is_empty() { root.clone() } else { confined(root, prefix)? };
                list_local(root, &dir, &mut out).map_err(|e| StoreError::io(prefix, e))?;
                out
            }
            Backend::Object { objects, prefix: base, .. } => {
                let (objects, base, k) = (objects.clone(), base.clone(), prefix.to_string());
                block(async move {
                    let full = match (base.is_empty(), k.is_empty()) {
                        (true, true) => None,
                        (true, false) => Some(object_store::path::Path::from(k.as_str())),
                        (false, true) => Some(object_store::path::Path::from(base.as_str())),
                        (false, false) => Some(object_store::path::Path::from(format!("{base}/{k}"))),
                    };
                    let metas: Vec<object_store::ObjectMeta> = objects.list(full.as_ref()).try_collect().await.map_err(|e| StoreError::object(&k, e))?;
                    let strip = if base.is_empty() { String::new() } else { format!("{base}/") };
                    Ok::<_, StoreError>(
                        metas
                            .into_iter()
                            .filter_map(|m| {
                                let key = m.location.as_ref().strip_prefix(strip.as_str())?.to_string();
                                Some(Entry { key, size: m.size, modified_unix_ms: m.last_modified.timestamp_millis().max(0) as u64 })
                            })
                            .collect(),
                    )
                })?
            }
        };
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes object `key` (one that is not there is not an error).
    pub fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        match &*self.0 {
            Backend::Local(root) => match std::fs::remove_file(confined(root, key)?) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(key, e)),
                _ => Ok(()),
            },
            Backend::Object { objects, prefix, .. } => {
                let (objects, path, k) = (objects.clone(), Self::object_path(prefix, key), key.to_string());
                block(async move {
                    match objects.delete(&path).await {
                        Err(e) if !matches!(e, object_store::Error::NotFound { .. }) => Err(StoreError::object(&k, e)),
                        _ => Ok(()),
                    }
                })
            }
        }
    }

    /// Removes every object under folder `prefix` (and, locally, the folder). Returns how
    /// many objects it removed.
    pub fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        check_key(prefix)?;
        let entries = match self.list(prefix) {
            Ok(e) => e,
            Err(StoreError::NotFound { .. }) => return Ok(0),
            Err(e) => return Err(e),
        };
        match &*self.0 {
            Backend::Local(root) => {
                let path = confined(root, prefix)?;
                let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                match removed {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(prefix, e)),
                    _ => Ok(entries.len()),
                }
            }
            Backend::Object { .. } => {
                for e in &entries {
                    self.delete(&e.key)?;
                }
                Ok(entries.len())
            }
        }
    }

    /// A local file holding object `key` (`bytes` long, blake3 `hash`), to map: a local
    /// store's own file, or a verified copy in the cache, fetched by ranged GETs. A copy
    /// whose hash does not match is an error and is not kept.
    pub fn local_copy(&self, key: &str, bytes: u64, hash: &str) -> Result<PathBuf> {
        check_key(key)?;
        match &*self.0 {
            Backend::Local(root) => confined(root, key),
            Backend::Object { objects, prefix, cache, .. } => {
                let Some(cache) = cache else {
                    return Err(StoreError::Config(format!("{key}: reading shards of an object store needs a cache folder (--cache-dir)")));
                };
                let named = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
                if !named {
                    return Err(StoreError::Config(format!("{key}: {hash:?} is not a blake3 hex digest")));
                }
                let path = cache.dir.join(hash);
                if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes) {
                    // Used now: the last to be evicted.
                    let _ = std::fs::File::options().append(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                    return Ok(path);
                }
                let data = self.fetch_ranges(objects.clone(), Self::object_path(prefix, key), key, bytes)?;
                let got = blake3::hash(&data).to_hex().to_string();
                if got != hash {
                    return Err(StoreError::Object { key: key.to_string(), message: format!("blake3 {got} does not match the manifest's {hash}") });
                }
                let _one_writer = cache.lock.lock().unwrap_or_else(|p| p.into_inner());
                let tmp = cache.dir.join(format!(".{hash}.{}", std::process::id()));
                std::fs::write(&tmp, &data).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| StoreError::io(key, e))?;
                cache.evict(&path);
                Ok(path)
            }
        }
    }

    /// Object `key` of `bytes` bytes, read by ranged GETs, several in flight.
    fn fetch_ranges(&self, objects: Arc<dyn ObjectStore>, path: object_store::path::Path, key: &str, bytes: u64) -> Result<Vec<u8>> {
        let k = key.to_string();
        block(async move {
            let ranges: Vec<Range<u64>> = (0..bytes.div_ceil(RANGE)).map(|i| i * RANGE..((i + 1) * RANGE).min(bytes)).collect();
            let pieces: Vec<bytes::Bytes> = futures::stream::iter(ranges.into_iter().map(|r| {
                let (objects, path) = (objects.clone(), path.clone());
                async move { objects.get_range(&path, r).await }
            }))
            .buffered(RANGES_IN_FLIGHT)
            .try_collect()
            .await
            .map_err(|e| StoreError::object(&k, e))?;
            let mut data = Vec::with_capacity(bytes as usize);
            for p in pieces {
                data.extend_from_slice(&p);
            }
            if data.len() as u64 != bytes {
                return Err(StoreError::Object { key: k, message: format!("{} bytes read, the manifest says {bytes}", data.len()) });
            }
            Ok(data)
        })
    }
}

impl Cache {
    /// Removes the least recently used copies until the folder fits its limit; `keep` (just
    /// fetched) stays even when it alone is over (a mapped file may be removed: the mapping
    /// keeps its pages).
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then(|| (m.modified().unwrap_or(UNIX_EPOCH), m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.limit_bytes {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

/// Temp file, fsync, rename, fsync of the folder: a reader sees the whole object or none.
fn put_local(root: &Path, key: &str, pieces: &[&[u8]]) -> Result<()> {
    let path = confined(root, key)?;
    let dir = path.parent().expect("a key has a file name").to_path_buf();
    create_dirs_durably(&dir).map_err(|e| StoreError::io(key, e))?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        for p in pieces {
            f.write_all(p)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&dir)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| StoreError::io(key, e))
}

/// Files under `dir`; symbolic links are not followed, nor listed.
fn list_local(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> std::io::Result<()> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_file() {
        let key = dir.strip_prefix(root).unwrap_or(dir).to_string_lossy().replace('\\', "/");
        out.push(Entry { key, size: meta.len(), modified_unix_ms: unix_ms(meta.modified().unwrap_or(UNIX_EPOCH)) });
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_type()?.is_symlink() {
            list_local(root, &e.path(), out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_store_puts_lists_reads_and_deletes_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().to_str().unwrap(), None).unwrap();
        s.put("jobs/1/a.bin", &[b"he", b"llo"]).unwrap();
        s.put("jobs/1/sub/b.bin", &[b"x"]).unwrap();
        s.put("jobs/2/c.bin", &[b"yz"]).unwrap();
        assert_eq!(s.get("jobs/1/a.bin").unwrap(), b"hello");
        assert_eq!(s.get_range("jobs/1/a.bin", 1..4).unwrap(), b"ell");
        assert_eq!(s.size("jobs/2/c.bin").unwrap(), 2);
        let keys: Vec<String> = s.list("jobs/1").unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["jobs/1/a.bin", "jobs/1/sub/b.bin"]);
        assert_eq!(s.list("").unwrap().len(), 3);
        assert!(matches!(s.get("jobs/9/none"), Err(StoreError::NotFound { .. })));
        assert_eq!(s.delete_prefix("jobs/1").unwrap(), 2);
        assert!(!dir.path().join("jobs/1").exists());
        s.delete("jobs/2/c.bin").unwrap();
        s.delete("jobs/2/c.bin").unwrap();
        assert!(s.list("").unwrap().is_empty());
        assert_eq!(s.local_copy("jobs/x", 0, "").unwrap(), dir.path().join("jobs/x"));
    }

    #[test]
    fn no_key_leads_out_of_a_local_store_through_a_symbolic_link() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"outside").unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The store's root may itself be a link (only what lies below it is checked).
        let root = dir.path().join("root");
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), &root).unwrap();
        let s = Store::local(&root);
        s.put("datasets/d/a.bin", &[b"in"]).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("datasets/out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("datasets/d/file")).unwrap();
        for key in ["datasets/out/secret", "datasets/d/file"] {
            let e = s.get(key).unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{key}: {e}");
            assert!(s.get_range(key, 0..1).is_err() && s.size(key).is_err() && s.local_copy(key, 7, "").is_err() && s.local_path(key).is_err(), "{key}");
            assert!(s.delete(key).is_err(), "{key}");
        }
        assert!(s.put("datasets/out/new", &[b"x"]).is_err());
        assert!(s.list("datasets/out").is_err() && s.delete_prefix("datasets/out").is_err());
        // Listing skips links; nothing outside was read, written or removed.
        let keys: Vec<String> = s.list("").unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["datasets/d/a.bin"]);
        assert_eq!(s.delete_prefix("datasets").unwrap(), 1);
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"outside");
        assert_eq!(s.local_path("datasets/new/x").unwrap(), Some(root.join("datasets/new/x")));
    }

    #[test]
    fn keys_and_locations_are_checked() {
        for bad in ["", "/abs", "a/../b", "a//b", "./a", "a\\b"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(Store::open("gs://bucket/x", None).is_err());
        assert!(Store::open("s3://", None).is_err());
        assert!(Store::open("s3://b/../x", None).is_err());
        assert!(Store::open("/tmp/x", Some("http://127.0.0.1:1")).is_err());
        let s = Store::open("s3://bucket/some/prefix", Some("http://127.0.0.1:9")).unwrap();
        assert_eq!(s.location(), "s3://bucket/some/prefix");
        assert!(s.local_root().is_none());
        // An object store reads shards only through a cache.
        assert!(matches!(s.local_copy("k", 1, &"0".repeat(64)), Err(StoreError::Config(_))));
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_copies_under_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache { dir: dir.path().to_path_buf(), limit_bytes: 25, lock: Mutex::new(()) };
        let t0 = SystemTime::now() - Duration::from_secs(100);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let p = dir.path().join(name);
            std::fs::write(&p, [0u8; 10]).unwrap();
            std::fs::File::options().append(true).open(&p).unwrap().set_modified(t0 + Duration::from_secs(i as u64)).unwrap();
        }
        cache.evict(&dir.path().join("a"));
        // "a" was just fetched and stays; "b" is the oldest of the rest.
        assert!(dir.path().join("a").exists());
        assert!(!dir.path().join("b").exists());
        assert!(dir.path().join("c").exists());
    }
}
