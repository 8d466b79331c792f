//! `outcache config`: the effective configuration, redacted, with where each value came from.

#[allow(unused_imports)]
use super::prelude::*;

#[derive(clap::Args, Debug)]
pub(crate) struct ConfigArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn config(ctx: &Ctx, args: ConfigArgs) -> Result<(), Failure> {
    let ConfigArgs { json } = args;
    let config = &ctx.config;
    let lines = config.describe();
    if json {
        let map: serde_json::Map<String, Value> = lines
            .into_iter()
            .map(|(k, v, source)| (k, serde_json::json!({ "value": v, "source": source })))
            .collect();
        out!("{}", Value::Object(map));
    } else {
        for (key, value, source) in lines {
            out!("{key:<22} = {value:<50} ({source})");
        }
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ] {
            if std::env::var_os(var).is_some() {
                out!("{var:<22} = {:<50} (env {var})", "set (value hidden)");
            }
        }
    }
    Ok(())
}
