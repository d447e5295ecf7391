//! `orderflow serve` and `orderflow migrate`.

use std::process::ExitCode;

use services::config::{Config, parse_services};

use crate::cli::{ServeArgs, ServiceList};

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let ServeArgs {
        services,
        port,
        instance_id,
        settings,
    } = args;
    let mut config = Config::from_settings(settings, |name| std::env::var(name).ok())?;
    let services = match services {
        Some(ServiceList(services)) => services,
        None => parse_services(None).map_err(anyhow::Error::msg)?,
    };
    if let Some(port) = port {
        let [service] = services[..] else {
            eprintln!("orderflow: error: --port takes one service; run one process per instance");
            return Ok(ExitCode::from(2));
        };
        config.set_port(service, port);
    }
    config.instance_id = instance_id;
    services::serve::run(&config, &services).await?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn migrate() -> anyhow::Result<ExitCode> {
    let config = Config::from_env()?;
    for (service, database) in services::setup::migrate_all(&config).await? {
        println!("{service}: database {database} is migrated");
    }
    Ok(ExitCode::SUCCESS)
}
