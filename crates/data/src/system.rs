//! What layerwise reads of the machine it runs on, and which file names it will open.

/// A plain file name: no folder part, not `.` or `..`, nothing a join could take elsewhere.
pub fn is_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// A line of /proc/meminfo in bytes (`MemTotal`, `MemAvailable`, ...), where the system says.
pub fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}
