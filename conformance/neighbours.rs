//! Neighbours: entries someone else keeps beside a backend's own (files in its directory, objects under
//! its prefix, files beside its database). A fixture that says how to plant them lets the suite check
//! that the janitor removes only what the backend wrote (invariant 16): a cache is often pointed at a
//! project directory, a home directory or a bucket shared with other data.

use futures::future::BoxFuture;

/// Names that look like a cache's entries without being any backend's own: a JSON file that is no row,
/// a `.bin` that is no blob, `.tmp` files that are no temp of the cache's, a notes file. Planted in
/// every place the backend keeps entries.
pub const FOREIGN_NAMES: &[&str] = &[
    "notes.txt",
    "data.json",
    "firmware.bin",
    "report_final.bin",
    "upload.tmp",
    "row-draft.tmp",
];

/// The subdirectory in which copies of the backend's own entries are planted (a backup someone made
/// by hand): the same names as the backend's, one level down, are still not its entries.
pub const COPIES_DIR: &str = "backup";

/// How many of a directory's own entries get a planted copy in [`COPIES_DIR`].
const COPIES_PER_DIR: usize = 3;

/// What both planters put in one directory whose own entries (files or objects directly in it, in
/// listing order) are `own`: each of [`FOREIGN_NAMES`], and copies of the first [`COPIES_PER_DIR`] own
/// names in [`COPIES_DIR`]. Pairs of the subdirectory (`None`: the directory itself) and the name.
fn to_plant<'a>(own: impl IntoIterator<Item = &'a str>) -> Vec<(Option<&'static str>, String)> {
    let foreign = FOREIGN_NAMES.iter().map(|name| (None, name.to_string()));
    let copies = own
        .into_iter()
        .take(COPIES_PER_DIR)
        .map(|name| (Some(COPIES_DIR), name.to_owned()));
    foreign.chain(copies).collect()
}

/// The bytes planted under `name`: distinct per name, so a swap or rewrite shows too.
fn planted_bytes(name: &str) -> Vec<u8> {
    format!("someone else's data, not the cache's: {name}\n").into_bytes()
}

/// How a fixture plants entries the backend did not write among its own, and checks on them.
pub trait Neighbours: Send + Sync {
    /// Put entries the backend did not write in every place it keeps its own (the case calls this once
    /// the backend holds rows and blobs); the names planted.
    fn plant(&self) -> BoxFuture<'_, std::io::Result<Vec<String>>>;
    /// Of `planted`, the names no longer there with the bytes planted.
    fn missing<'a>(&'a self, planted: &'a [String]) -> BoxFuture<'a, std::io::Result<Vec<String>>>;
    /// Remove what was planted, best effort (the janitor never will, so the fixture must).
    fn clear<'a>(&'a self, planted: &'a [String]) -> BoxFuture<'a, ()>;
}

/// Neighbours for a backend that keeps its entries as files under one directory (fs, a database file
/// and its journals): [`FOREIGN_NAMES`] in that directory and in every directory below it.
#[derive(Clone, Debug)]
pub struct DirNeighbours {
    root: std::path::PathBuf,
}

impl DirNeighbours {
    /// Neighbours in `root` and the directories below it.
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        DirNeighbours { root: root.into() }
    }

    /// `root` and every real directory below it (links are not followed).
    fn directories(&self) -> std::io::Result<Vec<std::path::PathBuf>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    stack.push(entry.path());
                }
            }
            out.push(dir);
        }
        Ok(out)
    }
}

impl Neighbours for DirNeighbours {
    fn plant(&self) -> BoxFuture<'_, std::io::Result<Vec<String>>> {
        Box::pin(async move {
            let mut planted = Vec::new();
            let mut plant = |path: std::path::PathBuf, name: &str| -> std::io::Result<()> {
                if !path.exists() {
                    std::fs::write(&path, planted_bytes(name))?;
                    planted.push(path.to_string_lossy().into_owned());
                }
                Ok(()) // an existing file is not ours to overwrite either
            };
            for dir in self.directories()? {
                let mut own = Vec::new();
                for entry in std::fs::read_dir(&dir)? {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        own.push(entry.file_name().to_string_lossy().into_owned());
                    }
                }
                for (sub, name) in to_plant(own.iter().map(String::as_str)) {
                    let at = match sub {
                        Some(sub) => {
                            std::fs::create_dir_all(dir.join(sub))?;
                            dir.join(sub)
                        }
                        None => dir.clone(),
                    };
                    plant(at.join(&name), &name)?;
                }
            }
            Ok(planted)
        })
    }

    fn missing<'a>(&'a self, planted: &'a [String]) -> BoxFuture<'a, std::io::Result<Vec<String>>> {
        Box::pin(async move {
            Ok(planted
                .iter()
                .filter(|path| {
                    let name = std::path::Path::new(path.as_str())
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    std::fs::read(path.as_str()).ok() != Some(planted_bytes(&name))
                })
                .cloned()
                .collect())
        })
    }

    fn clear<'a>(&'a self, planted: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for path in planted {
                let _ = std::fs::remove_file(path);
            }
            // The copies' directories too, once empty (a fixture's directory may outlive the case).
            for path in planted {
                let parent = std::path::Path::new(path.as_str()).parent();
                if let Some(dir) = parent.filter(|d| d.ends_with(COPIES_DIR)) {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        })
    }
}

/// Neighbours for a backend that keeps its entries as objects under a key prefix: [`FOREIGN_NAMES`]
/// under the prefix and under every "directory" (key prefix ending in `/`) of the objects below it.
#[cfg(feature = "object-store")]
#[derive(Clone, Debug)]
pub struct ObjectNeighbours {
    store: std::sync::Arc<dyn object_store::ObjectStore>,
    prefix: object_store::path::Path,
}

#[cfg(feature = "object-store")]
impl ObjectNeighbours {
    /// Neighbours in `store` under `prefix`.
    pub fn new(
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        prefix: object_store::path::Path,
    ) -> Self {
        ObjectNeighbours { store, prefix }
    }
}

#[cfg(feature = "object-store")]
impl Neighbours for ObjectNeighbours {
    fn plant(&self) -> BoxFuture<'_, std::io::Result<Vec<String>>> {
        use futures::TryStreamExt;
        use object_store::ObjectStoreExt;
        use object_store::path::Path;
        Box::pin(async move {
            let listed: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&self.prefix))
                .try_collect()
                .await
                .map_err(std::io::Error::other)?;
            let existing: std::collections::BTreeSet<Path> =
                listed.iter().map(|m| m.location.clone()).collect();
            // Every directory between the prefix and each object, the prefix included.
            let mut dirs = std::collections::BTreeSet::from([self.prefix.clone()]);
            for meta in &listed {
                let mut parts: Vec<_> = meta.location.parts().collect();
                parts.pop();
                while parts.len() > self.prefix.parts().count() {
                    dirs.insert(Path::from_iter(parts.iter().cloned()));
                    parts.pop();
                }
            }
            let mut wanted: Vec<(Path, String)> = Vec::new();
            for dir in &dirs {
                let own = listed
                    .iter()
                    .filter(|m| {
                        m.location
                            .prefix_match(dir)
                            .is_some_and(|mut r| r.nth(1).is_none())
                    })
                    .filter_map(|m| m.location.filename());
                for (sub, name) in to_plant(own) {
                    let at = sub.map_or_else(|| dir.clone(), |sub| dir.clone().join(sub));
                    wanted.push((at.join(name.as_str()), name));
                }
            }
            let mut planted = Vec::new();
            for (path, name) in wanted {
                if existing.contains(&path) {
                    continue; // not ours to overwrite either
                }
                self.store
                    .put(&path, planted_bytes(&name).into())
                    .await
                    .map_err(std::io::Error::other)?;
                planted.push(path.to_string());
            }
            Ok(planted)
        })
    }

    fn missing<'a>(&'a self, planted: &'a [String]) -> BoxFuture<'a, std::io::Result<Vec<String>>> {
        use object_store::ObjectStoreExt;
        Box::pin(async move {
            let mut missing = Vec::new();
            for name in planted {
                let path = object_store::path::Path::from(name.as_str());
                let expected = planted_bytes(path.filename().unwrap_or_default());
                let held = match self.store.get(&path).await {
                    Ok(got) => Some(got.bytes().await.map_err(std::io::Error::other)?),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => return Err(std::io::Error::other(e)),
                };
                if held.as_deref() != Some(&expected[..]) {
                    missing.push(name.clone());
                }
            }
            Ok(missing)
        })
    }

    fn clear<'a>(&'a self, planted: &'a [String]) -> BoxFuture<'a, ()> {
        use object_store::ObjectStoreExt;
        Box::pin(async move {
            for name in planted {
                let _ = self
                    .store
                    .delete(&object_store::path::Path::from(name.as_str()))
                    .await;
            }
        })
    }
}
