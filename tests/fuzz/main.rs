//! Fuzzing every decoder that takes outside bytes, on stable Rust: seeded mutations of
//! valid messages (`mutate.rs`) fed to each target (`targets.rs`), panics caught and
//! counted. `cargo test` runs a short pass (FUZZ_INPUTS, default 20,000 per target);
//! `benches/fuzz --inputs N [--json FILE]` runs this same test in release with N inputs
//! each and writes `{TARGET: {"inputs", "panics", "inputs_per_s"}}`.

mod mutate;
mod targets;

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

struct Outcome {
    inputs: u64,
    panics: u64,
    seconds: f64,
    /// The first input that panicked, for reproduction.
    first_panic: Option<Vec<u8>>,
}

fn run(target: &targets::Target, inputs: u64, seed: u64) -> Outcome {
    let mut mutator = mutate::Mutator::new(seed, target.seeds.clone());
    let mut input = Vec::new();
    let mut panics = 0;
    let mut first_panic = None;
    let started = Instant::now();
    for _ in 0..inputs {
        mutator.next_into(&mut input);
        if catch_unwind(AssertUnwindSafe(|| (target.check)(&input))).is_err() {
            panics += 1;
            first_panic.get_or_insert_with(|| input.clone());
        }
    }
    Outcome {
        inputs,
        panics,
        seconds: started.elapsed().as_secs_f64(),
        first_panic,
    }
}

#[test]
fn no_decoder_panics_on_outside_bytes() {
    let inputs: u64 = std::env::var("FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // Caught panics are counted, not printed (millions of inputs).
    std::panic::set_hook(Box::new(|_| {}));
    let all = targets::all();
    let queue = Mutex::new(all.iter().collect::<Vec<_>>());
    let results = Mutex::new(BTreeMap::new());
    // One worker per core.
    std::thread::scope(|scope| {
        for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
            scope.spawn(|| {
                while let Some(target) = queue.lock().unwrap().pop() {
                    let outcome = run(target, inputs, seed);
                    results.lock().unwrap().insert(target.name, outcome);
                }
            });
        }
    });
    let _ = std::panic::take_hook();
    let results = results.into_inner().unwrap();
    let mut report = serde_json::Map::new();
    for (name, o) in &results {
        let rate = o.inputs as f64 / o.seconds.max(1e-9);
        println!(
            "{name:18} {:>11} inputs {:>10.0} inputs/s {} panics",
            o.inputs, rate, o.panics
        );
        if let Some(input) = &o.first_panic {
            println!("  first panicking input (hex): {}", hex::encode(input));
        }
        report.insert(
            name.to_string(),
            json!({ "inputs": o.inputs, "panics": o.panics, "inputs_per_s": rate.round() }),
        );
    }
    if let Some(path) = std::env::var("FUZZ_JSON").ok().filter(|p| !p.is_empty()) {
        std::fs::write(&path, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    }
    let panicked: Vec<_> = results
        .iter()
        .filter(|(_, o)| o.panics > 0)
        .map(|(n, _)| *n)
        .collect();
    assert!(panicked.is_empty(), "decoders panicked: {panicked:?}");
    assert_eq!(results.len(), targets::all().len(), "every target ran");
}
