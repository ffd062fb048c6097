//! DNS-safe node names (`given_name`), unique within the tailnet.

/// Longest DNS label.
const MAX_LABEL_BYTES: usize = 63;

/// Turns a client hostname into a DNS label: lowercase ASCII letters, digits and '-',
/// no leading or trailing '-', at most 63 bytes; "node" if nothing is left.
pub fn sanitize_label(hostname: &str) -> String {
    let mut out = String::new();
    for c in hostname.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out: String = out
        .trim_matches('-')
        .chars()
        .take(MAX_LABEL_BYTES)
        .collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        "node".to_string()
    } else {
        out
    }
}

/// Checks an admin-supplied name: it must already be a valid label.
pub fn validate_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_LABEL_BYTES {
        return Err(format!("must be 1 to {MAX_LABEL_BYTES} characters"));
    }
    // What `sanitize_label` leaves unchanged, checked without building a copy: this runs
    // for every tag of every write the state machine applies.
    let allowed = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !allowed || name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("use lowercase letters, digits and '-', not at either end".into());
    }
    Ok(())
}

/// Picks `base`, or `base-2`, `base-3`, … : the first that `taken` says is free.
pub fn unique_label(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|n| {
            let suffix = format!("-{n}");
            let stem: String = base.chars().take(MAX_LABEL_BYTES - suffix.len()).collect();
            format!("{}{}", stem.trim_end_matches('-'), suffix)
        })
        .find(|candidate| !taken(candidate))
        .expect("an infinite range always has a free name")
}

/// User names follow the same rule as headscale's: a non-empty identifier without spaces.
pub fn validate_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("must be 1 to 255 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+'))
    {
        return Err("use letters, digits and - _ . @ +".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_become_dns_labels() {
        assert_eq!(sanitize_label("My Laptop!"), "my-laptop");
        assert_eq!(sanitize_label("--a__b--"), "a-b");
        assert_eq!(sanitize_label("ÄÖ"), "node");
        assert_eq!(sanitize_label(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn duplicate_labels_get_a_numeric_suffix() {
        let taken = ["web", "web-2"];
        assert_eq!(unique_label("web", |n| taken.contains(&n)), "web-3");
        assert_eq!(unique_label("db", |n| taken.contains(&n)), "db");
    }

    #[test]
    fn invalid_admin_names_are_refused() {
        assert!(validate_label("Good").is_err());
        assert!(validate_label("-x").is_err());
        assert!(validate_label("ok-1").is_ok());
        assert!(validate_user_name("alice").is_ok());
        assert!(validate_user_name("a b").is_err());
        assert!(validate_user_name("").is_err());
    }

    /// A valid label is exactly one that sanitizing leaves as it is.
    #[test]
    fn valid_labels_are_those_sanitizing_keeps() {
        let long = "y".repeat(64);
        let cases = [
            "", "a", "a-b", "a--b", "-a", "a-", "A", "a_b", "é", "node", "0", "x9-z", &long,
        ];
        for name in cases {
            let kept =
                !name.is_empty() && name.len() <= MAX_LABEL_BYTES && sanitize_label(name) == name;
            assert_eq!(validate_label(name).is_ok(), kept, "{name:?}");
        }
    }
}
