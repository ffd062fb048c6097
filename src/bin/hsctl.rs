//! hsctl: the admin CLI for an hsd cluster.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    hsd::cli::run()
}
