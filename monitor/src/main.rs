use clap::{CommandFactory as _, FromArgMatches as _};
use monitor::cli::{dispatch, Cli};

fn main() {
    // The agent's config file gives its flags' defaults (config.rs), before clap parses.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = monitor::config::apply(Cli::command(), &args).unwrap_or_else(|e| {
        eprintln!("monitor: {e}");
        std::process::exit(2);
    });
    let cli = Cli::from_arg_matches(&command.get_matches_from(&args)).unwrap_or_else(|e| e.exit());
    // Logs go to stderr: stdout carries alerts (agent) or command output.
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    match dispatch(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("monitor: {e:#}");
            std::process::exit(1);
        }
    }
}
