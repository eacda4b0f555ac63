//! The decision: what the probes found on this kernel ([`Kernel`]), and whether and how the
//! agent runs on it ([`Kernel::assess`]: refuse with [`Unsupported`], or an [`Assessment`]).

use std::{fmt, sync::OnceLock};

use super::{FEATURES, Feature, HIDE_ENV, Id, Need, TESTED_SINCE, probe};

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The kernel has it.
    Present,
    /// The kernel refused it the way a kernel without it does.
    Absent,
    /// Hidden by [`HIDE_ENV`] (tests).
    Hidden,
    /// The probe itself failed (not root, an unexpected error): treated as missing.
    Failed(String),
}

impl Probe {
    pub(super) fn present(&self) -> bool {
        *self == Self::Present
    }
}

/// The kernel's features, probed once.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    pub(super) results: Vec<(&'static Feature, Probe)>,
    /// Names in [`HIDE_ENV`] that are not features.
    pub(super) unknown_hidden: Vec<String>,
}

/// The required features this kernel lacks: the agent cannot enforce its policy here.
#[derive(Debug, thiserror::Error)]
pub struct Unsupported {
    /// `uname -r`.
    pub release: String,
    /// What is missing, and why (absent, hidden, or the probe failed).
    pub missing: Vec<(&'static Feature, Probe)>,
    /// Names in [`HIDE_ENV`] that are not features.
    pub unknown_hidden: Vec<String>,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.unknown_hidden.is_empty() {
            return write!(
                f,
                "{HIDE_ENV} names {}, which {} no kernel feature egress knows (known: {})",
                self.unknown_hidden.join(", "),
                if self.unknown_hidden.len() == 1 {
                    "is"
                } else {
                    "are"
                },
                FEATURES
                    .iter()
                    .map(|f| f.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let not_permitted =
            |p: &Probe| matches!(p, Probe::Failed(why) if why.ends_with(probe::NOT_PERMITTED));
        if !self.missing.is_empty() && self.missing.iter().all(|(_, p)| not_permitted(p)) {
            // Not a kernel without the features: a process without the right to ask.
            return write!(
                f,
                "cannot probe the features of this kernel (Linux {}): bpf(2) is not permitted \
                 (EPERM); run `egress run` as root",
                self.release
            );
        }
        write!(
            f,
            "this kernel (Linux {}) lacks what egress needs to enforce its policy: ",
            self.release
        )?;
        for (i, (feature, probe)) in self.missing.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{} ({}; Linux >= {}; used for {})",
                feature.name, feature.kernel, feature.since, feature.used_for
            )?;
            match probe {
                Probe::Hidden => write!(f, " [hidden by {HIDE_ENV}]")?,
                Probe::Failed(why) => write!(f, " [the probe failed: {why}]")?,
                Probe::Present | Probe::Absent => {}
            }
        }
        write!(
            f,
            "; nothing was loaded. Upgrade to Linux {TESTED_SINCE} or newer (the oldest kernel \
             egress is tested on)"
        )
    }
}

/// Whether and how the agent can run on this kernel.
#[derive(Clone, Debug)]
pub struct Assessment {
    /// `uname -r`.
    pub release: String,
    /// Optional features this kernel lacks: the agent runs without them.
    pub degraded: Vec<&'static Feature>,
    /// [`Need::ForXdp`] features this kernel lacks, harmless without `--xdp-iface`.
    pub unavailable: Vec<&'static Feature>,
}

impl Assessment {
    /// Whether feature `id` is there to use: an assessment exists only for a kernel with every
    /// required feature, so what it does not list as degraded or unavailable is present.
    pub fn has(&self, id: Id) -> bool {
        !self.lacking().any(|f| f.id == id)
    }

    /// Whether every feature `program` depends on is there.
    pub fn program_available(&self, program: &str) -> bool {
        !self.lacking().any(|f| f.programs.contains(&program))
    }

    fn lacking(&self) -> impl Iterator<Item = &'static Feature> + '_ {
        self.degraded.iter().chain(&self.unavailable).copied()
    }

    /// One line per degraded feature, for `egress status`.
    pub fn degraded_lines(&self) -> Vec<String> {
        self.degraded.iter().map(|f| degraded_line(f)).collect()
    }

    /// Logs one WARN per degraded feature, then a summary at INFO.
    pub fn log(&self) {
        for feature in &self.degraded {
            let Need::Optional { lost } = feature.need else {
                continue;
            };
            tracing::warn!(
                feature = feature.name,
                kernel = %self.release,
                needs = %format!("Linux >= {}", feature.since),
                lost,
                "kernel feature missing, running without it: {}",
                feature.kernel
            );
        }
        tracing::info!(kernel = %self.release, "{}", self.summary());
    }

    /// "all kernel features present", or what is degraded and unavailable.
    pub fn summary(&self) -> String {
        if self.degraded.is_empty() && self.unavailable.is_empty() {
            return "kernel: all kernel features present".to_owned();
        }
        let names = |list: &[&Feature]| list.iter().map(|f| f.name).collect::<Vec<_>>().join(", ");
        let mut out = String::from("kernel: ");
        if !self.degraded.is_empty() {
            out.push_str(&format!(
                "degraded, running without {}",
                names(&self.degraded)
            ));
        }
        if !self.unavailable.is_empty() {
            if !self.degraded.is_empty() {
                out.push_str("; ");
            }
            out.push_str(&format!(
                "unavailable (needed only with --xdp-iface): {}",
                names(&self.unavailable)
            ));
        }
        out
    }
}

/// `NAME (Linux >= X.Y): what is lost`.
pub fn degraded_line(feature: &Feature) -> String {
    let lost = match feature.need {
        Need::Optional { lost } => lost,
        Need::Required | Need::ForXdp => "",
    };
    format!("{} (Linux >= {}): {lost}", feature.name, feature.since)
}

impl Kernel {
    /// Probes every feature of [`FEATURES`], minus those [`HIDE_ENV`] hides.
    pub fn probe() -> Self {
        // Before 5.11 every map (the probes' one-entry maps too) counts against the memlock
        // limit, and the default one makes map creation fail with EPERM even for root.
        if let Err(error) = super::super::sys::raise_memlock() {
            tracing::debug!(%error, "could not lift RLIMIT_MEMLOCK (not root?)");
        }
        let hidden = std::env::var(HIDE_ENV).unwrap_or_default();
        let hidden: Vec<&str> = hidden
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let results = FEATURES
            .iter()
            .map(|feature| {
                let probe = if hidden.contains(&feature.name) {
                    Probe::Hidden
                } else {
                    match (feature.probe)() {
                        Ok(true) => Probe::Present,
                        Ok(false) => Probe::Absent,
                        Err(why) => Probe::Failed(why),
                    }
                };
                (feature, probe)
            })
            .collect();
        Self {
            release: release(),
            results,
            unknown_hidden: hidden
                .iter()
                .filter(|h| !FEATURES.iter().any(|f| f.name == **h))
                .map(|h| (*h).to_owned())
                .collect(),
        }
    }

    /// A kernel with these probe results; features not named are present. For tests of the
    /// decision.
    pub fn with_results(release: &str, results: &[(&str, Probe)]) -> Self {
        Self {
            release: release.to_owned(),
            results: FEATURES
                .iter()
                .map(|feature| {
                    let probe = results
                        .iter()
                        .find(|(name, _)| *name == feature.name)
                        .map_or(Probe::Present, |(_, p)| p.clone());
                    (feature, probe)
                })
                .collect(),
            unknown_hidden: Vec::new(),
        }
    }

    /// Whether feature `id` is present (every [`Id`] is in [`FEATURES`], a unit test checks).
    pub fn has(&self, id: Id) -> bool {
        self.results
            .iter()
            .find(|(f, _)| f.id == id)
            .is_some_and(|(_, probe)| probe.present())
    }

    /// Whether every feature `program` depends on is present.
    pub fn program_available(&self, program: &str) -> bool {
        self.results
            .iter()
            .filter(|(f, _)| f.programs.contains(&program))
            .all(|(_, p)| p.present())
    }

    /// Decides: refuse ([`Unsupported`], every missing required feature in it), or run,
    /// perhaps without some optional features. `xdp`: the XDP backstop is asked for.
    ///
    /// # Errors
    /// A required feature is missing (or could not be probed), or [`HIDE_ENV`] names
    /// something that is not a feature.
    pub fn assess(&self, xdp: bool) -> Result<Assessment, Unsupported> {
        let mut missing = Vec::new();
        let mut degraded = Vec::new();
        let mut unavailable = Vec::new();
        for (feature, probe) in &self.results {
            if probe.present() {
                continue;
            }
            match feature.need {
                Need::Required => missing.push((*feature, probe.clone())),
                Need::ForXdp if xdp => missing.push((*feature, probe.clone())),
                Need::ForXdp => unavailable.push(*feature),
                Need::Optional { .. } => degraded.push(*feature),
            }
        }
        if !missing.is_empty() || !self.unknown_hidden.is_empty() {
            return Err(Unsupported {
                release: self.release.clone(),
                missing,
                unknown_hidden: self.unknown_hidden.clone(),
            });
        }
        Ok(Assessment {
            release: self.release.clone(),
            degraded,
            unavailable,
        })
    }
}

/// This kernel's features, probed the first time they are asked for.
pub fn kernel() -> &'static Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    KERNEL.get_or_init(Kernel::probe)
}

/// `uname -r`, or `unknown`.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}
