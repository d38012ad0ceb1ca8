//! The four gitlab-runner stages.
