//! Builds the kernel programs (`egress-ebpf`) for `bpfel-unknown-none` with aya-build; the
//! object lands in `OUT_DIR/egress-ebpf` and `loader` embeds it with `include_bytes_aligned!`.
//!
//! Needs the nightly toolchain with rust-src and bpf-linker on PATH: `cargo xtask setup`
//! installs both.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("egress-user has no parent directory"))?
        .join("egress-ebpf");
    let root_dir = metadata_root
        .to_str()
        .context("egress-ebpf path is not UTF-8")?;
    let ebpf = Package {
        name: "egress-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default()).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the nightly \
         rust-src component and bpf-linker",
    )
}
