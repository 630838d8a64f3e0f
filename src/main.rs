use std::process::ExitCode;

fn main() -> ExitCode {
    nbdcrypt::cli::main()
}
