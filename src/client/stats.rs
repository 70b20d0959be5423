//! Counters of the client engine and the latency histogram behind its percentiles, and
//! their rendering as the `.stats` file: one `name value` a line, for people and scripts.

use std::fmt;
use std::time::Duration;

/// Latencies in microseconds, in buckets of 1/8 of a power of two: percentiles within
/// about 10%, in constant memory, from 1 µs to over an hour.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
}

const SUB: u32 = 8;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; 64 * SUB as usize],
            total: 0,
            max_us: 0,
        }
    }
}

impl Histogram {
    fn bucket(us: u64) -> usize {
        if us < SUB as u64 {
            return us as usize;
        }
        let exp = 63 - us.leading_zeros(); // us >= 8, so exp >= 3
        let sub = (us >> (exp - 3)) & (SUB as u64 - 1);
        (exp * SUB) as usize + sub as usize - 16
    }

    /// Upper bound of a bucket's values.
    fn bucket_top(index: usize) -> u64 {
        if index < SUB as usize {
            return index as u64;
        }
        let i = index + 16;
        let (exp, sub) = (i as u32 / SUB, i as u64 % SUB as u64);
        let top = ((SUB as u64 + sub + 1) as u128) << (exp - 3);
        (top - 1).min(u64::MAX as u128) as u64
    }

    pub fn record(&mut self, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        let last = self.counts.len() - 1;
        self.counts[Self::bucket(us).min(last)] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The latency below which `p` (0..=1) of the samples lie, in microseconds.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::bucket_top(i).min(self.max_us);
            }
        }
        self.max_us
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max_us
    }
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub connected: bool,
    /// The export's size in bytes; it grows when the export does.
    pub size: u64,
    pub in_flight: usize,
    pub in_flight_bytes: usize,
    /// Highest `in_flight_bytes` seen: shows that the window bounds memory.
    pub max_in_flight_bytes: usize,
    pub requests: u64,
    pub resends: u64,
    pub reconnects: u64,
    pub failures: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub latency: Histogram,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency;
        writeln!(f, "connected {}", self.connected as u8)?;
        writeln!(f, "size {}", self.size)?;
        writeln!(f, "in_flight {}", self.in_flight)?;
        writeln!(f, "in_flight_bytes {}", self.in_flight_bytes)?;
        writeln!(f, "max_in_flight_bytes {}", self.max_in_flight_bytes)?;
        writeln!(f, "requests {}", self.requests)?;
        writeln!(f, "resends {}", self.resends)?;
        writeln!(f, "reconnects {}", self.reconnects)?;
        writeln!(f, "failures {}", self.failures)?;
        writeln!(f, "bytes_read {}", self.bytes_read)?;
        writeln!(f, "bytes_written {}", self.bytes_written)?;
        writeln!(f, "latency_p50_us {}", l.percentile(0.50))?;
        writeln!(f, "latency_p90_us {}", l.percentile(0.90))?;
        writeln!(f, "latency_p99_us {}", l.percentile(0.99))?;
        writeln!(f, "latency_max_us {}", l.max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_tops_bound_their_values() {
        let mut last = 0;
        for us in (0..100_000u64).chain([1 << 40, u64::MAX / 2]) {
            let b = Histogram::bucket(us);
            assert!(b >= last, "bucket order at {us}");
            assert!(
                Histogram::bucket_top(b) >= us,
                "top of bucket {b} below {us}"
            );
            last = b;
        }
    }

    #[test]
    fn percentiles_are_within_an_eighth() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        for (p, want) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = h.percentile(p) as f64;
            assert!((got - want).abs() / want < 0.125, "p{p}: {got} vs {want}");
        }
        assert_eq!(h.percentile(1.0), 1000);
        assert_eq!(h.count(), 1000);
    }

    #[test]
    fn empty_histogram_reports_zero() {
        assert_eq!(Histogram::default().percentile(0.99), 0);
    }

    #[test]
    fn display_is_name_value_lines() {
        let s = Stats {
            resends: 3,
            ..Stats::default()
        }
        .to_string();
        assert!(s.lines().all(|l| l.split(' ').count() == 2), "{s}");
        assert!(s.contains("resends 3\n"));
    }
}
