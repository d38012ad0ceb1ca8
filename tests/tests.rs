//! Integration tests: the real binaries, the emulator and real sshd.

mod client_emulator;
mod config;
mod demo;
mod doctor;
mod ecs_client;
mod emulator;
mod executor;
mod faults;
mod github;
mod options;
mod safety;
mod selection_live;
mod ssh;
