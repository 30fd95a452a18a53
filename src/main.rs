//! The `ckptmap` command line: parses flags, runs the command, turns an error into one
//! line and the exit code. Exit codes: 0 success, 1 a check said "different"/"wrong", 2 bad
//! input or failure. Everything else is in `cli/` (the binary's) and the library.

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::args::Cli;
use cli::commands::{run, silence_stdout};

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`ckptmap inspect big.pth | head`) instead of panicking on a failed print.
    // SAFETY: restores the default action of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // -q: nothing on stdout but the documents --json asks for (and what completions / man
    // are for); errors still go to stderr.
    if cli.quiet && !cli.command.prints_a_document() {
        silence_stdout();
    }
    // Ctrl-C / SIGTERM / SIGHUP remove unfinished outputs' temporary files (exit 130/143/129).
    let on_signal = |i: ckptmap::write::atomic::Interrupted| {
        let what = match i.left_as_they_were.as_slice() {
            [] => String::new(),
            [one] => format!("; {} left as it was", one.display()),
            many => format!("; {} outputs left as they were", many.len()),
        };
        eprintln!("error: interrupted by {}{what}", i.name);
        std::process::exit(128 + i.signal);
    };
    if let Err(e) = ckptmap::write::atomic::remove_temporaries_on_signal(on_signal) {
        eprintln!("warning: cannot install signal handlers: {e}");
    }
    match run(cli.command, cli.quiet) {
        Ok(code) => code,
        Err(e) => {
            // One line: each cause once (many errors already quote their source).
            let mut line = e.to_string();
            for cause in e.chain().skip(1).map(|c| c.to_string()) {
                if !line.contains(&cause) {
                    line = format!("{line}: {cause}");
                }
            }
            eprintln!("error: {}", line.replace('\n', " "));
            ExitCode::from(2)
        }
    }
}
