//! Empty on purpose: `egress-user` has a build-dependency on this package so that cargo
//! rebuilds the agent when the kernel programs change; the programs are the `egress-ebpf`
//! binary target, built for `bpfel-unknown-none` by `egress-user/build.rs`.
#![no_std]
