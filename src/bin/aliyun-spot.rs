//! `aliyun-spot`: the administrator's tool (prices, instances, sweep, doctor, emulator, demo).
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use aliyun_spot_executor::admin::{self, sweep};
use aliyun_spot_executor::{demo, emulator, exit, github, keeper};

/// Administer aliyun-spot-executor: spot prices, managed instances, leak sweeping, checks, and
/// the local ECS emulator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (default: `ALIYUN_SPOT_CONFIG`, then /etc/aliyun-spot-executor/config.toml;
    /// `prices`, `instances` and `sweep` also work from the environment alone).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The ranked spot offers that fit a shape (cheapest first).
    Prices {
        #[command(flatten)]
        shape: admin::ShapeArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Ask ECS now instead of using the runner host's price cache (and leave it alone).
        #[arg(long)]
        fresh: bool,
    },
    /// Instances managed by this executor in the configured region.
    Instances {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete managed instances whose job is over.
    Sweep(sweep::SweepArgs),
    /// Check credentials, region, images, security group, vswitches and permissions (DryRun).
    Doctor {
        /// Also create the cheapest fitting spot instance as prepare would, log in over SSH, run
        /// `uname -a`, look for `git` and `gitlab-runner`, and delete it (costs a few minutes of
        /// that instance; the price is printed first).
        #[arg(long)]
        live: bool,
    },
    /// Run the local ECS emulator.
    Emulator(Box<emulator::EmulatorArgs>),
    /// Run a sample CI job end to end against the emulator, as gitlab-runner would.
    Demo(demo::DemoArgs),
    /// Ephemeral GitHub Actions runners on spot instances (docs/github-actions.md).
    #[command(subcommand)]
    Github(GithubCommand),
    /// The per-job SSH session keeper that `prepare` starts (internal; reads its settings on
    /// stdin).
    #[command(name = "keep-session", hide = true)]
    KeepSession,
}

#[derive(Subcommand)]
enum GithubCommand {
    /// Register a just-in-time runner and create its spot instance; prints label=, instance-id=
    /// and runner-name= (also appended to $GITHUB_OUTPUT).
    Start(Box<github::StartArgs>),
    /// Delete the runner's instance and deregister the runner (already gone is success).
    Stop(github::StopArgs),
    /// Delete runner instances whose runner is gone, idle too long, or past the lifetime.
    Sweep(github::SweepArgs),
}

fn main() {
    let cli = Cli::parse();
    aliyun_spot_executor::logging::init();
    let config = cli.config.as_deref();
    let result = match cli.command {
        Command::Prices { shape, json, fresh } => admin::prices(config, &shape, json, fresh),
        Command::Instances { json } => admin::instances(config, json),
        Command::Sweep(args) => sweep::run(config, &args),
        Command::Doctor { live: false } => admin::doctor(config),
        Command::Doctor { live: true } => admin::live::doctor_live(config),
        Command::Emulator(args) => emulator::run_cli(*args),
        Command::Demo(args) => demo::run(&args),
        Command::Github(GithubCommand::Start(args)) => github::start_cli(config, &args),
        Command::Github(GithubCommand::Stop(args)) => github::stop_cli(config, &args),
        Command::Github(GithubCommand::Sweep(args)) => github::sweep_cli(config, &args),
        Command::KeepSession => keeper::serve(),
    };
    std::process::exit(exit::admin_code(&result));
}
