//! Metric 2: the connect4 program's run time per invocation, with `BPF_ENABLE_STATS`.

use aya::{
    programs::{
        ProgramInfo,
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
    sys::{Stats, enable_stats},
};
use egress_user::loader::PinDir;

use crate::{Options, contender::Contender};

/// The connect4 program behind a contender's pinned link.
pub fn connect4_program_id(c: &Contender) -> u32 {
    let path = PinDir::new(&c.sandbox.pin_dir).link(egress_common::programs::CONNECT4);
    let link: FdLink = PinnedLink::from_pin(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        .into();
    link.info()
        .unwrap_or_else(|e| panic!("link info of {}: {e}", path.display()))
        .program_id()
}

/// The kernel's current view of program `id`, run time and run count included.
pub fn program_info(id: u32) -> ProgramInfo {
    loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .unwrap_or_else(|| panic!("program id {id} is not loaded"))
}

/// One contender's program run time per invocation in each round, in ns.
pub struct RunTime {
    /// The contender.
    pub name: String,
    /// `run_time_ns / run_cnt` of each block.
    pub per_run_ns: Vec<f64>,
    /// Program runs measured in all.
    pub runs: u64,
    /// Keys in the contender's trie, and whether its connects are denied.
    pub keys: usize,
    pub denied: bool,
}

/// Runs `--stats-rounds` blocks per contender with stats on and returns, per contender, the
/// program's `run_time_ns / run_cnt` over each block. Stats go off again on return.
pub fn measure_run_time(
    contenders: &mut [&mut Contender],
    options: &Options,
    client_cpu: Option<usize>,
) -> Vec<RunTime> {
    let _stats = enable_stats(Stats::RunTime).unwrap_or_else(|e| panic!("BPF_ENABLE_STATS: {e}"));
    let mut results: Vec<RunTime> = contenders
        .iter()
        .map(|c| RunTime {
            name: c.name.clone(),
            per_run_ns: Vec::new(),
            runs: 0,
            keys: c.keys,
            denied: c.expect == crate::contender::Expect::Denied,
        })
        .collect();
    let ids: Vec<u32> = contenders.iter().map(|c| connect4_program_id(c)).collect();
    for c in contenders.iter_mut() {
        c.begin();
    }
    for _ in 0..options.stats_rounds {
        for (i, c) in contenders.iter_mut().enumerate() {
            let before = program_info(ids[i]);
            let round = c.block(client_cpu, c.warmup, options.count, options.budget_ms);
            let after = program_info(ids[i]);
            let runs = after.run_count() - before.run_count();
            assert_eq!(
                runs, round.total,
                "{}: the program ran {runs} times for {} connects",
                c.name, round.total
            );
            let ns = (after.run_time() - before.run_time()).as_nanos() as f64;
            results[i].per_run_ns.push(ns / runs as f64);
            results[i].runs += runs;
        }
    }
    for c in contenders.iter() {
        c.verify();
    }
    results
}
