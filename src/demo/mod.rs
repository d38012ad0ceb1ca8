//! `aliyun-spot demo`: a sample CI job, end to end, against the emulator.

pub mod gitlab;
