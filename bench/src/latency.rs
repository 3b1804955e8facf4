//! Latency histograms (hdrhistogram, microseconds) and their summary.

use hdrhistogram::Histogram;
use serde::Serialize;

/// A histogram of microseconds from 1 µs to 60 s at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// A latency-by-percentile curve: (percentile in `[0, 100]`, µs), HdrHistogram's
/// percentile distribution with 5 steps per halving of the distance to 100 %.
pub type PercentileCurve = Vec<(f64, u64)>;

pub fn percentile_curve(h: &Histogram<u64>) -> PercentileCurve {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_quantiles(5)
        .map(|v| (v.quantile_iterated_to() * 100.0, v.value_iterated_to()))
        .collect()
}

/// The histogram as HdrHistogram's percentile distribution text (`.hgrm`, values in
/// milliseconds), which HdrHistogram's plotter and most latency tooling read.
pub fn hgrm(h: &Histogram<u64>) -> String {
    use std::fmt::Write;
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to();
            // Recordings at or below this value.
            let total = h.count_between(0, value);
            let _ = write!(out, "{:12.3} {q:14.12} {total:10}", value as f64 / 1000.0);
            if q < 1.0 {
                let _ = write!(out, " {:14.2}", 1.0 / (1.0 - q));
            }
            out.push('\n');
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    out
}

/// Histograms of microseconds as an HdrHistogram interval log (`.hlog`: V2 compressed
/// histograms, values in milliseconds), one interval from `started` lasting `run` per
/// histogram, tagged with its name. HdrHistogram's `HistogramLogProcessor` and the
/// other HdrHistogram ports read it.
pub fn hlog(
    histograms: &[&(&str, Histogram<u64>)],
    started: std::time::SystemTime,
    run: std::time::Duration,
) -> anyhow::Result<Vec<u8>> {
    use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
    use hdrhistogram::serialization::V2DeflateSerializer;
    let mut out = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    let mut log = IntervalLogWriterBuilder::new()
        .with_start_time(started)
        .with_base_time(started)
        .with_max_value_divisor(1000.0)
        .begin_log_with(&mut out, &mut serializer)
        .map_err(|e| anyhow::anyhow!("starting the log: {e}"))?;
    for (name, h) in histograms {
        let tag = Tag::new(name).ok_or_else(|| anyhow::anyhow!("{name:?} cannot be a tag"))?;
        log.write_histogram(h, std::time::Duration::ZERO, run, Some(tag))
            .map_err(|e| anyhow::anyhow!("writing {name}: {e}"))?;
    }
    drop(log);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_distribution_climbs_to_the_max_and_counts_everything() {
        let mut h = histogram();
        for us in 1..=1000 {
            h.record(us).expect("in range");
        }
        let curve = percentile_curve(&h);
        assert!(curve
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        let last = curve.last().expect("points");
        assert_eq!(last.0, 100.0);
        assert_eq!(last.1, h.max());
        let text = hgrm(&h);
        let rows: Vec<Vec<f64>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| {
                l.split_whitespace()
                    .map(|f| f.parse().expect("a number"))
                    .collect()
            })
            .collect();
        assert_eq!(rows.len(), curve.len());
        // Values in ms, the last row holds every recording and has no 1/(1-p).
        let last = rows.last().expect("rows");
        assert_eq!(last.len(), 3);
        assert!((last[0] - 1.0).abs() < 0.01, "{last:?}");
        assert_eq!(last[2], 1000.0);
        assert!(rows[rows.len() - 2].len() == 4);
        assert!(text.contains("Total count    =         1000"), "{text}");
    }

    #[test]
    fn an_hlog_reads_back_as_the_histograms_it_was_written_from() {
        use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
        use hdrhistogram::serialization::Deserializer;
        let mut reads = histogram();
        let mut writes = histogram();
        for v in 1..=1000u64 {
            reads.record(v * 10).expect("in range");
            writes.record(v * 1000).expect("in range");
        }
        let (a, b) = (("reads", reads), ("writes", writes));
        let bytes = hlog(
            &[&a, &b],
            std::time::SystemTime::now(),
            std::time::Duration::from_secs(10),
        )
        .expect("log");
        let text = std::str::from_utf8(&bytes).expect("text");
        assert!(text.contains("#[MaxValueDivisor: 1000.000]"), "{text}");
        let mut found = Vec::new();
        for entry in IntervalLogIterator::new(&bytes) {
            if let Ok(LogEntry::Interval(interval)) = entry {
                let decoded: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut base64_decoded(interval.encoded_histogram()).as_slice())
                    .expect("decodes");
                found.push((interval.tag().map(|t| t.as_str().to_string()), decoded));
            }
        }
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0.as_deref(), Some("reads"));
        assert_eq!(found[0].1, a.1);
        assert_eq!(found[1].0.as_deref(), Some("writes"));
        assert_eq!(found[1].1, b.1);
    }

    fn base64_decoded(text: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64")
    }
}
