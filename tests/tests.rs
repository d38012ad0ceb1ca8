//! Integration tests: the real binaries, the emulator and real sshd.

mod client_emulator;
mod config;
mod credentials_scope;
mod demo;
mod doctor;
mod ecs_client;
mod emulator;
mod executor;
mod faults;
mod github;
mod helper;
mod host_files;
mod identity;
mod isolation;
mod options;
mod safety;
mod selection_live;
mod ssh;
mod standin;

/// A fresh private directory (0700) for one test under cargo's `target/tmp` of this checkout,
/// never directly in the shared `/tmp`: the driver's state, cache and ledger belong in a
/// directory no other user can plant files in, and the tests keep to the same rule.
pub fn private_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("t")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a private directory under target/tmp")
}

/// gitlab-runner's pause between preparation attempts in the tests: none, as gitlab-runner's
/// own tests set `PreparationRetryInterval = 0` (`common/build_test.go`), so a job whose
/// preparation fails three times does not wait 6 s.
pub const RETRY_INTERVAL: std::time::Duration = std::time::Duration::ZERO;
