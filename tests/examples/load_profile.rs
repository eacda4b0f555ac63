//! Times one policy load step by step, for profiling (BENCHMARKS.md target 3: 10,000 rules
//! loaded in 100 ms): reading and checking the YAML (`policy::load_files`), compiling it into
//! map entries (`compile::compile`), and, with `--apply` (as root), putting it into the kernel
//! as a new generation (`pipeline::apply`) in a scratch [`Sandbox`] (its own cgroup and pin
//! directory, removed at the end).
//!
//! The policies are the reload benchmark's (`tests/benches/reload/policies.rs`, included
//! here): one `kind: EgressRule` document per rule, a /32 each in 198.18.0.0/15 (never
//! connected to; nothing here connects anywhere) and a last rule for one of the two test
//! destinations, alternating from run to run as the reloads do.
//!
//! Example: cargo run --release -p egress-tests --example load_profile -- 10000 --runs 20 --apply

#[path = "../benches/reload/policies.rs"]
#[expect(
    dead_code,
    reason = "the example needs the policy text only, not the bench's directory handling"
)]
mod policies;

use std::time::{Duration, Instant};

use egress_tests::Sandbox;
use egress_user::{
    compile::{self, StoredRows},
    pipeline, policy,
};
use policies::{Allowed, yaml};

/// Median, min and max in milliseconds.
/// The first run is left out: it is a fresh start (no pins yet) and warms the caches.
fn summary(samples: &mut Vec<Duration>) -> String {
    if samples.len() > 1 {
        samples.remove(0);
    }
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "median {:7.2} ms  min {:7.2}  max {:7.2}",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1])
    )
}

fn main() {
    let mut rules = 10_000;
    let mut runs = 10;
    let mut apply = false;
    let mut only_parse = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).expect("--runs N"),
            "--apply" => apply = true,
            "--only-parse" => only_parse = true,
            n => rules = n.parse().expect("a number of rules"),
        }
    }
    let dir = tempfile::tempdir().expect("creating the scratch directory");
    let files = [Allowed::A, Allowed::B].map(|allowed| {
        let file = dir.path().join(format!("{allowed:?}.yaml"));
        std::fs::write(&file, yaml(rules, 1, allowed)).expect("writing the policy");
        file
    });

    let sandbox = apply.then(Sandbox::new);
    let target = sandbox.as_ref().map(Sandbox::target);
    let mut enforcer = None;
    let (mut load, mut comp, mut kernel, mut total) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let started = Instant::now();
        let policy = policy::load_files(&[files[run % 2].clone()]).expect("the policy loads");
        load.push(started.elapsed());
        if only_parse {
            continue;
        }
        let at = Instant::now();
        let compiled = compile::compile(&policy, &StoredRows::default(), 1).expect("compiles");
        comp.push(at.elapsed());
        drop(compiled);
        if let Some(target) = &target {
            let at = Instant::now();
            let next = pipeline::apply(target, &policy).expect("the kernel takes it");
            // As the agent does: the old generation is dropped before the answer.
            drop(enforcer.replace(next));
            kernel.push(at.elapsed());
        }
        total.push(started.elapsed());
    }
    println!("{rules} rules, {runs} runs");
    println!("load_files (read, parse, validate): {}", summary(&mut load));
    if !only_parse {
        println!("compile (no stored rows):           {}", summary(&mut comp));
        if !kernel.is_empty() {
            println!(
                "pipeline::apply (incl. compile):    {}",
                summary(&mut kernel)
            );
        }
        println!(
            "total:                              {}",
            summary(&mut total)
        );
    }
    // The enforcer goes before its sandbox (pins, cgroup) does.
    drop(enforcer);
    drop(sandbox);
}
