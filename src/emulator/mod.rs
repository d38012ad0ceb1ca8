//! A local ECS API emulator with a real OpenSSH `sshd` behind every instance.
