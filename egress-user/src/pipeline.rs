//! A policy's way into the kernel, in three stages whose inputs and outputs are types, each
//! testable alone, and data flowing one way:
//!
//! 1. [`Generation::open`]: the managed cgroup, the pins an earlier generation left, the rows
//!    it counts on ([`Generation::stored_rows`]) and the next generation's number, on a kernel
//!    whose features were assessed once, before anything was touched;
//! 2. [`compile::compile`]: the policy, those rows and that number become the entries of the
//!    kernel maps ([`Compiled`]), purely;
//! 3. [`Generation::fill`] then [`Filled::swap`](crate::loader::Filled::swap): the entries are
//!    written into fresh maps and swapped in behind the pinned links, which gives the
//!    [`Enforcer`] of the generation in force.
//!
//! The policy itself comes from its sources by [`crate::agent::sources::build`]. Neither the
//! loader nor the compiler calls the other: this module is where they meet.

#![forbid(unsafe_code)]

use crate::{
    compile::{self, CompileError, Compiled},
    loader::{
        Enforcer, Generation, LoadError, Target,
        features::{self, Assessment, Unsupported},
    },
    policy::Policy,
};

/// Why a policy could not be put in force. In every case the generation that was in force
/// before stays in force.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel lacks a feature the policy cannot be enforced without.
    #[error(transparent)]
    Kernel(#[from] Unsupported),
    /// The policy does not fit the kernel maps.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The kernel side failed.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Puts `policy` in force on `target` as a new generation, on a kernel that `kernel` assessed,
/// with `proxy_listeners` marked as the agent's before any program of the generation runs and
/// `pods` (each pod's cgroup id and namespace) in their namespaces' scopes.
///
/// # Errors
/// The policy does not fit the maps, or the kernel side failed; nothing was switched.
pub fn enforce(
    target: &Target,
    kernel: &Assessment,
    policy: &Policy,
    proxy_listeners: &[&std::net::TcpListener],
    pods: &[(u64, String)],
) -> Result<Enforcer, Error> {
    let generation = Generation::open(target, kernel, proxy_listeners)?;
    let compiled = compile_for(policy, &generation, pods)?;
    warn_shadowed(&compiled);
    Ok(generation.fill(compiled)?.swap()?)
}

/// [`compile::compile`] of `policy` against the rows `stored` as generation `number`, with
/// `pods` in their namespaces' scopes.
fn compile_with_pods(
    policy: &Policy,
    stored: &compile::StoredRows,
    number: u32,
    pods: &[(u64, String)],
) -> Result<Compiled, CompileError> {
    let mut compiled = compile::compile(policy, stored, number)?;
    compiled.scoped_cgroups = compile::scoped_cgroups(&compiled.scopes, pods);
    Ok(compiled)
}

/// [`compile_with_pods`] for the new generation `generation`.
fn compile_for(
    policy: &Policy,
    generation: &Generation<'_>,
    pods: &[(u64, String)],
) -> Result<Compiled, CompileError> {
    compile_with_pods(policy, generation.stored_rows(), generation.number(), pods)
}

/// How [`change`] put a policy in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Only the rules changed: new rule tries behind the programs in force.
    Rules,
    /// A whole new generation: new maps and programs, swapped in behind the links.
    Generation,
}

/// Puts `policy` in force in place of `current`'s policy: by new rule tries alone when only
/// the rules changed ([`Enforcer::swap_rules`], milliseconds), else as a new generation like
/// [`enforce`]. Either way the change is atomic: a `connect()` is judged by the old policy or
/// the new one, never a mix.
///
/// # Errors
/// As [`enforce`]; `current` stays in force.
pub fn change(
    current: &mut Enforcer,
    target: &Target,
    kernel: &Assessment,
    policy: &Policy,
    proxy_listeners: &[&std::net::TcpListener],
    pods: &[(u64, String)],
) -> Result<Way, Error> {
    let batch = kernel.has(features::Id::BatchOps);
    let number = crate::loader::next_generation(current.generation());
    let mut compiled = compile_with_pods(policy, current.stored_rows(), number, pods)?;
    if current.rules_only(&compiled) {
        warn_shadowed(&compiled);
        current.swap_rules(compiled, batch)?;
        return Ok(Way::Rules);
    }
    let generation = Generation::open(target, kernel, proxy_listeners)?;
    if generation.stored_rows() != current.stored_rows() || generation.number() != number {
        // The pins changed under the agent (`egress unload`, another agent): compile against
        // what they hold.
        compiled = compile_for(policy, &generation, pods)?;
    }
    warn_shadowed(&compiled);
    *current = generation.fill(compiled)?.swap()?;
    Ok(Way::Generation)
}

/// [`enforce`] without proxy listeners, after assessing this kernel for `target` (for tools,
/// benchmarks and tests that put a policy in force without an agent).
///
/// # Errors
/// As [`enforce`], and [`Error::Kernel`] when the kernel lacks a required feature; then
/// nothing was touched.
pub fn apply(target: &Target, policy: &Policy) -> Result<Enforcer, Error> {
    apply_with_pods(target, policy, &[])
}

/// [`apply`], with `pods` (each pod's cgroup id and namespace) in their namespaces' scopes.
///
/// # Errors
/// As [`apply`].
pub fn apply_with_pods(
    target: &Target,
    policy: &Policy,
    pods: &[(u64, String)],
) -> Result<Enforcer, Error> {
    let kernel = features::kernel().assess(!target.xdp_ifaces.is_empty())?;
    enforce(target, &kernel, policy, &[], pods)
}

/// Logs the rule keys an earlier rule already holds: connections are counted there.
fn warn_shadowed(compiled: &Compiled) {
    for s in &compiled.shadowed {
        tracing::warn!(rule = %s.rule, by = %s.by, key = %s.key, "rule key already allowed by an earlier rule; counted there");
    }
}
