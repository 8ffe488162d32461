//! What the benches read of a process from `/proc`: its CPU time and its memory.

use std::fmt::Display;

/// User and system CPU seconds that `pid` (or `self`) has used.
pub fn cpu_seconds(pid: impl Display) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64);
    (n(11) + n(12)) as f64 / ticks
}

/// A kB field of `/proc/PID/status` (`VmRSS`, `VmHWM`), 0 when it cannot be read.
pub fn status_kb(pid: impl Display, field: &str) -> u64 {
    kb_field(&format!("/proc/{pid}/status"), field)
}

/// The resident memory that `pid` alone maps (`Private_Clean` + `Private_Dirty` of
/// `/proc/PID/smaps_rollup`): its RSS without the pages of files it shares with other processes,
/// such as the code of a binary that every sidecar of a node runs.
#[allow(dead_code)] // not every bench reports it
pub fn private_kb(pid: impl Display) -> u64 {
    let path = format!("/proc/{pid}/smaps_rollup");
    kb_field(&path, "Private_Clean") + kb_field(&path, "Private_Dirty")
}

fn kb_field(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
