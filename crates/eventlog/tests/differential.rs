//! The disk log against the memory log, operation by operation: random appends (some too
//! large), reads with random limits, every kind of position, clock steps (some backwards),
//! retention by age and size, and reopening the disk log. The two backends size records and
//! segments alike, so every answer must be identical.

use std::sync::Arc;
use std::time::Duration;

use twinhub_eventlog::{
    Clock, DiskLog, Error, EventLog, LogOptions, ManualClock, MemoryLog, NewEvent, Position,
};

const T0: i64 = 1_700_000_000_000;

/// xorshift64*: a small deterministic generator, so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, low: i64, high: i64) -> i64 {
        low + self.below((high - low + 1) as u64) as i64
    }
}

fn same<T: PartialEq + std::fmt::Debug>(
    step: usize,
    what: &str,
    disk: &Result<T, Error>,
    memory: &Result<T, Error>,
) {
    match (disk, memory) {
        (Ok(d), Ok(m)) => assert_eq!(d, m, "step {step}: {what}"),
        (Err(d), Err(m)) => assert_eq!(
            std::mem::discriminant(d),
            std::mem::discriminant(m),
            "step {step}: {what}: {d} vs {m}"
        ),
        _ => panic!("step {step}: {what}: disk {disk:?}, memory {memory:?}"),
    }
}

async fn run(seed: u64) {
    let mut rng = Rng(seed);
    let clock = Arc::new(ManualClock::new(T0));
    let options = LogOptions {
        partitions: 3,
        segment_bytes: 2048,
        retention: Duration::from_secs(30),
        retention_bytes: Some(12 * 1024),
        max_event_bytes: 3_000,
        // Small, so that reads come from both the cache and the files.
        tail_cache_bytes: 600,
        clock: Arc::clone(&clock) as _,
    };
    let tmp = tempfile::tempdir().unwrap();
    let memory = MemoryLog::new(options.clone()).unwrap();
    let mut disk = DiskLog::open(tmp.path(), options.clone()).unwrap();
    let mut offsets: Vec<u64> = vec![0];
    // What the run went through, so that a seed that exercises nothing is noticed.
    let (mut too_large, mut reads, mut dropped, mut reopens) = (0, 0, 0, 0);

    for step in 0..500 {
        let partition = rng.below(3) as u32;
        let next_seq = memory.info(partition).unwrap().last_sequence + 1;
        match rng.below(100) {
            0..=44 => {
                let batch: Vec<NewEvent> = (0..rng.below(6))
                    .map(|i| {
                        let size = match rng.below(20) {
                            0 => 2_900 + rng.below(200),
                            1..=3 => 300 + rng.below(900),
                            _ => rng.below(60),
                        };
                        NewEvent::new(vec![(step + i as usize) as u8; size as usize])
                    })
                    .collect();
                let d = disk.append(partition, batch.clone()).await;
                let m = memory.append(partition, batch).await;
                same(step, "append", &d, &m);
                too_large += usize::from(matches!(d, Err(Error::TooLarge { .. })));
                if let Ok(appended) = d {
                    offsets.extend(appended.iter().map(|a| a.offset));
                }
            }
            45..=64 => {
                let next = rng.range(-3, next_seq + 3);
                let max_events = rng.below(25) as usize;
                let max_bytes = match rng.below(3) {
                    0 => usize::MAX,
                    _ => rng.below(4_000) as usize,
                };
                let d = disk.read(partition, next, max_events, max_bytes).await;
                let m = memory.read(partition, next, max_events, max_bytes).await;
                same(
                    step,
                    &format!("read({partition}, {next}, {max_events}, {max_bytes})"),
                    &d,
                    &m,
                );
                reads += usize::from(d.is_ok_and(|events| events.len() > 1));
            }
            65..=79 => {
                let inclusive = rng.below(2) == 0;
                let from = match rng.below(5) {
                    0 => Position::Earliest,
                    1 => Position::Latest,
                    2 => Position::Sequence {
                        sequence: rng.range(-2, next_seq + 2),
                        inclusive,
                    },
                    3 => Position::Offset {
                        offset: offsets[rng.below(offsets.len() as u64) as usize]
                            .saturating_add(rng.below(3))
                            .saturating_sub(1),
                        inclusive,
                    },
                    _ => Position::EnqueuedTime {
                        ms: clock.now_ms() - rng.range(-1_000, 60_000),
                        inclusive,
                    },
                };
                let d = disk.resolve(partition, &from);
                let m = memory.resolve(partition, &from);
                same(step, &format!("resolve({partition}, {from:?})"), &d, &m);
                same(step, "info", &disk.info(partition), &memory.info(partition));
            }
            80..=86 => clock.advance(rng.range(-5_000, 20_000)),
            87..=92 => {
                let now = clock.now_ms();
                let d = disk.enforce_retention(now).await;
                let m = memory.enforce_retention(now).await;
                same(step, "enforce_retention", &d, &m);
                dropped += d.unwrap_or(0);
            }
            _ => {
                disk.close().await;
                drop(disk);
                disk = DiskLog::open(tmp.path(), options.clone()).unwrap();
                reopens += 1;
            }
        }
    }
    for partition in 0..3 {
        let d = disk.read(partition, 0, usize::MAX, usize::MAX).await;
        let m = memory.read(partition, 0, usize::MAX, usize::MAX).await;
        same(usize::MAX, "final read", &d, &m);
        same(
            usize::MAX,
            "final info",
            &disk.info(partition),
            &memory.info(partition),
        );
    }
    disk.close().await;
    println!(
        "seed {seed}: {too_large} too large, {reads} reads, {dropped} dropped, {reopens} reopens"
    );
    assert!(
        too_large > 0 && reads > 20 && dropped > 0 && reopens > 2,
        "seed {seed} exercised too little"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_and_memory_agree() {
    for seed in [1, 2, 3, 0x5eed, 0xdead_beef] {
        run(seed).await;
    }
}
