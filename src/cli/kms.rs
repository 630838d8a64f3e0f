//! `nbdcrypt kms …`: the local KMS's operations and its audit log.

use super::{CliResult, Global};

#[derive(clap::Args, Debug)]
pub struct KmsArgs {}

pub fn run(_args: KmsArgs, _global: &Global) -> CliResult {
    Err("the KMS commands are not built yet".into())
}
