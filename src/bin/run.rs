//! gitlab-runner's `run_exec <script_path> <stage_name>` (see `aliyun_spot_executor::stages::run`).
use std::path::PathBuf;

use clap::Parser;

/// The `run` stage of aliyun-spot-executor: runs one stage script on the job's instance.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (default: `ALIYUN_SPOT_CONFIG`, then /etc/aliyun-spot-executor/config.toml).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The script gitlab-runner generated for this stage.
    script: PathBuf,
    /// The stage name (`build_script`, `step_*`, `after_script`, ...).
    stage: String,
}

fn main() {
    let args = Args::parse();
    aliyun_spot_executor::logging::init();
    let (script, stage) = (args.script, args.stage);
    aliyun_spot_executor::stages::main(
        |ctx| aliyun_spot_executor::stages::run::run(ctx, &script, &stage),
        args.config,
        false,
    )
}
