//! The one `*` pattern matcher: the deny list of instance types (`crate::selection`), the
//! emulator's fault patterns and its `InstanceName`/`KeyPairName`/`ImageName` filters.

/// `*` matches any run of characters (also none); everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or("");
    for part in parts {
        match remaining.find(part) {
            Some(i) => remaining = &remaining[i + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn star_matches_any_run() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("*", ""));
        assert!(glob_match("ecs.*.2x*", "ecs.c7.2xlarge"));
        assert!(!glob_match("ecs.*.2x*", "ecs.c7.4xlarge"));
        assert!(glob_match("a*b*b", "abb"));
        assert!(!glob_match("ab*ba", "aba"), "prefix and suffix may not overlap");
        assert!(!glob_match("", "x"));
        assert!(glob_match("ecs.c7.large", "ecs.c7.large"));
        assert!(!glob_match("ecs.c7.large", "ecs.c7.large-x"), "no implicit prefix match");
        assert!(glob_match("**", "x") && glob_match("x**y", "xy"));
    }
}
