//! Installing and removing capture rules in the current network namespace.
//!
//! Rules go in through `iptables-restore --noflush`, one transaction per table, so a pod never
//! sees half its rules. Applying is idempotent: when every rule is already there and the Istio
//! chains hold nothing else, nothing is touched; otherwise isthmus' own rules and chains are
//! removed and installed anew. Cleanup removes only what capture installs: `ISTIO_*` chains, the
//! rules in built-in chains that jump to them or that capture adds, and the TPROXY route table.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::config::CaptureConfig;
use crate::rules::{FamilyRules, RuleSet, build, is_built_in};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot run `{command}`: {source} (is the iptables package installed?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// The address families, with their tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// What `--dry-run` prints: the commands in the order they would run, with each restore
/// payload in place of its command (istio-iptables' dry-run output).
pub fn dry_run(cfg: &CaptureConfig) -> Result<String, CaptureError> {
    cfg.validate()?;
    let set = build(cfg);
    let mut out = String::from("iptables-save\nip6tables-save\n");
    out.push_str(&set.v4.restore_payload());
    out.push_str(&set.v6.restore_payload());
    out.push_str("iptables-save\n");
    if cfg.enable_ipv6 {
        out.push_str("ip6tables-save\n");
    }
    Ok(out)
}

/// What [`apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Families whose rules were (re)installed; the others were already in place.
    pub installed: Vec<Family>,
    pub skipped_cidrs: Vec<String>,
}

/// Installs the capture rules for `cfg` (and, in TPROXY mode, its policy routing).
pub fn apply(cfg: &CaptureConfig) -> Result<ApplyReport, CaptureError> {
    cfg.validate()?;
    let set = build(cfg);
    let mut report = ApplyReport {
        skipped_cidrs: set.skipped_cidrs.clone(),
        ..Default::default()
    };
    let families: &[(Family, &FamilyRules)] = if cfg.enable_ipv6 {
        &[(Family::V4, &set.v4), (Family::V6, &set.v6)]
    } else {
        &[(Family::V4, &set.v4)]
    };
    for &(family, rules) in families {
        if in_sync(family, rules)? {
            continue;
        }
        remove_rules(family, rules)?;
        restore(family, &rules.restore_payload())?;
        report.installed.push(family);
    }
    if cfg.enable_ipv6 {
        // The proxy binds ::6 for inbound passthrough; IPv6 loopback is only ::1/128 otherwise.
        run("ip", &["-6", "addr", "replace", "::6/128", "dev", "lo"])?;
    }
    if cfg.inbound_interception_mode == crate::config::InterceptionMode::Tproxy {
        for &(family, _) in families {
            tproxy_routes(family, cfg, true)?;
        }
    }
    Ok(report)
}

/// Removes everything [`apply`] installs for `cfg`, in both families. Safe to run when nothing
/// is installed.
pub fn cleanup(cfg: &CaptureConfig) -> Result<(), CaptureError> {
    let mut all = cfg.clone();
    all.enable_ipv6 = true;
    let set: RuleSet = build(&all);
    for (family, rules) in [(Family::V4, &set.v4), (Family::V6, &set.v6)] {
        if family == Family::V6 && !tool_available(family.save()) {
            continue;
        }
        remove_rules(family, rules)?;
        tproxy_routes(family, cfg, false)?;
    }
    Ok(())
}

/// The `iptables-save` text of the current namespace.
pub fn save(family: Family) -> Result<String, CaptureError> {
    run(family.save(), &[])
}

fn tool_available(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether every rule of `rules` is installed and the Istio chains hold nothing else.
fn in_sync(family: Family, rules: &FamilyRules) -> Result<bool, CaptureError> {
    let state = SavedState::parse(&save(family)?);
    for r in &rules.rules {
        let mut args = vec!["-w", "10", "-t", r.table, "-C", &r.chain];
        args.extend(r.spec.iter().map(String::as_str));
        if run(family.iptables(), &args).is_err() {
            return Ok(false);
        }
    }
    // No leftover rules from another configuration.
    let expected_istio = rules
        .rules
        .iter()
        .filter(|r| !is_built_in(&r.chain))
        .count();
    let expected_jumps = rules
        .rules
        .iter()
        .filter(|r| is_built_in(&r.chain) && r.jump_target().is_some_and(|t| !is_built_in(t)))
        .count();
    Ok(state.istio_rules == expected_istio && state.jumps.len() == expected_jumps)
}

/// Removes capture's rules from built-in chains, then flushes and deletes the `ISTIO_*` chains.
fn remove_rules(family: Family, rules: &FamilyRules) -> Result<(), CaptureError> {
    let state = SavedState::parse(&save(family)?);
    let mut payload = String::new();
    for table in state.tables() {
        let jumps: Vec<&String> = state
            .jumps
            .iter()
            .filter(|(t, _)| t == table)
            .map(|(_, l)| l)
            .collect();
        let chains: Vec<&String> = state
            .chains
            .iter()
            .filter(|(t, _)| t == table)
            .map(|(_, c)| c)
            .collect();
        if jumps.is_empty() && chains.is_empty() {
            continue;
        }
        payload.push_str(&format!("*{table}\n"));
        for line in jumps {
            // `-A CHAIN spec` as saved becomes `-D CHAIN spec`.
            payload.push_str(&format!("-D{}\n", &line[2..]));
        }
        for c in &chains {
            payload.push_str(&format!("-F {c}\n"));
        }
        for c in &chains {
            payload.push_str(&format!("-X {c}\n"));
        }
        payload.push_str("COMMIT\n");
    }
    if !payload.is_empty() {
        restore(family, &payload)?;
    }
    // Capture's non-jump rules in built-in chains (interface bypasses, TPROXY marks).
    for r in rules
        .rules
        .iter()
        .filter(|r| is_built_in(&r.chain) && r.jump_target().is_none_or(is_built_in))
    {
        let mut check = vec!["-w", "10", "-t", r.table, "-C", &r.chain];
        check.extend(r.spec.iter().map(String::as_str));
        let mut delete = check.clone();
        delete[4] = "-D";
        // A rule appended twice by an earlier tool is deleted twice; bounded all the same.
        for _ in 0..16 {
            if run(family.iptables(), &check).is_err() {
                break;
            }
            run(family.iptables(), &delete)?;
        }
    }
    Ok(())
}

fn tproxy_routes(family: Family, cfg: &CaptureConfig, add: bool) -> Result<(), CaptureError> {
    let mark = cfg.inbound_tproxy_mark.to_string();
    let table = cfg.inbound_tproxy_route_table.to_string();
    let f = family.ip_flag();
    let rule = [f, "rule", "show", "fwmark", &mark, "lookup", &table];
    if add {
        if run("ip", &rule)?.trim().is_empty() {
            run("ip", &[f, "rule", "add", "fwmark", &mark, "lookup", &table])?;
        }
        run(
            "ip",
            &[
                f, "route", "replace", "local", "default", "dev", "lo", "table", &table,
            ],
        )?;
    } else {
        for _ in 0..16 {
            if run("ip", &rule)
                .map(|s| s.trim().is_empty())
                .unwrap_or(true)
            {
                break;
            }
            run("ip", &[f, "rule", "del", "fwmark", &mark, "lookup", &table])?;
        }
        // Flushing an empty or missing table is not an error worth reporting.
        let _ = run("ip", &[f, "route", "flush", "table", &table]);
    }
    Ok(())
}

fn restore(family: Family, payload: &str) -> Result<(), CaptureError> {
    if payload.is_empty() {
        return Ok(());
    }
    run_with_input(family.restore(), &["-w", "10", "--noflush"], payload).map(|_| ())
}

/// What capture owns in an `iptables-save` dump.
#[derive(Debug, Default)]
struct SavedState {
    /// `(table, chain)` of `ISTIO_*` chains.
    chains: Vec<(String, String)>,
    /// `(table, saved rule line)` of rules in built-in chains that jump to `ISTIO_*` chains.
    jumps: Vec<(String, String)>,
    /// Rules inside `ISTIO_*` chains.
    istio_rules: usize,
}

impl SavedState {
    fn parse(text: &str) -> Self {
        let mut s = SavedState::default();
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim().to_string();
            } else if let Some(c) = line.strip_prefix(':') {
                let name = c.split_whitespace().next().unwrap_or("");
                if name.starts_with("ISTIO_") {
                    s.chains.push((table.clone(), name.to_string()));
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split_whitespace().next().unwrap_or("");
                if chain.starts_with("ISTIO_") {
                    s.istio_rules += 1;
                } else if is_built_in(chain)
                    && rest
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .windows(2)
                        .any(|w| w[0] == "-j" && w[1].starts_with("ISTIO_"))
                {
                    s.jumps.push((table.clone(), line.to_string()));
                }
            }
        }
        s
    }

    fn tables(&self) -> Vec<&str> {
        let mut t: Vec<&str> = self
            .chains
            .iter()
            .chain(&self.jumps)
            .map(|(t, _)| t.as_str())
            .collect();
        t.sort_unstable();
        t.dedup();
        t
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(program: &str, args: &[&str]) -> Result<String, CaptureError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CaptureError::Spawn {
            command: command_line(program, args),
            source,
        })?;
    check(program, args, out)
}

fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<String, CaptureError> {
    let spawn_err = |source| CaptureError::Spawn {
        command: command_line(program, args),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    check(program, args, out)
}

fn check(program: &str, args: &[&str], out: std::process::Output) -> Result<String, CaptureError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CaptureError::Failed {
            command: command_line(program, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_finds_own_chains_and_jumps() {
        let s = SavedState::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:KUBE-X - [0:0]\n\
             -A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j KUBE-X\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n",
        );
        assert_eq!(s.chains, vec![("nat".into(), "ISTIO_OUTPUT".into())]);
        assert_eq!(
            s.jumps,
            vec![("nat".into(), "-A OUTPUT -j ISTIO_OUTPUT".into())]
        );
        assert_eq!(s.istio_rules, 1);
    }

    #[test]
    fn insert_rules_render_with_position() {
        let r = crate::rules::Rule {
            position: crate::rules::Position::Insert(1),
            table: "nat",
            chain: "PREROUTING".into(),
            spec: vec!["-i".into(), "eth0".into(), "-j".into(), "RETURN".into()],
        };
        assert_eq!(r.restore_line(), "-I PREROUTING 1 -i eth0 -j RETURN");
    }
}
