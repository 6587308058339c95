use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = keyhaven_injector::config::Cli::parse();
    keyhaven_injector::run(cli).await?;
    Ok(())
}
