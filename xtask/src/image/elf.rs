//! Whether an executable is static, read from its ELF program headers.
//!
//! A `FROM scratch` image has no dynamic loader and no libraries, so the agent must need
//! neither: no `PT_INTERP` (the loader a dynamic executable names) and no `DT_NEEDED` entry
//! (a library to load). A static-pie executable, which rustc makes with `+crt-static`, still
//! has a `PT_DYNAMIC` segment for relocating itself, so that segment alone proves nothing.
//! Only what this check needs is parsed: 64-bit little-endian ELF (x86_64).

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail, ensure};

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

/// What an executable needs at run time from outside itself.
#[derive(Debug, PartialEq, Eq)]
pub struct Linkage {
    /// The program interpreter (`/lib64/ld-linux-x86-64.so.2`), if any.
    pub interpreter: Option<String>,
    /// How many `DT_NEEDED` libraries its dynamic section lists.
    pub needed: usize,
}

/// Fails, naming what it found, unless the executable at `path` is static.
pub fn require_static(path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let linkage = linkage(&bytes).with_context(|| format!("reading {} as ELF", path.display()))?;
    if let Some(interpreter) = &linkage.interpreter {
        bail!(
            "{} is not static: it names the program interpreter {interpreter} (PT_INTERP), \
             which a FROM scratch image does not have; it must be built with \
             `-C target-feature=+crt-static` for an explicit --target",
            path.display()
        );
    }
    ensure!(
        linkage.needed == 0,
        "{} is not static: its dynamic section needs {} shared libraries (DT_NEEDED)",
        path.display(),
        linkage.needed
    );
    Ok(())
}

/// Reads the interpreter and the needed libraries from ELF64 little-endian `bytes`.
pub fn linkage(bytes: &[u8]) -> Result<Linkage> {
    ensure!(bytes.get(..4) == Some(b"\x7fELF"), "no ELF magic");
    ensure!(bytes.get(4) == Some(&2), "not a 64-bit ELF file");
    ensure!(bytes.get(5) == Some(&1), "not a little-endian ELF file");
    let phoff = u64_at(bytes, 0x20)?;
    let phentsize = u64::from(u16_at(bytes, 0x36)?);
    let phnum = u64::from(u16_at(bytes, 0x38)?);
    ensure!(
        phentsize >= 56,
        "program header entries of {phentsize} bytes"
    );
    let mut linkage = Linkage {
        interpreter: None,
        needed: 0,
    };
    for index in 0..phnum {
        let header = offset(phoff + index * phentsize)?;
        let kind = u32_at(bytes, header)?;
        let file_offset = offset(u64_at(bytes, header + 8)?)?;
        let size = offset(u64_at(bytes, header + 32)?)?;
        let contents = bytes
            .get(file_offset..file_offset.saturating_add(size))
            .with_context(|| format!("program header {index} points past the end of the file"))?;
        match kind {
            PT_INTERP => {
                let name = contents.split(|&b| b == 0).next().unwrap_or_default();
                linkage.interpreter = Some(String::from_utf8_lossy(name).into_owned());
            }
            PT_DYNAMIC => {
                // Entries of (d_tag, d_val), 8 bytes each, up to DT_NULL.
                for entry in contents.chunks_exact(16) {
                    match u64_at(entry, 0)? {
                        DT_NULL => break,
                        DT_NEEDED => linkage.needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(linkage)
}

fn offset(value: u64) -> Result<usize> {
    usize::try_from(value).context("offset does not fit in memory")
}

fn u16_at(bytes: &[u8], at: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(field(bytes, at)?))
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(field(bytes, at)?))
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(field(bytes, at)?))
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N]> {
    bytes
        .get(at..at.saturating_add(N))
        .and_then(|slice| slice.try_into().ok())
        .with_context(|| format!("truncated: no {N} bytes at offset {at:#x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file: the header, then one program header per `(type, contents)`,
    /// then the contents.
    fn elf(segments: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        let count = u16::try_from(segments.len()).unwrap();
        bytes[0x38..0x3a].copy_from_slice(&count.to_le_bytes());
        let mut data_at = 64 + 56 * segments.len();
        let mut data: Vec<u8> = Vec::new();
        for (kind, contents) in segments {
            let mut header = vec![0u8; 56];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&(data_at as u64).to_le_bytes());
            header[32..40].copy_from_slice(&(contents.len() as u64).to_le_bytes());
            bytes.extend(header);
            data.extend(contents);
            data_at += contents.len();
        }
        bytes.extend(data);
        bytes
    }

    fn dynamic(tags: &[u64]) -> Vec<u8> {
        tags.iter()
            .flat_map(|&tag| [tag.to_le_bytes(), 0u64.to_le_bytes()].concat())
            .collect()
    }

    #[test]
    fn a_static_pie_has_a_dynamic_segment_but_no_interpreter_and_no_library() {
        // PT_LOAD, and PT_DYNAMIC with DT_RELA (7) and DT_FLAGS_1 (0x6ffffffb) only.
        let bytes = elf(&[(1, vec![0; 8]), (PT_DYNAMIC, dynamic(&[7, 0x6fff_fffb, 0]))]);
        assert_eq!(
            linkage(&bytes).unwrap(),
            Linkage {
                interpreter: None,
                needed: 0
            }
        );
    }

    #[test]
    fn a_dynamic_executable_names_its_interpreter_and_libraries() {
        let bytes = elf(&[
            (PT_INTERP, b"/lib64/ld-linux-x86-64.so.2\0".to_vec()),
            (
                PT_DYNAMIC,
                dynamic(&[DT_NEEDED, DT_NEEDED, 7, 0, DT_NEEDED]),
            ),
        ]);
        assert_eq!(
            linkage(&bytes).unwrap(),
            Linkage {
                interpreter: Some("/lib64/ld-linux-x86-64.so.2".to_owned()),
                needed: 2
            }
        );
    }

    /// This test binary is linked as cargo links tests: dynamically, against glibc.
    #[test]
    fn this_test_binary_is_not_static() {
        let exe = std::env::current_exe().unwrap();
        let error = require_static(&exe).unwrap_err().to_string();
        assert!(error.contains("is not static"), "{error}");
    }

    #[test]
    fn truncated_or_foreign_files_are_errors() {
        let bytes = elf(&[(PT_INTERP, b"/lib/ld.so\0".to_vec())]);
        assert!(linkage(&bytes[..100]).is_err());
        assert!(linkage(b"#!/bin/sh\n").is_err());
        let mut big_endian = bytes.clone();
        big_endian[5] = 2;
        assert!(linkage(&big_endian).is_err());
    }
}
