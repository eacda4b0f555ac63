//! The egress agent and CLI as a library, so that the `tests` crate can drive it.
//!
//! Modules follow a connection's policy from file to kernel: [`policy`] parses, validates and
//! normalises the YAML; [`compile`] turns a policy into map entries; [`loader`] loads, attaches
//! and pins the kernel programs and writes the maps; [`cli`] is one file per verb.

pub mod agent;
pub mod cgroup;
pub mod cgroupns;
pub mod cli;
pub mod cluster;
pub mod compile;
pub mod control;
pub mod cri;
pub mod dns;
pub mod fds;
pub mod loader;
pub use loader::events;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod sched;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod testing;
