//! Sorted lines with bounded memory: the orphan sweep's sets of blobs and of referenced refs grow with
//! the cache, so past a fixed number of lines each run is sorted and written to an unnamed temp file
//! (gone with the process, whatever happens), and reading back merges the runs in one sorted pass.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, Write};

use crate::error::{Error, Result};

/// Lines kept in memory before a run is spilled, unless told otherwise: about 20–30 MB of ref names.
pub const DEFAULT_SPILL_LINES: usize = 200_000;

/// The lines to keep in memory for a caller's `spill_lines` (0: the default).
pub(crate) fn limit(spill_lines: usize) -> usize {
    match spill_lines {
        0 => DEFAULT_SPILL_LINES,
        n => n,
    }
}

/// Runs merged at once: past it, the runs spilled so far are merged into one, so the files (and read
/// buffers) open at a time stay bounded however many lines come.
const MAX_RUNS: usize = 64;

/// Lines collected in any order, read back sorted (duplicates kept).
#[derive(Debug)]
pub(crate) struct SortedLines {
    limit: usize,
    run: Vec<String>,
    spilled: Vec<File>,
    lines: u64,
}

impl Default for SortedLines {
    fn default() -> Self {
        SortedLines::new(DEFAULT_SPILL_LINES)
    }
}

/// A sorted stream of lines read back from a [`SortedLines`] (blocking: read it off the runtime).
pub(crate) type Merged = Box<dyn Iterator<Item = io::Result<String>> + Send>;

fn spill_error(e: io::Error) -> Error {
    Error::io(
        "spill the janitor's sorted run to a temp file",
        std::env::temp_dir(),
        e,
    )
}

impl SortedLines {
    /// Keep at most `limit` lines in memory (at least one).
    pub(crate) fn new(limit: usize) -> Self {
        SortedLines {
            limit: limit.max(1),
            run: Vec::new(),
            spilled: Vec::new(),
            lines: 0,
        }
    }

    /// Lines pushed so far.
    pub(crate) fn len(&self) -> u64 {
        self.lines
    }

    /// Runs written to temp files so far.
    pub(crate) fn runs_spilled(&self) -> usize {
        self.spilled.len()
    }

    /// Add a line (it must hold no newline).
    pub(crate) async fn push(&mut self, line: String) -> Result<()> {
        debug_assert!(!line.contains('\n'));
        self.run.push(line);
        self.lines += 1;
        if self.run.len() >= self.limit {
            let run = std::mem::take(&mut self.run);
            let mut spilled = std::mem::take(&mut self.spilled);
            self.spilled = tokio::task::spawn_blocking(move || {
                spilled.push(write_run(run)?);
                compact(spilled)
            })
            .await
            .map_err(|e| spill_error(io::Error::other(e)))?
            .map_err(spill_error)?;
        }
        Ok(())
    }

    /// [`SortedLines::push`] off the runtime (spills on the calling thread).
    pub(crate) fn push_blocking(&mut self, line: String) -> io::Result<()> {
        self.run.push(line);
        self.lines += 1;
        if self.run.len() >= self.limit {
            self.spilled.push(write_run(std::mem::take(&mut self.run))?);
            self.spilled = compact(std::mem::take(&mut self.spilled))?;
        }
        Ok(())
    }

    /// Every line pushed, in sorted order (blocking I/O: call it off the runtime).
    pub(crate) fn into_sorted(self) -> Merged {
        let mut run = self.run;
        run.sort_unstable();
        if self.spilled.is_empty() {
            return Box::new(run.into_iter().map(Ok));
        }
        let mut sources = readers(self.spilled);
        sources.push(Box::new(run.into_iter().map(Ok)));
        Box::new(Merge::new(sources))
    }
}

fn write_run(mut run: Vec<String>) -> io::Result<File> {
    run.sort_unstable();
    write_sorted(run.into_iter().map(Ok))
}

/// Write sorted lines to a fresh unnamed temp file, rewound for reading.
fn write_sorted(lines: impl Iterator<Item = io::Result<String>>) -> io::Result<File> {
    let mut file = tempfile::tempfile()?;
    let mut out = BufWriter::new(&mut file);
    for line in lines {
        out.write_all(line?.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    drop(out);
    file.rewind()?;
    Ok(file)
}

/// The runs `spilled`, merged into one once there are [`MAX_RUNS`].
fn compact(spilled: Vec<File>) -> io::Result<Vec<File>> {
    if spilled.len() < MAX_RUNS {
        return Ok(spilled);
    }
    let merged = write_sorted(Merge::new(readers(spilled)))?;
    Ok(vec![merged])
}

/// Read buffers of one merge, shared among its runs: however many runs there are (up to
/// [`MAX_RUNS`]), a merge holds about this much, each run's buffer between 4 and 64 KiB.
const MERGE_BUFFER_BYTES: usize = 256 << 10;

fn readers(files: Vec<File>) -> Vec<Merged> {
    let each = (MERGE_BUFFER_BYTES / files.len().max(1)).clamp(4 << 10, 64 << 10);
    files
        .into_iter()
        .map(|f| Box::new(BufReader::with_capacity(each, f).lines()) as Merged)
        .collect()
}

/// A k-way merge of sorted sources.
struct Merge {
    sources: Vec<Merged>,
    heads: BinaryHeap<Reverse<(String, usize)>>,
    failed: Option<io::Error>,
}

impl Merge {
    fn new(sources: Vec<Merged>) -> Self {
        let mut merge = Merge {
            sources,
            heads: BinaryHeap::new(),
            failed: None,
        };
        for i in 0..merge.sources.len() {
            merge.advance(i);
        }
        merge
    }

    fn advance(&mut self, source: usize) {
        match self.sources[source].next() {
            Some(Ok(line)) => self.heads.push(Reverse((line, source))),
            Some(Err(e)) => self.failed = Some(e),
            None => {}
        }
    }
}

impl Iterator for Merge {
    type Item = io::Result<String>;

    fn next(&mut self) -> Option<io::Result<String>> {
        if let Some(e) = self.failed.take() {
            self.heads.clear();
            return Some(Err(e));
        }
        let Reverse((line, source)) = self.heads.pop()?;
        self.advance(source);
        Some(Ok(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sorted(lines: &[String], limit: usize) -> (Vec<String>, usize) {
        let mut spill = SortedLines::new(limit);
        for l in lines {
            spill.push(l.clone()).await.unwrap();
        }
        assert_eq!(spill.len(), lines.len() as u64);
        let runs = spill.runs_spilled();
        let out = tokio::task::spawn_blocking(move || {
            spill.into_sorted().collect::<io::Result<Vec<_>>>().unwrap()
        })
        .await
        .unwrap();
        (out, runs)
    }

    #[tokio::test]
    async fn lines_come_back_sorted_whether_kept_in_memory_or_spilled() {
        // A deterministic shuffle with duplicates.
        let lines: Vec<String> = (0..1000u64)
            .map(|i| format!("object://blobs/{:04}", (i * 7919) % 600))
            .collect();
        let mut expected = lines.clone();
        expected.sort();
        for limit in [1, 7, 100, 999, 1000, 5000] {
            let (out, runs) = sorted(&lines, limit).await;
            assert_eq!(out, expected, "limit {limit}");
            let runs_written = 1000 / limit;
            let expected_runs = if runs_written < MAX_RUNS {
                runs_written
            } else {
                // Compacted into one each time MAX_RUNS pile up.
                1 + (runs_written - MAX_RUNS) % (MAX_RUNS - 1)
            };
            assert_eq!(runs, expected_runs, "limit {limit}");
        }
    }

    #[tokio::test]
    async fn nothing_in_nothing_out() {
        assert_eq!(sorted(&[], 3).await, (vec![], 0));
    }
}
