//! A proxy's footprint from `/proc` (metric 7): resident memory and CPU time.

use std::fs;

/// A `VmRSS`-style field of `/proc/PID/status`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {field}"))
}

/// Resident memory now, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS") as f64 / 1024.0
}

/// Peak resident memory so far (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM") as f64 / 1024.0
}

/// User plus system CPU time of the whole process (every thread, living or exited), in
/// seconds: fields 14 and 15 of `/proc/PID/stat`, in clock ticks.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The command name (field 2) may hold spaces; the fields after it start past its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // Field 3 (state) is fields[0], so field N is fields[N - 3].
    let ticks = |n: usize| -> u64 {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("/proc/{pid}/stat: no field {n} in {stat:?}"))
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks(14) + ticks(15)) as f64 / per_second as f64
}
