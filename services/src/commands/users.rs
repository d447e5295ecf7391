//! `orderflow users grant|revoke`: a user's roles.

use std::process::ExitCode;

use anyhow::Context;
use services::config::Config;
use services::ops;

use super::json_line;
use crate::cli::UsersCommand;

pub(crate) async fn users(command: UsersCommand) -> anyhow::Result<ExitCode> {
    let (arguments, grant) = match command {
        UsersCommand::Grant(arguments) => (arguments, true),
        UsersCommand::Revoke(arguments) => (arguments, false),
    };
    let role = domain::user::Role::parse(&arguments.role)
        .with_context(|| format!("unknown role {:?}", arguments.role))?;
    let config = Config::from_env()?;
    let change = ops::set_role(&config, &arguments.user, role, grant).await?;
    if arguments.json {
        json_line(&change)?;
    } else {
        println!("{change}");
    }
    Ok(ExitCode::SUCCESS)
}
