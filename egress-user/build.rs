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
    // aya-build relays every line the nested cargo writes as `cargo:warning=`, so a cold
    // build printed ~35 `warning: ... Compiling core` lines that were no warnings. A quiet
    // nested cargo prints only what matters: its errors on stderr, and the compiler's own
    // warnings and errors, which aya-build relays from the JSON messages.
    // SAFETY: the build script is single-threaded here; nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([ebpf], Toolchain::default()).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the nightly \
         rust-src component and bpf-linker",
    )
}
