//! Measures redb commit throughput: 10,000 single-write commits from 256 concurrent tasks
//! (group commit) against the same number from one task, one after another.
//!
//! Run with `cargo run --release -p twinhub-store --example commit_rate [DIR]`; DIR (default: a
//! temporary directory) should be on the disk whose fsync cost is of interest.

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinhub_store::{RedbStore, Store, StoreStats, Table, Write};

const COMMITS: usize = 10_000;
const TASKS: usize = 256;

fn commit_of(i: usize) -> Vec<Write> {
    vec![Write::put(
        Table::Devices,
        format!("device-{i:05}"),
        format!("{{\"$version\":{i}}}").into_bytes(),
    )]
}

async fn concurrent(store: Arc<RedbStore>) -> Result<Duration, Box<dyn Error>> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                // Task t commits t, t + TASKS, t + 2 * TASKS, ...
                for i in (task..COMMITS).step_by(TASKS) {
                    store.commit(commit_of(i)).await?;
                }
                Ok::<_, twinhub_store::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

async fn sequential(store: &RedbStore) -> Result<Duration, Box<dyn Error>> {
    let started = Instant::now();
    for i in 0..COMMITS {
        store.commit(commit_of(i)).await?;
    }
    Ok(started.elapsed())
}

fn report(label: &str, elapsed: Duration, stats: StoreStats) -> f64 {
    let rate = COMMITS as f64 / elapsed.as_secs_f64();
    println!(
        "{label:<28} {rate:>10.0} commits/s  ({:.2?}, {} transactions, {:.1} batches/transaction)",
        elapsed,
        stats.transactions,
        stats.batches as f64 / stats.transactions.max(1) as f64
    );
    rate
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let temp = tempfile::tempdir()?;
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| temp.path().to_path_buf(), PathBuf::from);

    let store = Arc::new(RedbStore::open(&dir.join("concurrent.redb"))?);
    let elapsed = concurrent(Arc::clone(&store)).await?;
    let grouped = report(
        &format!("{TASKS} tasks, group commit"),
        elapsed,
        store.stats(),
    );
    store.close().await?;

    let store = RedbStore::open(&dir.join("sequential.redb"))?;
    let elapsed = sequential(&store).await?;
    let single = report("1 task, sequential", elapsed, store.stats());
    store.close().await?;

    println!("ratio: {:.1}x", grouped / single);
    Ok(())
}
