//! The `egress` CLI under test (identical to egress-user's `egress` binary).

fn main() -> std::process::ExitCode {
    egress_user::cli::main()
}
