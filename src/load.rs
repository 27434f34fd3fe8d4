//! The load generator (`ringcast load`). Filled in below.
/// Arguments of `ringcast load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {}
/// Runs a load scenario.
pub fn run(_args: &LoadArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
