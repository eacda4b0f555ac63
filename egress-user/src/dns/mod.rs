//! DNS on the workloads' path, for FQDN rules: the agent receives each query a workload sends,
//! forwards it to the resolver, reads the answer, allows the answered addresses in the kernel,
//! and only then releases the answer to the workload.
//!
//! [`message`] is the pure part of that path: parsing a workload's query, learning from the
//! resolver's answer what it says about that query (the CNAME chain and the addresses at its
//! end, with their TTLs), and building the SERVFAIL the workload gets when nothing can be
//! learned. It does no I/O, so every rule about which records are trusted is unit-tested here.

#![forbid(unsafe_code)]

pub mod message;

pub use message::{
    Answer, MAX_CNAME_HOPS, MessageError, Query, cap_ttls, parse_answer, parse_query, servfail,
};
