//! The SSH session against a real OpenSSH `sshd` on a loopback address: readiness, host-key
//! pinning, authentication, live output, exit statuses, stdin, cancel and a dying server.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aliyun_spot_executor::emulator::sshd_config;
use aliyun_spot_executor::keys::{self, KeyPair};
use aliyun_spot_executor::secret::Secret;
use aliyun_spot_executor::ssh::{run_script, wait_until_ready, RunOutcome, SshError, SshTarget};

/// An sshd configured (keys, config file) but not started yet.
struct SshdSetup {
    dir: tempfile::TempDir,
    ip: String,
    port: u16,
    host: KeyPair,
    client: KeyPair,
}

/// A running `sshd -D`; killed with all its descendants when dropped.
struct Sshd {
    setup: SshdSetup,
    child: Child,
}

/// A random free loopback endpoint in 127.0.200.0 – 127.0.250.255 on a high port, so tests
/// running in parallel (and other suites on this machine) do not collide.
fn free_endpoint() -> (String, u16) {
    for _ in 0..100 {
        let ip = format!("127.0.{}.{}", 200 + rand::random::<u8>() % 51, 1 + rand::random::<u8>() % 254);
        let port = 20_000 + rand::random::<u16>() % 40_000;
        if TcpListener::bind((ip.as_str(), port)).is_ok() {
            return (ip, port);
        }
    }
    panic!("no free loopback endpoint found");
}

impl SshdSetup {
    fn new() -> SshdSetup {
        let dir = crate::private_tempdir();
        let (ip, port) = free_endpoint();
        let host = keys::generate_ed25519("test-host").unwrap();
        let client = keys::generate_ed25519("test-client").unwrap();
        let host_key = dir.path().join("host_ed25519");
        fs::write(&host_key, host.private_openssh.expose()).unwrap();
        fs::set_permissions(&host_key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(dir.path().join("authorized_keys"), format!("{}\n", client.public_openssh)).unwrap();
        let config = sshd_config(
            SocketAddr::new(ip.parse().unwrap(), port),
            &host_key,
            &dir.path().join("authorized_keys"),
            "VERBOSE",
        );
        fs::write(dir.path().join("sshd_config"), config).unwrap();
        SshdSetup { dir, ip, port, host, client }
    }

    fn target(&self) -> SshTarget {
        SshTarget {
            host: self.ip.clone(),
            port: self.port,
            user: "root".into(),
            private_key: self.client.private_openssh.clone(),
            host_key: self.host.public_openssh.clone(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    fn start(self) -> Sshd {
        // sshd's privilege-separation directory.
        fs::create_dir_all("/run/sshd").unwrap();
        let log = fs::File::create(self.dir.path().join("sshd.log")).unwrap();
        let mut child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start /usr/sbin/sshd");
        for _ in 0..200 {
            if let Some(status) = child.try_wait().unwrap() {
                let log = fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default();
                panic!("sshd exited with {status}:\n{log}");
            }
            if TcpStream::connect((self.ip.as_str(), self.port)).is_ok() {
                return Sshd { setup: self, child };
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        panic!("sshd did not listen on {}:{}", self.ip, self.port);
    }
}

impl Sshd {
    fn target(&self) -> SshTarget {
        self.setup.target()
    }

    fn dir(&self) -> &Path {
        self.setup.dir.path()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.wait();
        if thread::panicking() {
            let log = fs::read_to_string(self.dir().join("sshd.log")).unwrap_or_default();
            eprintln!("--- sshd log ---\n{log}");
        }
    }
}

/// SIGKILLs `root` and every process descended from it.
fn kill_tree(root: u32) {
    for p in crate::process_tree(root) {
        // SAFETY: plain syscall on a pid we found under our own child.
        unsafe {
            libc::kill(p as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Live (not zombie) processes whose command line is exactly `argv`.
fn live_processes(argv: &[&str]) -> Vec<u32> {
    let want = argv.iter().map(|a| format!("{a}\0")).collect::<String>();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline == want.as_bytes() {
            let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            if !zombie {
                found.push(pid);
            }
        }
    }
    found
}

type Hook = Box<dyn FnMut() + Send>;
type Hooks = Arc<Mutex<Vec<(String, Option<Hook>)>>>;

/// A writer that records everything and runs a hook the first time a pattern appears.
#[derive(Clone)]
struct Tap {
    data: Arc<Mutex<Vec<u8>>>,
    hooks: Hooks,
}

impl Tap {
    fn new() -> Tap {
        Tap { data: Arc::default(), hooks: Arc::default() }
    }

    fn on(self, pattern: &str, hook: impl FnMut() + Send + 'static) -> Tap {
        self.hooks.lock().unwrap().push((pattern.to_string(), Some(Box::new(hook))));
        self
    }

    fn text(&self) -> String {
        String::from_utf8(self.data.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut data = self.data.lock().unwrap();
        data.extend_from_slice(buf);
        let text = String::from_utf8_lossy(&data).into_owned();
        drop(data);
        for (pattern, hook) in self.hooks.lock().unwrap().iter_mut() {
            if text.contains(pattern.as_str()) {
                if let Some(mut h) = hook.take() {
                    h();
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run(t: &SshTarget, script: &str) -> (Result<RunOutcome, SshError>, String, String) {
    let (mut out, mut err) = (Tap::new(), Tap::new());
    let r = run_script(t, script.as_bytes(), "bash", &mut out, &mut err, &AtomicBool::new(false));
    (r, out.text(), err.text())
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

#[test]
fn ready_after_sshd_starts_late() {
    let setup = SshdSetup::new();
    let target = setup.target();
    let mut pending = Some(setup);
    let mut running = None;
    let mut attempts = 0;
    // sshd is started only once three attempts have failed against a closed port.
    let r = wait_until_ready(&target, deadline(60), &mut |_elapsed| {
        attempts += 1;
        if attempts == 3 {
            running = pending.take().map(SshdSetup::start);
        }
    });
    assert!(r.is_ok(), "{}", r.unwrap_err());
    assert!(attempts >= 3, "attempts {attempts}");
    assert!(running.is_some());
}

#[test]
fn readiness_gives_up_at_the_deadline() {
    let setup = SshdSetup::new();
    let t = setup.target();
    let mut elapsed = Vec::new();
    let err = wait_until_ready(&t, deadline(1), &mut |e| elapsed.push(e)).unwrap_err();
    match &err {
        SshError::NotReady { addr, last, .. } => {
            assert_eq!(addr, &t.addr());
            assert!(matches!(**last, SshError::Connect { .. }), "{last}");
        }
        other => panic!("expected NotReady, got {other}"),
    }
    assert!(err.to_string().starts_with(&format!("SSH on {} was not ready after ", t.addr())), "{err}");
    assert!(elapsed.len() >= 2, "{elapsed:?}");
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn host_key_mismatch_is_refused_and_nothing_runs() {
    let sshd = SshdSetup::new().start();
    let impostor = keys::generate_ed25519("other").unwrap();
    let t = SshTarget { host_key: impostor.public_openssh.clone(), ..sshd.target() };
    let expected = keys::fingerprint_sha256(&impostor.public_openssh).unwrap();
    let got = keys::fingerprint_sha256(&sshd.setup.host.public_openssh).unwrap();

    let err = wait_until_ready(&t, deadline(60), &mut |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("host key of {} does not match the pinned key: expected {expected}, got {got}", t.addr())
    );

    let marker = sshd.dir().join("ran");
    let (r, _, _) = run(&t, &format!("touch {}\n", marker.display()));
    match r {
        Err(SshError::HostKeyMismatch { expected: e, got: g, .. }) => {
            assert_eq!((e, g), (expected, got));
        }
        other => panic!("expected HostKeyMismatch, got {other:?}"),
    }
    assert!(!marker.exists(), "a command ran despite the host-key mismatch");
    // The mismatch was detected before authentication: sshd never saw the client key.
    drop(sshd);
}

#[test]
fn wrong_client_key_is_an_auth_error() {
    let sshd = SshdSetup::new().start();
    let stranger = keys::generate_ed25519("stranger").unwrap();
    let t = SshTarget { private_key: stranger.private_openssh.clone(), ..sshd.target() };
    let err = wait_until_ready(&t, deadline(60), &mut |_| {}).unwrap_err();
    assert!(matches!(err, SshError::Auth { .. }), "{err}");
    let prefix = format!("SSH authentication as `root` on {} failed: ", t.addr());
    assert!(err.to_string().starts_with(&prefix), "{err}");
    assert!(!err.to_string().contains("PRIVATE KEY"));

    let marker = sshd.dir().join("ran");
    let (r, _, _) = run(&t, &format!("touch {}\n", marker.display()));
    assert!(matches!(r, Err(SshError::Auth { .. })), "{r:?}");
    assert!(!marker.exists());
}

#[test]
fn ready_when_keys_match() {
    let sshd = SshdSetup::new().start();
    let mut attempts = 0;
    wait_until_ready(&sshd.target(), deadline(60), &mut |_| attempts += 1).unwrap();
    assert_eq!(attempts, 1);
}

#[test]
fn output_is_streamed_while_the_script_runs() {
    let sshd = SshdSetup::new().start();
    let m1 = sshd.dir().join("m1");
    let m2 = sshd.dir().join("m2");
    // The script waits for markers that the test creates only when the previous line has
    // reached the writer; if output were held until the end, it would give up with status 3.
    let script = format!(
        "wait_for() {{ i=0; while [ ! -e \"$1\" ]; do sleep 0.05; i=$((i+1)); \
         if [ $i -gt 600 ]; then echo \"gave up waiting for $1\"; exit 3; fi; done; }}\n\
         echo first\n\
         wait_for {m1}\n\
         echo err-first >&2\n\
         wait_for {m2}\n\
         echo second\n",
        m1 = m1.display(),
        m2 = m2.display()
    );
    let m1c = m1.clone();
    let mut out = Tap::new().on("first\n", move || fs::write(&m1c, b"").unwrap());
    let m2c = m2.clone();
    let mut err = Tap::new().on("err-first\n", move || fs::write(&m2c, b"").unwrap());
    let r =
        run_script(&sshd.target(), script.as_bytes(), "bash", &mut out, &mut err, &AtomicBool::new(false))
            .unwrap();
    assert_eq!(r, RunOutcome { exit_status: Some(0), signal: None, cancelled: false });
    assert_eq!(out.text(), "first\nsecond\n");
    assert_eq!(err.text(), "err-first\n");
}

#[test]
fn exit_statuses_are_reported() {
    let sshd = SshdSetup::new().start();
    let t = sshd.target();
    let (r, out, _) = run(&t, "echo ok\n");
    assert_eq!(r.unwrap(), RunOutcome { exit_status: Some(0), signal: None, cancelled: false });
    assert_eq!(out, "ok\n");
    let (r, out, err) = run(&t, "echo before\necho oops >&2\nexit 7\necho after\n");
    assert_eq!(r.unwrap(), RunOutcome { exit_status: Some(7), signal: None, cancelled: false });
    assert_eq!(out, "before\n");
    assert_eq!(err, "oops\n");
    // The interpreter is the one asked for.
    let (r, out, _) = run(&t, "echo \"$BASH_VERSION\" | cut -c1\n");
    assert_eq!(r.unwrap().exit_status, Some(0));
    assert!(out.trim().parse::<u32>().is_ok(), "{out}");
}

#[test]
fn script_stdin_is_eof_not_its_own_text() {
    let sshd = SshdSetup::new().start();
    let script = "if read -r line; then echo \"stdin gave: $line\"; else echo eof; fi\ncat\necho done\n";
    let (r, out, err) = run(&sshd.target(), script);
    assert_eq!(r.unwrap().exit_status, Some(0), "{err}");
    assert_eq!(out, "eof\ndone\n");
}

#[test]
fn script_is_uploaded_privately_and_cleaned_up() {
    let sshd = SshdSetup::new().start();
    let script = "d=$(dirname \"$0\")\nstat -c '%a %n' \"$d\" \"$0\" | sed \"s|$d|DIR|\"\necho \"$d\" >&2\n";
    let (r, out, err) = run(&sshd.target(), script);
    assert_eq!(r.unwrap().exit_status, Some(0));
    assert_eq!(out, "700 DIR\n700 DIR/script\n");
    let dir = PathBuf::from(err.trim());
    assert!(dir.is_absolute());
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

#[test]
fn cancel_kills_the_remote_process_group() {
    let sshd = SshdSetup::new().start();
    let seconds = format!("9{:07}", rand::random::<u32>() % 10_000_000);
    let script = format!("echo started\nsleep {seconds} &\nsleep {seconds}\necho not-reached\n");
    let cancel = Arc::new(AtomicBool::new(false));
    let c = Arc::clone(&cancel);
    let s = seconds.clone();
    let mut out = Tap::new().on("started\n", move || {
        // Wait until both sleeps exist, so the cancel really has something to kill.
        for _ in 0..200 {
            if live_processes(&["sleep", &s]).len() == 2 {
                break;
            }
            thread::sleep(Duration::from_millis(25));
        }
        c.store(true, Ordering::SeqCst);
    });
    let mut err = Tap::new();
    let r = run_script(&sshd.target(), script.as_bytes(), "bash", &mut out, &mut err, &cancel).unwrap();
    assert!(r.cancelled, "{r:?}");
    let left = live_processes(&["sleep", &seconds]);
    for p in &left {
        // SAFETY: plain syscall; do not leave them behind if the assertion below fails.
        unsafe {
            libc::kill(*p as libc::pid_t, libc::SIGKILL);
        }
    }
    assert_eq!(left, Vec::<u32>::new(), "remote processes survived the cancel");
    assert_eq!(r.exit_status, Some(143), "{r:?}");
    assert_eq!(out.text(), "started\n");
}

#[test]
fn sshd_dying_mid_script_is_lost() {
    let sshd = SshdSetup::new().start();
    let pid = sshd.child.id();
    // The script names its upload directory on stderr first; everything is SIGKILLed, so
    // nobody else removes it.
    let mut err = Tap::new();
    let mut out = Tap::new().on("started\n", move || kill_tree(pid));
    let r = run_script(
        &sshd.target(),
        b"dirname \"$0\" >&2\nsleep 0.2\necho started\nsleep 60\necho end\n",
        "bash",
        &mut out,
        &mut err,
        &AtomicBool::new(false),
    );
    let upload_dir = PathBuf::from(err.text().trim());
    if upload_dir.starts_with("/tmp")
        && upload_dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("aliyun-spot."))
    {
        let _ = fs::remove_dir_all(&upload_dir);
    }
    match r {
        Err(e @ SshError::Lost { .. }) => {
            let prefix = format!("SSH connection to {} was lost: ", sshd.target().addr());
            assert!(e.to_string().starts_with(&prefix), "{e}");
        }
        other => panic!("expected Lost, got {other:?}"),
    }
    assert_eq!(out.text(), "started\n");
}

#[test]
fn private_key_is_never_in_errors() {
    let sshd = SshdSetup::new().start();
    let t = SshTarget {
        private_key: Secret::new("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n".into()),
        ..sshd.target()
    };
    let (r, _, _) = run(&t, "true\n");
    let e = r.unwrap_err();
    assert!(matches!(e, SshError::Auth { .. }), "{e}");
    assert!(!e.to_string().contains("xx") && !format!("{e:?}").contains("BEGIN"), "{e}");
    assert!(!format!("{t:?}").contains("BEGIN"));
}

/// Counts bytes and raises the cancel flag once a megabyte has arrived.
struct FloodSink {
    seen: usize,
    cancel: Arc<AtomicBool>,
}

impl Write for FloodSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.seen += buf.len();
        if self.seen > 1 << 20 {
            self.cancel.store(true, Ordering::SeqCst);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn cancel_works_while_output_floods() {
    let sshd = SshdSetup::new().start();
    let word = format!("flood-{}", rand::random::<u32>());
    let cancel = Arc::new(AtomicBool::new(false));
    let mut out = FloodSink { seen: 0, cancel: Arc::clone(&cancel) };
    let mut err = Tap::new();
    let script = format!("yes {word}\n");
    let r = run_script(&sshd.target(), script.as_bytes(), "bash", &mut out, &mut err, &cancel).unwrap();
    let left = live_processes(&["yes", &word]);
    for p in &left {
        // SAFETY: plain syscall; do not leave them behind if the assertion below fails.
        unsafe {
            libc::kill(*p as libc::pid_t, libc::SIGKILL);
        }
    }
    assert_eq!(left, Vec::<u32>::new(), "remote processes survived the cancel");
    assert_eq!(r, RunOutcome { exit_status: Some(143), signal: None, cancelled: true });
    assert!(out.seen > 1 << 20);
}

/// `root` and its descendants whose command name starts with `sshd` (the listener and the
/// per-connection processes, not the shells they started).
fn sshd_tree(root: u32) -> Vec<u32> {
    let is_sshd =
        |p: &u32| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default().starts_with("sshd");
    crate::process_tree(root).into_iter().filter(is_sshd).collect()
}

fn signal_all(pids: &[u32], sig: i32) {
    for p in pids {
        // SAFETY: plain syscall on sshd processes the emulator started for this test.
        unsafe {
            libc::kill(*p as libc::pid_t, sig);
        }
    }
}

#[test]
fn a_stalled_sshd_is_a_lost_connection_once_keepalives_go_unanswered() {
    use crate::executor::World;
    use aliyun_spot_executor::emulator::Faults;
    let w = World::with(
        Faults::default(),
        &[
            ("ssh", "keepalive_interval", toml::Value::String("1s".into())),
            ("ssh", "keepalive_count_max", toml::Value::Integer(2)),
            ("ssh", "connect_timeout", toml::Value::String("1s".into())),
        ],
    );
    // Were the stall not noticed, the script would end by itself and the stage would pass.
    let job = w.job("1006", "echo started; sleep 30; echo finished");
    let mut a = w.attempt(&job);
    assert!(a.config().unwrap().0.success(), "{}", a.log.text());
    assert!(a.prepare().unwrap().success(), "{}", a.log.text());
    let inst = w.emulator.instances().into_iter().find(|i| i.deleted.is_none()).unwrap();
    let mut stopped = Vec::new();
    for (stage, body) in &job.stages {
        if stage != "build_script" {
            assert!(a.run_stage(stage, body).unwrap().success(), "{stage}: {}", a.log.text());
            continue;
        }
        let running = a.start_stage(stage, body).unwrap();
        assert!(a.log.wait_for("started\n", Duration::from_secs(30)), "{}", a.log.text());
        stopped = sshd_tree(inst.sshd_pid.expect("sshd runs"));
        assert!(stopped.len() >= 2, "the listener and the job's session: {stopped:?}");
        signal_all(&stopped, libc::SIGSTOP);
        let exit = running.wait().unwrap();
        signal_all(&stopped, libc::SIGCONT);
        assert_eq!(
            exit,
            aliyun_spot_executor::demo::gitlab::Exit::Code(2),
            "a system failure: {}",
            a.log.text()
        );
        break;
    }
    assert!(!stopped.is_empty(), "the build stage ran");
    let log = a.log.text();
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    let expected = format!(
        "ERROR: lost the SSH connection to {} during stage `build_script`: SSH connection to {}:{} was lost: the \
         server answered none of 2 keepalives in 3s (`ssh.keepalive_interval` = 1s, `ssh.keepalive_count_max` = 2); \
         stopping the script's processes failed too (",
        inst.id, inst.ip, inst.ssh_port
    );
    assert!(errors[0].starts_with(&expected), "{}\n{expected}", errors[0]);
    // The `$ command` line echoes the command; its last output never comes.
    assert!(!log.lines().any(|l| l == "finished"), "{log}");
    assert!(a.cleanup().unwrap().success(), "{}", a.runner_log.text());
    w.assert_nothing_left();
}
