//! `monitor agent --config agent.toml`: every agent flag as a TOML key, by its long name
//! (`output`, `trace-dir`, `metrics`; `trace_dir` is accepted too). The file's values become
//! the flags' defaults, so a flag on the command line overrides the file, and the environment
//! (`MONITOR_CONTROL`) overrides it too. Each value goes through the flag's own parser first, so
//! a bad one is refused with the file, the line and the key, before the agent starts.

use std::{collections::BTreeMap, ffi::OsString, path::Path};

use clap::{builder::OsStr, ArgAction, Command};
use toml::Spanned;

/// The agent's command with the defaults the `--config` file in `args` gives (unchanged when
/// the command line is not `monitor agent` or names no config file).
pub fn apply(mut cli: Command, args: &[OsString]) -> Result<Command, String> {
    let Some(path) = config_path(args) else { return Ok(cli) };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let agent = cli.find_subcommand_mut("agent").ok_or("no agent command")?;
    let defaults = read(&path, &text, agent)?;
    for (id, values) in defaults {
        *agent = std::mem::take(agent).mut_arg(id, |arg| arg.default_values(values));
    }
    Ok(cli)
}

/// Every key of the file as (argument id, its values), checked by the argument's parser.
fn read(path: &Path, text: &str, agent: &Command) -> Result<Vec<(String, Vec<OsStr>)>, String> {
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let at = |what: String| {
            format!("{}:{}: `{}`: {what}", path.display(), line_of(text, key.span().start), key.get_ref())
        };
        let name = key.get_ref().replace('_', "-");
        let arg = agent
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()) && name != "config" && name != "help")
            .ok_or_else(|| {
                at(format!("not a setting of monitor agent; the settings are its flags: {}", settings(agent)))
            })?;
        if let (ArgAction::SetTrue, toml::Value::Boolean(on)) = (arg.get_action(), value.get_ref()) {
            // A switch (`fresh = true`): its default becomes the file's.
            out.push((arg.get_id().to_string(), vec![OsStr::from(on.to_string())]));
            continue;
        }
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        let values: Vec<String> = match value.get_ref() {
            toml::Value::Array(items) if repeatable => {
                items.iter().map(scalar).collect::<Option<_>>().ok_or_else(|| at("expected strings".into()))?
            }
            toml::Value::Array(_) => return Err(at("takes one value, not a list".into())),
            other => vec![scalar(other).ok_or_else(|| at("expected a string or a number".into()))?],
        };
        for v in &values {
            // The flag's own parser, through clap: the value given alone on a command line.
            let alone = agent.clone().try_get_matches_from(["agent".to_string(), format!("--{name}={v}")]);
            match alone {
                Err(e) if e.kind() != clap::error::ErrorKind::MissingRequiredArgument => {
                    let message = e.to_string();
                    return Err(at(message
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("error: ")
                        .to_string()));
                }
                _ => {}
            }
        }
        out.push((arg.get_id().to_string(), values.into_iter().map(OsStr::from).collect()));
    }
    Ok(out)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

fn settings(agent: &Command) -> String {
    let names: Vec<&str> =
        agent.get_arguments().filter_map(|a| a.get_long()).filter(|l| *l != "config" && *l != "help").collect();
    names.join(", ")
}

/// The value of `--config` when the command is `monitor agent` (the global `--log` may come
/// before it).
fn config_path(args: &[OsString]) -> Option<std::path::PathBuf> {
    let mut rest = args.iter().skip(1);
    loop {
        let arg = rest.next()?.to_str()?;
        match arg {
            "--log" => {
                rest.next();
            }
            "agent" => break,
            a if a.starts_with('-') => {}
            _ => return None,
        }
    }
    while let Some(arg) = rest.next() {
        let arg = arg.to_str().unwrap_or_default();
        if arg == "--" {
            return None;
        }
        if arg == "--config" {
            return rest.next().map(Into::into);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(path.into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;
    use crate::cli::{Cli, Command as Sub};

    fn agent(file: &str, flags: &[&str]) -> Result<crate::cli::AgentArgs, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("monitor-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, file).unwrap();
        let mut args: Vec<OsString> = vec!["monitor".into(), "agent".into(), "--config".into(), path.clone().into()];
        args.extend(flags.iter().map(OsString::from));
        let parsed = apply(Cli::command(), &args).map(|cmd| cmd.try_get_matches_from(&args));
        std::fs::remove_dir_all(&dir).unwrap();
        let matches = parsed?.map_err(|e| e.to_string())?;
        match Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?.command {
            Sub::Agent(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_file_sets_what_flags_do_not() {
        let file = "output = [\"stdout\", \"jsonl:/tmp/a.jsonl\"]\ndefault_ttl = \"2m\"\nmetrics = \"127.0.0.1:9464\"\nspool-max-bytes = \"1M\"\ncontrol = \"/run/x.sock\"\nfresh = true\n";
        let a = agent(file, &[]).unwrap();
        assert_eq!(a.outputs.len(), 2);
        assert_eq!(a.default_ttl, Some(std::time::Duration::from_secs(120)));
        assert_eq!(a.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(a.spool_max_bytes, 1 << 20);
        assert!(a.fresh);
        // A flag overrides the file; a list given on the command line replaces the file's.
        let a = agent(file, &["--default-ttl", "5m", "--output", "stdout"]).unwrap();
        assert_eq!(a.default_ttl, Some(std::time::Duration::from_secs(300)));
        assert_eq!(a.outputs.len(), 1);
    }

    /// The documented example (deploy/agent.toml) is a valid config.
    #[test]
    fn the_example_is_valid() {
        let a = agent(include_str!("../../deploy/agent.toml"), &[]).unwrap();
        assert_eq!(a.outputs.len(), 2);
        assert_eq!(a.metrics, Some("0.0.0.0:9464".parse().unwrap()));
        assert_eq!(a.trace_dir, Some("/var/lib/monitor/traces".into()));
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let e = agent("output = \"stdout\"\n\ndefault-ttl = \"soon\"\n", &[]).unwrap_err();
        assert!(e.contains("agent.toml:3: `default-ttl`: invalid value 'soon'"), "{e}");
        let e = agent("metrics = \"127.0.0.1:9464\"\nmetrix = \"x\"\n", &[]).unwrap_err();
        assert!(e.contains("agent.toml:2: `metrix`: not a setting of monitor agent"), "{e}");
        assert!(e.contains("trace-dir"), "the settings are listed: {e}");
        let e = agent("policy = [\"a\", \"b\"]\n", &[]).unwrap_err();
        assert!(e.contains("agent.toml:1: `policy`: takes one value"), "{e}");
        let e = agent("output = [\"nowhere://x\"]\n", &[]).unwrap_err();
        assert!(e.contains("agent.toml:1: `output`: invalid value 'nowhere://x'"), "{e}");
        let e = agent("output = \n", &[]).unwrap_err();
        assert!(e.contains("agent.toml") && e.contains("line 1"), "a TOML syntax error: {e}");
    }
}
