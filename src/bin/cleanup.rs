//! gitlab-runner's `cleanup_exec` (see `aliyun_spot_executor::stages::cleanup`).
use clap::Parser;

/// The `cleanup` stage of aliyun-spot-executor, called by gitlab-runner.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (default: `ALIYUN_SPOT_CONFIG`, then /etc/aliyun-spot-executor/config.toml).
    #[arg(long, value_name = "PATH")]
    config: Option<std::path::PathBuf>,
}

fn main() {
    let args = Args::parse();
    aliyun_spot_executor::logging::init();
    aliyun_spot_executor::stages::main(aliyun_spot_executor::stages::cleanup::run, args.config, true)
}
