use clap::Parser as _;
use monitor::cli::{dispatch, Cli};

fn main() {
    let cli = Cli::parse();
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
