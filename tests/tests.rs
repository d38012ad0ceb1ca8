//! Integration tests: the real binaries, the emulator and real sshd.

mod config;
mod ecs_client;
mod emulator;
mod executor;
mod faults;
mod ssh;
