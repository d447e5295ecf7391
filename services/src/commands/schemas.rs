//! `orderflow schemas check`: every event type's schema versions compatible both ways.

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::SchemasCommand;

/// Prints the result of walking every schema chain; fails when one link breaks.
/// The schema files under `dir`: `<aggregate>/<EventType>.v<N>.avsc`. Their text is
/// kept for the life of the process (this runs once, then exits).
pub(crate) fn schema_files_in(
    dir: &std::path::Path,
) -> anyhow::Result<Vec<domain::wire::SchemaFile>> {
    let leak = |text: String| -> &'static str { Box::leak(text.into_boxed_str()) };
    let mut files = Vec::new();
    let folders =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for folder in folders {
        let folder = folder?.path();
        if !folder.is_dir() {
            continue;
        }
        let aggregate = folder
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        for file in std::fs::read_dir(&folder)? {
            let path = file?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = name.strip_suffix(".avsc") else {
                continue;
            };
            let parsed = stem
                .rsplit_once(".v")
                .and_then(|(event_type, version)| Some((event_type, version.parse::<u32>().ok()?)));
            let Some((event_type, version)) = parsed else {
                anyhow::bail!("{}: not named <EventType>.v<N>.avsc", path.display());
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            files.push(domain::wire::SchemaFile {
                aggregate: leak(aggregate.clone()),
                event_type: leak(event_type.to_owned()),
                version,
                text: leak(text),
            });
        }
    }
    anyhow::ensure!(!files.is_empty(), "no schema files under {}", dir.display());
    Ok(files)
}

pub(crate) fn schemas_check(files: &[domain::wire::SchemaFile], json: bool) -> ExitCode {
    let problems = domain::wire::check_schema_chains(files);
    let mut types: Vec<&str> = files.iter().map(|f| f.event_type).collect();
    types.sort_unstable();
    types.dedup();
    if json {
        let problems: Vec<_> = problems
            .iter()
            .map(|p| serde_json::json!({ "event_type": p.event_type, "problem": p.message }))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "compatible": problems.is_empty(),
                "event_types": types.len(),
                "schemas": files.len(),
                "problems": problems,
            })
        );
    } else if problems.is_empty() {
        println!(
            "compatible: {} schemas of {} event types; every version reads its predecessor's events and vice versa",
            files.len(),
            types.len()
        );
    } else {
        for problem in &problems {
            println!("{}: {}", problem.event_type, problem.message);
        }
        println!("incompatible: {} problem(s)", problems.len());
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub(crate) fn schemas(command: SchemasCommand) -> anyhow::Result<ExitCode> {
    let SchemasCommand::Check { json, dir } = command;
    let files = match dir {
        Some(dir) => schema_files_in(&dir)?,
        None => domain::wire::SCHEMA_FILES.to_vec(),
    };
    Ok(schemas_check(&files, json))
}
