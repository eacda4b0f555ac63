//! The `egress` binary: a thin shell around [`egress_user::cli`].

fn main() -> std::process::ExitCode {
    egress_user::cli::main()
}
