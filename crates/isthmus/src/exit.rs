//! Exit codes, as istioctl uses them (sysexits-style).

pub const OK: i32 = 0;
/// Something failed that is not the user's input.
pub const FAILURE: i32 = 1;
/// Wrong flags or arguments.
pub const USAGE: i32 = 64;
/// Input that could not be read or parsed.
pub const DATA_ERROR: i32 = 65;
/// `analyze` found issues at or above the failure threshold.
pub const ANALYZER_FOUND_ISSUES: i32 = 79;

/// The command line as `C`, or clap's message and its exit: `USAGE` for a mistake, `OK` for
/// `--help` and `--version`.
pub fn parse_args<C: clap::Parser>() -> C {
    match C::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { USAGE } else { OK };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

/// Exits with a command's code, or prints its error with every cause and exits `FAILURE`.
pub fn finish(result: anyhow::Result<i32>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(FAILURE);
        }
    }
}
