//! gitlab-runner's `config_exec`.
fn main() {
    let codes = aliyun_spot_executor::env::Env::from_process().exit_codes();
    let result = Err(aliyun_spot_executor::exit::StageError::system(
        "the `config` stage is not implemented yet in this build; use a released version",
    ));
    std::process::exit(codes.code_for(&result));
}
