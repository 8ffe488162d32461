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
