//! The layout the code promises, checked on the source itself: which crate may depend
//! on which, which crate writes the SQL of which table, and that ARCHITECTURE.md maps
//! every source file, links nowhere outside the repository, and names for each of its
//! invariants a test that exists. No database or broker: these read files only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's root folder.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `folder`, as paths relative to it.
fn rust_files(folder: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![folder.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push(path.strip_prefix(folder).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// The names under `[dependencies]` of a crate's manifest (not dev- or build-).
fn dependencies(krate: &str) -> BTreeSet<String> {
    let manifest = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
    let mut names = BTreeSet::new();
    let mut inside = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == "[dependencies]";
        } else if inside && !line.is_empty() && !line.starts_with('#') {
            let name = line.split(['=', '.', ' ']).next().unwrap();
            names.insert(name.to_owned());
        }
    }
    names
}

/// Dependencies point down: `services` → `projections`/`sagas` → `eventstore` →
/// `domain`; only `services` knows HTTP and the command line, only `eventstore`
/// talks AMQP, and `domain` does no I/O at all.
#[test]
fn each_crate_depends_only_on_what_is_below_it() {
    let forbidden: [(&str, &[&str]); 5] = [
        (
            "domain",
            &[
                "eventstore",
                "projections",
                "sagas",
                "services",
                "tokio",
                "sqlx",
                "lapin",
                "axum",
                "clap",
                "reqwest",
                "redis",
            ],
        ),
        (
            "eventstore",
            &[
                "projections",
                "sagas",
                "services",
                "axum",
                "clap",
                "reqwest",
                "redis",
                "utoipa",
            ],
        ),
        (
            "projections",
            &[
                "sagas", "services", "lapin", "axum", "clap", "reqwest", "redis",
            ],
        ),
        (
            "sagas",
            &[
                "projections",
                "services",
                "lapin",
                "axum",
                "clap",
                "reqwest",
                "redis",
            ],
        ),
        ("services", &["lapin"]),
    ];
    for (krate, names) in forbidden {
        let has = dependencies(krate);
        assert!(has.contains("serde"), "{krate}: the manifest was not read");
        for name in names {
            assert!(!has.contains(*name), "{krate} must not depend on {name}");
        }
    }
    // HTTP documentation stays behind a feature below `services`.
    for krate in ["projections", "sagas"] {
        let manifest = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
        let utoipa = manifest
            .lines()
            .find(|line| line.trim_start().starts_with("utoipa"))
            .unwrap_or_else(|| panic!("{krate}: no utoipa line"));
        assert!(utoipa.contains("optional = true"), "{krate}: {utoipa}");
    }
}

/// The contents of the string literals of Rust source, comments left out: where SQL
/// lives.
fn string_literals(source: &str) -> Vec<String> {
    let bytes = source.as_bytes();
    let mut literals = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'\'' => {
                // A char literal ('"', '\'', '\n') or a lifetime ('a).
                if bytes.get(i + 1) == Some(&b'\\') {
                    i += 2;
                    while i < bytes.len() && bytes[i] != b'\'' {
                        i += 1;
                    }
                    i += 1;
                } else if bytes.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            b'r' if matches!(bytes.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')) =>
            {
                let hashes = bytes[i + 1..].iter().take_while(|b| **b == b'#').count();
                let start = i + 2 + hashes;
                let end_mark = format!("\"{}", "#".repeat(hashes));
                let end = source[start..]
                    .find(&end_mark)
                    .map_or(bytes.len(), |at| start + at);
                literals.push(source[start..end].to_owned());
                i = end + end_mark.len();
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                literals.push(source[start..i.min(bytes.len())].to_owned());
                i += 1;
            }
            _ => i += 1,
        }
    }
    literals
}

/// The tables a piece of SQL reads or writes (`FROM t`, `INTO t`, `UPDATE t`,
/// `JOIN t`, `TABLE t`, `DELETE FROM t`), lower-cased; nothing for a literal with no
/// SQL verb in capitals (prose such as "rebuilt from {} events").
fn tables_named(sql: &str) -> Vec<String> {
    let verbs = [
        "SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "LOCK", "TRUNCATE",
    ];
    let is_sql = sql
        .split(|c: char| !c.is_ascii_alphabetic())
        .any(|word| verbs.contains(&word));
    if !is_sql {
        return Vec::new();
    }
    let lower = sql.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| !word.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|pair| matches!(pair[0], "from" | "into" | "update" | "join" | "table"))
        .map(|pair| pair[1].to_owned())
        .collect()
}

/// Every table is named in SQL only by the crate that owns it: the event and message
/// tables by `eventstore`, the read models by `projections`, the sagas by `sagas`, and
/// the services' own tables (users' e-mails, notifications, idempotency records) by
/// `services`. A crate that needs another's data calls that crate's function.
#[test]
fn every_table_is_named_in_sql_by_the_crate_that_owns_it() {
    let owners: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("events", &["eventstore"][..]),
        ("outbox", &["eventstore"]),
        ("snapshots", &["eventstore"]),
        ("schema_registry", &["eventstore"]),
        ("inbox", &["eventstore"]),
        ("consumer_streams", &["eventstore"]),
        ("parked_streams", &["eventstore"]),
        ("parked_messages", &["eventstore"]),
        ("subscription_checkpoints", &["eventstore"]),
        ("order_summaries", &["projections"]),
        ("customer_orders", &["projections"]),
        ("stock_levels", &["projections"]),
        ("payment_statuses", &["projections"]),
        ("user_profiles", &["projections"]),
        ("sagas", &["sagas"]),
        ("saga_steps", &["sagas"]),
        ("user_emails", &["services"]),
        ("notifications", &["services"]),
        ("notification_recipients", &["services"]),
        // Written by the command path; pruned by the retention every service runs.
        ("idempotency_keys", &["services", "eventstore"]),
    ]);
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for krate in ["domain", "eventstore", "projections", "sagas", "services"] {
        let src = root().join(krate).join("src");
        for file in rust_files(&src) {
            let source = std::fs::read_to_string(src.join(&file)).unwrap();
            // Unit tests may set up what they need.
            let source = source.split("#[cfg(test)]").next().unwrap();
            for literal in string_literals(source) {
                for table in tables_named(&literal) {
                    let Some(allowed) = owners.get(table.as_str()) else {
                        continue;
                    };
                    seen.insert(table.clone());
                    if !allowed.contains(&krate) {
                        wrong.push(format!("{krate}/src/{}: {table}", file.display()));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "tables named outside their owner: {wrong:#?}"
    );
    // The scan finds what it looks for: every table is named somewhere.
    let unseen: Vec<_> = owners.keys().filter(|t| !seen.contains(**t)).collect();
    assert!(unseen.is_empty(), "never found in SQL: {unseen:?}");
}

/// Nothing publishes to the broker but the relay (recorded events and commands), the
/// dead-letter path and the operator's `dlq replay` and `republish`: a request handler
/// records into the outbox and never publishes.
#[test]
fn only_the_relay_and_the_dead_letter_tools_publish() {
    let src = root().join("eventstore/src");
    let publishing: Vec<String> = rust_files(&src)
        .into_iter()
        .filter(|file| {
            let source = std::fs::read_to_string(src.join(file)).unwrap();
            source
                .split("#[cfg(test)]")
                .next()
                .unwrap()
                .contains(".basic_publish(")
        })
        .map(|file| file.display().to_string())
        .collect();
    assert_eq!(
        publishing,
        [
            "consumer/dead_letter.rs",
            "dlq.rs",
            "relay.rs",
            "republish.rs"
        ]
    );
}

fn architecture_md() -> String {
    std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap()
}

/// The backticked names of a Markdown text.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The section of ARCHITECTURE.md that maps `krate` file by file.
fn file_map<'a>(document: &'a str, krate: &str) -> &'a str {
    let heading = format!("### `{krate}`, file by file");
    let start = document
        .find(&heading)
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no {heading:?}"));
    let rest = &document[start + heading.len()..];
    let end = rest.find("\n#").unwrap_or(rest.len());
    &rest[..end]
}

/// ARCHITECTURE.md's code map holds: each crate's table names every source file of the
/// crate (a file, or the folder it sits in), and every file or folder it names exists.
#[test]
fn the_architecture_document_maps_every_source_file() {
    let document = architecture_md();
    for krate in ["domain", "eventstore", "projections", "sagas", "services"] {
        let map = file_map(&document, krate);
        let src = root().join(krate).join("src");
        let named: Vec<&str> = backticked(map)
            .into_iter()
            .filter(|name| name.ends_with(".rs") || name.ends_with('/'))
            .collect();
        for name in &named {
            assert!(
                src.join(name).exists(),
                "{krate}: ARCHITECTURE.md names {name}, which is gone"
            );
        }
        for file in rust_files(&src) {
            let file = file.to_string_lossy().into_owned();
            let covered = named
                .iter()
                .any(|name| *name == file || (name.ends_with('/') && file.starts_with(name)));
            assert!(
                covered,
                "{krate}/src/{file} is missing from ARCHITECTURE.md"
            );
        }
    }
}

#[test]
fn the_architecture_document_links_only_inside_the_repository() {
    let document = architecture_md();
    for scheme in ["http://", "https://", "www."] {
        assert!(
            !document.contains(scheme),
            "ARCHITECTURE.md links outside: {scheme}"
        );
    }
    // Relative links point at files that exist.
    for link in document.split("](").skip(1) {
        let target = link.split(')').next().unwrap().split('#').next().unwrap();
        if !target.is_empty() {
            assert!(
                root().join(target).exists(),
                "ARCHITECTURE.md links to {target}"
            );
        }
    }
}

/// The test functions of the workspace: `fn` items after a `#[test]` or
/// `#[tokio::test]` attribute.
fn test_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for krate in [
        "domain",
        "eventstore",
        "projections",
        "sagas",
        "services",
        "tests",
    ] {
        let folder = root().join(krate);
        for file in rust_files(&folder) {
            if file.starts_with("target") {
                continue;
            }
            let source = std::fs::read_to_string(folder.join(&file)).unwrap();
            let mut after_attribute = false;
            for line in source.lines().map(str::trim) {
                if line.starts_with("#[test]") || line.starts_with("#[tokio::test") {
                    after_attribute = true;
                } else if after_attribute && let Some(rest) = line.strip_prefix("async fn ") {
                    names.insert(rest.split('(').next().unwrap().to_owned());
                    after_attribute = false;
                } else if after_attribute && let Some(rest) = line.strip_prefix("fn ") {
                    names.insert(rest.split('(').next().unwrap().to_owned());
                    after_attribute = false;
                }
            }
        }
    }
    names
}

/// Every paragraph or item of ARCHITECTURE.md that states an invariant ("Invariant:")
/// says "Guarded by" and names tests that exist.
#[test]
fn every_invariant_of_the_architecture_document_names_a_test_that_exists() {
    let document = architecture_md();
    let tests = test_names();
    assert!(
        tests.contains("every_invariant_of_the_architecture_document_names_a_test_that_exists")
    );
    let mut invariants = 0;
    // Paragraphs and list items.
    let blocks = document
        .split("\n\n")
        .flat_map(|block| block.split("\n- "))
        .map(|block| block.trim_start().trim_start_matches("- "))
        .filter(|block| block.starts_with("Invariant"));
    for block in blocks {
        invariants += 1;
        let first_line = block.lines().next().unwrap();
        let guard = block
            .find("Guarded by")
            .unwrap_or_else(|| panic!("an invariant without a guard: {first_line}"));
        let named: Vec<&str> = backticked(&block[guard..])
            .into_iter()
            .filter(|name| {
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    && name.contains('_')
            })
            .collect();
        assert!(!named.is_empty(), "no test named for: {first_line}");
        for name in named {
            assert!(tests.contains(name), "{first_line}: no test called {name}");
        }
    }
    assert!(invariants >= 10, "only {invariants} invariants found");
}
