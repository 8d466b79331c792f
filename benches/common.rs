//! Shared by the benches: per-sample timings kept beside criterion's own statistics, so each bench can
//! print medians and contender/baseline ratios measured in the same run.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sample timings keyed by (case, contender).
type Timings = BTreeMap<(String, &'static str), Vec<Duration>>;

/// Timings per (size or case, contender).
#[derive(Clone, Debug, Default)]
pub struct Samples(Arc<Mutex<Timings>>);

impl Samples {
    /// Time `op` once and record it under `(case, contender)`.
    pub fn time<T>(
        &self,
        case: &str,
        contender: &'static str,
        op: impl FnOnce() -> T,
    ) -> (Duration, T) {
        let start = Instant::now();
        let out = op();
        let took = start.elapsed();
        self.record(case, contender, took);
        (took, out)
    }

    /// Record a timing taken elsewhere (an async operation) under `(case, contender)`.
    pub fn record(&self, case: &str, contender: &'static str, took: Duration) {
        self.0
            .lock()
            .unwrap()
            .entry((case.to_owned(), contender))
            .or_default()
            .push(took);
    }

    /// Median of `(case, contender)`.
    pub fn median(&self, case: &str, contender: &'static str) -> Option<Duration> {
        let mut v = self
            .0
            .lock()
            .unwrap()
            .get(&(case.to_owned(), contender))?
            .clone();
        v.sort();
        v.get(v.len() / 2).copied()
    }

    /// Every sample of `case`, in the order taken, in milliseconds (with `OUTCACHE_BENCH_SAMPLES` set):
    /// a median hides whether a ratio moved in every round or in a few slow ones.
    fn print_samples(&self, case: &str, baseline: &'static str, contender: &'static str) {
        let timings = self.0.lock().unwrap();
        for who in [baseline, contender] {
            let ms: Vec<String> = timings
                .get(&(case.to_owned(), who))
                .map(|v| {
                    v.iter()
                        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
                        .collect()
                })
                .unwrap_or_default();
            println!("  {case:<12} {who} samples (ms): {}", ms.join(" "));
        }
    }

    /// Print `contender` against `baseline` for each case: medians as operations (or MB) per second, and
    /// the throughput ratio contender/baseline.
    pub fn print_ratio(
        &self,
        title: &str,
        cases: &[&str],
        baseline: &'static str,
        contender: &'static str,
        unit: impl Fn(&str) -> (f64, &'static str),
    ) {
        println!("\n{title}: {contender} vs {baseline} (medians)");
        for case in cases {
            let (Some(b), Some(c)) = (self.median(case, baseline), self.median(case, contender))
            else {
                continue;
            };
            let (amount, label) = unit(case);
            if std::env::var_os("OUTCACHE_BENCH_SAMPLES").is_some() {
                self.print_samples(case, baseline, contender);
            }
            println!(
                "  {case:<12} {baseline}: {:>10.0} {label}/s   {contender}: {:>10.0} {label}/s   ratio {:.2}",
                amount / b.as_secs_f64(),
                amount / c.as_secs_f64(),
                b.as_secs_f64() / c.as_secs_f64()
            );
        }
    }
}
