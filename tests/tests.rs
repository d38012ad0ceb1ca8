//! Integration tests: the real binaries, the emulator and real sshd.
mod emulator;
