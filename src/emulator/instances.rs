//! Instance state and lifecycle: Pending → Starting → Running, a real `sshd` per instance on its
//! own loopback address, spot reclaim, auto-release, deletion — and the one supervisor thread
//! that spawns and reaps every `sshd`.
//!
//! Why one long-lived thread spawns everything: `prctl(PR_SET_PDEATHSIG)` fires when the
//! *thread* that forked the child exits, so spawning from short-lived HTTP workers would kill
//! sshds at random; spawning from the supervisor ties every sshd to the emulator's lifetime
//! (even a `SIGKILL`ed test process leaves none behind). Deleting an instance kills the sshd
//! and all its descendants — found by walking `/proc`, because per-connection sshd children
//! call `setsid()` and leave the process group — so clients see the connection drop and no
//! remote process survives.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::Serialize;
use time::OffsetDateTime;

use super::catalogue::Catalogue;
use super::{EmulatorOptions, Faults, StsCredentials, RECLAIM_LINGER};
use crate::secret::Secret;

/// Instance status as ECS spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Pending,
    Starting,
    Running,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "Pending",
            Status::Starting => "Starting",
            Status::Running => "Running",
            Status::Stopped => "Stopped",
        }
    }
}

/// One lifecycle event of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// UTC time, RFC 3339.
    pub time: String,
    /// `created`, `starting`, `running`, `sshd-started`, `reclaim-scheduled`, `reclaimed`,
    /// `released`, `deleted`, `sshd-exited`, `sshd-failed`, `auto-released`.
    pub event: String,
    /// Free text.
    pub detail: String,
}

/// What `GET /_emulator/instances` shows of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceRecord {
    /// Instance id.
    pub id: String,
    /// Instance type.
    #[serde(rename = "type")]
    pub instance_type: String,
    /// Zone id.
    pub zone: String,
    /// ECS status (`Pending`, `Starting`, `Running`, `Stopped`), or `Deleted`.
    pub status: String,
    /// Loopback address of the instance.
    pub ip: String,
    /// Port sshd listens on.
    pub ssh_port: u16,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// `InstanceName`.
    pub name: String,
    /// `HostName`: the OS hostname the instance's processes see.
    pub host_name: String,
    /// `SpotStrategy`.
    pub spot_strategy: String,
    /// `SpotPriceLimit`.
    pub spot_price_limit: Option<f64>,
    /// `ImageId`.
    pub image_id: String,
    /// `KeyPairName`.
    pub key_pair_name: Option<String>,
    /// `RamRoleName`.
    pub ram_role: Option<String>,
    /// `ClientToken`.
    pub client_token: Option<String>,
    /// Operation locks (`Recycling`).
    pub operation_locks: Vec<String>,
    /// Creation time.
    pub created: String,
    /// When it became Running.
    pub running: Option<String>,
    /// When it was deleted or released.
    pub deleted: Option<String>,
    /// Scheduled spot termination time.
    pub termination_time: Option<String>,
    /// `AutoReleaseTime`.
    pub auto_release_time: Option<String>,
    /// The sshd process id while one runs.
    pub sshd_pid: Option<u32>,
    /// Lifecycle events.
    pub events: Vec<EventRecord>,
    /// Not yet deleted or released.
    pub live: bool,
}

/// An emulated instance.
pub(crate) struct Instance {
    pub id: String,
    pub name: String,
    pub host_name: String,
    pub instance_type: String,
    pub zone: String,
    pub image_id: String,
    pub vswitch_id: String,
    pub security_group_id: String,
    pub spot_strategy: String,
    pub spot_price_limit: Option<f64>,
    pub spot_duration: Option<u32>,
    pub bandwidth_out: u32,
    pub key_pair_name: Option<String>,
    pub ram_role: Option<String>,
    pub user_data: Option<Secret<String>>,
    pub tags: Vec<(String, String)>,
    pub auto_release: Option<OffsetDateTime>,
    pub client_token: Option<String>,
    pub cpu: u32,
    pub memory_mib: u64,
    pub status: Status,
    pub locks: Vec<String>,
    pub ip: Ipv4Addr,
    pub ssh_port: u16,
    pub created: OffsetDateTime,
    pub running: Option<OffsetDateTime>,
    pub deleted: Option<OffsetDateTime>,
    pub stopped: Option<OffsetDateTime>,
    pub boot_delay: Duration,
    pub ssh_delay: Duration,
    pub never_boot: bool,
    /// DeleteInstance is refused this long after creation (`initializing` fault).
    pub initializing: Duration,
    pub termination_time: Option<OffsetDateTime>,
    pub authorized_keys: Vec<String>,
    pub host_key: Option<Secret<String>>,
    pub sshd_pid: Option<u32>,
    /// The boot process (`--boot-user-data`) while it runs.
    pub boot_pid: Option<u32>,
    pub sshd_started: bool,
    pub events: Vec<EventRecord>,
    pub live: bool,
}

impl Instance {
    pub fn event(&mut self, event: &str, detail: impl Into<String>) {
        self.events.push(EventRecord {
            time: rfc3339(now()),
            event: event.to_string(),
            detail: detail.into(),
        });
    }

    pub fn record(&self) -> InstanceRecord {
        InstanceRecord {
            id: self.id.clone(),
            instance_type: self.instance_type.clone(),
            zone: self.zone.clone(),
            status: if self.live { self.status.as_str().to_string() } else { "Deleted".to_string() },
            ip: self.ip.to_string(),
            ssh_port: self.ssh_port,
            tags: self.tags.iter().cloned().collect(),
            name: self.name.clone(),
            host_name: self.host_name.clone(),
            spot_strategy: self.spot_strategy.clone(),
            spot_price_limit: self.spot_price_limit,
            image_id: self.image_id.clone(),
            key_pair_name: self.key_pair_name.clone(),
            ram_role: self.ram_role.clone(),
            client_token: self.client_token.clone(),
            operation_locks: self.locks.clone(),
            created: rfc3339(self.created),
            running: self.running.map(rfc3339),
            deleted: self.deleted.map(rfc3339),
            termination_time: self.termination_time.map(rfc3339),
            auto_release_time: self.auto_release.map(rfc3339),
            sshd_pid: self.sshd_pid,
            events: self.events.clone(),
            live: self.live,
        }
    }
}

/// A registered key pair.
pub(crate) struct KeyPair {
    pub name: String,
    pub public_key: String,
    pub fingerprint: String,
    pub created: OffsetDateTime,
}

/// Issued STS credentials.
pub(crate) struct StsRecord {
    pub subject: String,
    pub role: String,
    pub access_key_id: String,
    pub secret: Secret<String>,
    pub token: Secret<String>,
    pub issued: OffsetDateTime,
    pub expiration: OffsetDateTime,
    /// The session policy of `AssumeRole` credentials ([`super::ram`]); `None`: the role's.
    pub policy: Option<super::ram::Policy>,
}

/// Everything behind the state lock.
#[derive(Default)]
pub(crate) struct State {
    pub instances: BTreeMap<String, Instance>,
    pub order: Vec<String>,
    pub key_pairs: BTreeMap<String, KeyPair>,
    /// ClientToken → (parameter fingerprint, instance ids).
    pub client_tokens: HashMap<String, (String, Vec<String>)>,
    pub sts: Vec<StsRecord>,
    /// Metadata tokens → expiry.
    pub metadata_tokens: HashMap<String, OffsetDateTime>,
    /// Set once a metadata token was issued: GETs must then carry one.
    pub hardened: bool,
    pub action_counts: BTreeMap<String, u64>,
    pub created: u64,
    pub deleted: u64,
}

/// Fault settings and their dice.
pub(crate) struct FaultState {
    pub faults: Faults,
    pub boot_delay: Duration,
    pub ssh_delay: Duration,
    pub rng: rand::rngs::StdRng,
    pub rpc_count: u64,
}

/// A bounded set of recently used signature nonces.
#[derive(Default)]
pub(crate) struct NonceSet {
    set: HashSet<String>,
    order: VecDeque<String>,
}

const NONCE_CAPACITY: usize = 100_000;

impl NonceSet {
    /// Records `nonce`; false when it was seen before.
    pub fn insert(&mut self, nonce: &str) -> bool {
        if self.set.contains(nonce) {
            return false;
        }
        if self.order.len() >= NONCE_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(nonce.to_string());
        self.order.push_back(nonce.to_string());
        true
    }
}

/// One RPC request as the log keeps it (secrets redacted).
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// UTC time, RFC 3339.
    pub time: String,
    /// HTTP method.
    pub method: String,
    /// `Action`, if given.
    pub action: Option<String>,
    /// `AccessKeyId`, if given.
    pub access_key_id: Option<String>,
    /// The RAM role when signed with emulator-issued STS credentials.
    pub role: Option<String>,
    /// Parameters with `Signature`, `SecurityToken`, `UserData` and secrets replaced by
    /// `REDACTED`.
    pub params: BTreeMap<String, String>,
    /// HTTP status answered.
    pub status: u16,
    /// Error code answered, if any.
    pub code: Option<String>,
    /// The `RequestId` answered.
    pub request_id: String,
    /// Client address.
    pub source: String,
}

/// The emulator's shared core.
pub(crate) struct Core {
    pub catalogue: Catalogue,
    pub access_keys: Vec<(String, Secret<String>)>,
    pub host_ram_role: Option<String>,
    pub work_dir: PathBuf,
    pub listen: SocketAddr,
    pub state: Mutex<State>,
    pub fault_state: Mutex<FaultState>,
    pub log: Mutex<Vec<RequestRecord>>,
    pub nonces: Mutex<NonceSet>,
    pub shutdown: AtomicBool,
    is_root: bool,
    boot_user_data: bool,
}

/// Locks a mutex, ignoring poisoning (a panicked worker must not take the emulator down).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// `yyyy-MM-ddTHH:mm:ssZ`, the format ECS uses.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    crate::ecs::types::format_utc(t)
}

/// `yyyy-MM-ddTHH:mmZ`, the short format of `CreationTime`.
pub(crate) fn ecs_minutes(t: OffsetDateTime) -> String {
    let s = rfc3339(t);
    format!("{}Z", &s[..16])
}

/// Random lower-case alphanumerics.
pub(crate) fn random_alnum(n: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::thread_rng();
    (0..n).map(|_| char::from(CHARS[r.gen_range(0..CHARS.len())])).collect()
}

/// Addresses taken by any emulator in this process (several tests run emulators in parallel).
fn taken_ips() -> &'static Mutex<HashSet<Ipv4Addr>> {
    static TAKEN: OnceLock<Mutex<HashSet<Ipv4Addr>>> = OnceLock::new();
    TAKEN.get_or_init(|| Mutex::new(HashSet::new()))
}

impl Core {
    pub fn new(catalogue: Catalogue, opts: &EmulatorOptions, work_dir: PathBuf, listen: SocketAddr) -> Core {
        Core {
            catalogue,
            access_keys: opts.access_keys.clone(),
            host_ram_role: opts.host_ram_role.clone(),
            work_dir,
            listen,
            state: Mutex::new(State::default()),
            fault_state: Mutex::new(FaultState {
                faults: opts.faults.clone(),
                boot_delay: opts.boot_delay,
                ssh_delay: opts.ssh_delay,
                rng: rand::rngs::StdRng::seed_from_u64(opts.faults.seed),
                rpc_count: 0,
            }),
            log: Mutex::new(Vec::new()),
            nonces: Mutex::new(NonceSet::default()),
            shutdown: AtomicBool::new(false),
            // SAFETY: geteuid has no preconditions.
            is_root: unsafe { libc::geteuid() } == 0,
            boot_user_data: opts.boot_user_data,
        }
    }

    pub fn faults(&self) -> Faults {
        lock(&self.fault_state).faults.clone()
    }

    pub fn set_faults(&self, f: Faults) {
        let mut fs = lock(&self.fault_state);
        if f.seed != fs.faults.seed {
            fs.rng = rand::rngs::StdRng::seed_from_u64(f.seed);
        }
        fs.faults = f;
    }

    pub fn set_delays(&self, boot: Option<Duration>, ssh: Option<Duration>) {
        let mut fs = lock(&self.fault_state);
        if let Some(b) = boot {
            fs.boot_delay = b;
        }
        if let Some(s) = ssh {
            fs.ssh_delay = s;
        }
    }

    pub fn delays(&self) -> (Duration, Duration) {
        let fs = lock(&self.fault_state);
        (fs.boot_delay, fs.ssh_delay)
    }

    pub fn instance_records(&self) -> Vec<InstanceRecord> {
        let st = lock(&self.state);
        st.order.iter().filter_map(|id| st.instances.get(id)).map(Instance::record).collect()
    }

    pub fn summary(&self) -> serde_json::Value {
        let st = lock(&self.state);
        let live = st.instances.values().filter(|i| i.live).count();
        let requests = lock(&self.log).len();
        serde_json::json!({
            "live_instances": live,
            "created": st.created,
            "deleted": st.deleted,
            "requests": requests,
            "actions": st.action_counts,
        })
    }

    /// A free loopback address (never 127.0.0.1) whose port 22 (or a free port when not root)
    /// nobody listens on.
    pub fn allocate_ip(&self) -> anyhow::Result<(Ipv4Addr, u16)> {
        let mut taken = lock(taken_ips());
        let start: u32 = rand::thread_rng().gen_range(0..254 * 254);
        for k in 0..254 * 254 {
            let n = (start + k) % (254 * 254);
            let ip = Ipv4Addr::new(127, 0, (n / 254 + 1) as u8, (n % 254 + 1) as u8);
            if taken.contains(&ip) {
                continue;
            }
            let port = if self.is_root { 22 } else { 0 };
            if let Ok(l) = TcpListener::bind((ip, port)) {
                let port = l.local_addr().map(|a| a.port()).unwrap_or(port);
                taken.insert(ip);
                return Ok((ip, port));
            }
        }
        anyhow::bail!("no free loopback address for a new instance")
    }

    /// Issues (or reuses) STS credentials of `role` for `subject` (an instance id or the host).
    pub fn issue_sts(&self, subject: &str, role: &str, ttl: Duration, reuse: bool) -> StsCredentials {
        let mut st = lock(&self.state);
        let t = now();
        st.sts.retain(|c| c.expiration > t - time::Duration::hours(1));
        if let Some(c) = st.sts.iter().rev().filter(|_| reuse).find(|c| {
            c.subject == subject && c.role == role && c.expiration - t > (c.expiration - c.issued) / 2
        }) {
            return StsCredentials {
                access_key_id: c.access_key_id.clone(),
                access_key_secret: c.secret.clone(),
                security_token: c.token.clone(),
                expiration: c.expiration,
            };
        }
        let ttl = time::Duration::try_from(ttl).unwrap_or(time::Duration::HOUR);
        let rec = StsRecord {
            subject: subject.to_string(),
            role: role.to_string(),
            access_key_id: format!("STS.NU{}", random_alnum(24).to_uppercase()),
            secret: Secret::new(random_alnum(40)),
            token: Secret::new(format!("CAIS{}", random_alnum(160))),
            issued: t,
            expiration: t + ttl,
            policy: None,
        };
        let out = StsCredentials {
            access_key_id: rec.access_key_id.clone(),
            access_key_secret: rec.secret.clone(),
            security_token: rec.token.clone(),
            expiration: rec.expiration,
        };
        st.sts.push(rec);
        out
    }

    /// Schedules the reclaim of a live instance `after` from now.
    pub fn schedule_reclaim(&self, id: &str, after: Duration) -> bool {
        let mut st = lock(&self.state);
        let Some(inst) = st.instances.get_mut(id) else { return false };
        if !inst.live || inst.status == Status::Stopped {
            return false;
        }
        let at = now() + time::Duration::try_from(after).unwrap_or(time::Duration::ZERO);
        inst.termination_time = Some(at);
        inst.event("reclaim-scheduled", format!("termination at {}", rfc3339(at)));
        true
    }

    /// Deletes a live instance: kills its sshd tree, marks it gone.
    pub fn delete_locked(st: &mut State, id: &str, event: &str, detail: &str) {
        let Some(inst) = st.instances.get_mut(id) else { return };
        if !inst.live {
            return;
        }
        if let Some(pid) = inst.sshd_pid {
            kill_tree(pid as i32);
        }
        if let Some(pid) = inst.boot_pid {
            kill_tree(pid as i32);
        }
        inst.live = false;
        inst.deleted = Some(now());
        inst.event(event, detail.to_string());
        lock(taken_ips()).remove(&inst.ip);
        st.deleted += 1;
    }

    pub fn delete_all(&self, why: &str) {
        let mut st = lock(&self.state);
        let ids: Vec<String> = st.instances.values().filter(|i| i.live).map(|i| i.id.clone()).collect();
        for id in ids {
            Self::delete_locked(&mut st, &id, "deleted", why);
        }
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.work_dir.join(id)
    }

    /// Writes the instance's sshd files and starts sshd in its own namespaces when root
    /// (called by the supervisor only; see [`super::sshd`]).
    fn spawn_sshd(&self, inst: &Instance) -> anyhow::Result<Child> {
        let machine = super::sshd::Machine {
            id: &inst.id,
            host_name: &inst.host_name,
            listen: SocketAddr::new(inst.ip.into(), inst.ssh_port),
            authorized_keys: &inst.authorized_keys,
            host_key: inst.host_key.as_ref(),
        };
        super::sshd::spawn(&machine, &self.instance_dir(&inst.id), self.is_root, self.boots())
    }

    /// Whether instances boot their user data: asked for, and possible (namespaces need root).
    pub fn boots(&self) -> bool {
        self.boot_user_data && self.is_root
    }

    /// Starts the boot of `inst`'s user data inside it (see [`super::boot`]).
    fn spawn_boot(&self, inst: &Instance, sshd_pid: u32) -> anyhow::Result<Child> {
        use base64::Engine;
        let text = inst
            .user_data
            .as_ref()
            .and_then(|u| base64::engine::general_purpose::STANDARD.decode(u.expose()).ok())
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default();
        super::boot::spawn(&text, sshd_pid, &self.instance_dir(&inst.id))
    }

    /// A file as instance `id` wrote it (see [`super::boot::written_file`]).
    pub fn instance_file(&self, id: &str, path: &str) -> Option<Vec<u8>> {
        std::fs::read(super::boot::written_file(&self.instance_dir(id), path)?).ok()
    }

    /// The boot log of instance `id` (empty until it boots).
    pub fn boot_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.instance_dir(id).join(super::boot::LOG_NAME)).unwrap_or_default()
    }
}

/// Parent pid of every process, from `/proc/<pid>/stat`.
fn process_parents() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // The command name may contain spaces and parentheses; fields resume after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut f = rest.split_whitespace();
        let _state = f.next();
        if let Some(ppid) = f.next().and_then(|s| s.parse::<i32>().ok()) {
            out.push((pid, ppid));
        }
    }
    out
}

fn descendants_and_self(root: i32) -> BTreeSet<i32> {
    let parents = process_parents();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = BTreeSet::from([root]);
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        for c in children.get(&p).into_iter().flatten() {
            if out.insert(*c) {
                queue.push(*c);
            }
        }
    }
    out
}

/// Kills `root` and every descendant: freeze them all first (a stopped process cannot fork or
/// be reparented away mid-walk), then `SIGKILL` each and the process group.
pub(crate) fn kill_tree(root: i32) {
    if root <= 1 {
        return;
    }
    let mut frozen = BTreeSet::new();
    for _ in 0..20 {
        let now = descendants_and_self(root);
        let new: Vec<i32> = now.difference(&frozen).copied().collect();
        if new.is_empty() {
            break;
        }
        for p in &new {
            // SAFETY: plain signal delivery.
            unsafe { libc::kill(*p, libc::SIGSTOP) };
        }
        frozen.extend(new);
    }
    // SAFETY: plain signal delivery; `-root` is sshd's own process group (setpgid in pre_exec).
    unsafe {
        libc::kill(-root, libc::SIGKILL);
        for p in &frozen {
            libc::kill(*p, libc::SIGKILL);
        }
    }
    // Death is asynchronous; wait (bounded) until every process is gone or a zombie, so that
    // when a delete answers, the instance's processes really are dead.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while frozen.iter().any(|p| running(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether `pid` exists and is not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

const TICK: Duration = Duration::from_millis(20);

/// The supervisor loop: advances lifecycles, spawns and reaps sshds, reclaims and releases.
pub(crate) fn supervise(core: Arc<Core>) {
    let mut children: HashMap<String, Child> = HashMap::new();
    let mut boots: HashMap<String, Child> = HashMap::new();
    loop {
        let stopping = core.shutdown.load(Ordering::SeqCst);
        {
            let mut st = lock(&core.state);
            if !stopping {
                let reclaim_after = lock(&core.fault_state).faults.reclaim_after;
                advance(&core, &mut st, &mut children, &mut boots, reclaim_after);
            }
            boots.retain(|id, child| match child.try_wait() {
                Ok(Some(status)) => {
                    if let Some(inst) = st.instances.get_mut(id) {
                        inst.boot_pid = None;
                        inst.event("boot-exited", status.to_string());
                    }
                    false
                }
                Ok(None) => true,
                Err(_) => false,
            });
            // Reap under the state lock so a pid is never killed after it was reaped.
            children.retain(|id, child| match child.try_wait() {
                Ok(Some(status)) => {
                    if let Some(inst) = st.instances.get_mut(id) {
                        inst.sshd_pid = None;
                        inst.event("sshd-exited", status.to_string());
                    }
                    false
                }
                Ok(None) => true,
                Err(_) => false,
            });
        }
        if stopping {
            // Everything was deleted; make sure every sshd is gone and reaped.
            for (_, mut child) in children.drain().chain(boots.drain()) {
                kill_tree(child.id() as i32);
                let _ = child.wait();
            }
            return;
        }
        std::thread::sleep(TICK);
    }
}

fn advance(
    core: &Core,
    st: &mut State,
    children: &mut HashMap<String, Child>,
    boots: &mut HashMap<String, Child>,
    reclaim_after: Option<Duration>,
) {
    let t = now();
    let ids: Vec<String> = st.instances.values().filter(|i| i.live).map(|i| i.id.clone()).collect();
    for id in ids {
        let mut release: Option<(&str, String)> = None;
        {
            let Some(inst) = st.instances.get_mut(&id) else { continue };
            let since_created = t - inst.created;
            let boot = time::Duration::try_from(inst.boot_delay).unwrap_or(time::Duration::ZERO);
            if inst.status == Status::Pending && since_created >= boot / 2 {
                inst.status = Status::Starting;
                inst.event("starting", "");
            }
            if inst.status == Status::Starting && since_created >= boot && !inst.never_boot {
                inst.status = Status::Running;
                inst.running = Some(t);
                inst.event("running", "");
                if let Some(after) = reclaim_after {
                    if inst.spot_strategy != "NoSpot" && inst.termination_time.is_none() {
                        let at = t + time::Duration::try_from(after).unwrap_or(time::Duration::ZERO);
                        inst.termination_time = Some(at);
                        inst.event("reclaim-scheduled", format!("termination at {}", rfc3339(at)));
                    }
                }
            }
            if inst.status == Status::Running && !inst.sshd_started {
                let ssh = time::Duration::try_from(inst.ssh_delay).unwrap_or(time::Duration::ZERO);
                if inst.running.is_some_and(|r| t - r >= ssh) {
                    inst.sshd_started = true;
                    match core.spawn_sshd(inst) {
                        Ok(child) => {
                            inst.sshd_pid = Some(child.id());
                            inst.event(
                                "sshd-started",
                                format!("pid {} on {}:{}", child.id(), inst.ip, inst.ssh_port),
                            );
                            let pid = child.id();
                            children.insert(inst.id.clone(), child);
                            if core.boots() {
                                match core.spawn_boot(inst, pid) {
                                    Ok(boot) => {
                                        inst.boot_pid = Some(boot.id());
                                        inst.event("boot-started", format!("pid {}", boot.id()));
                                        boots.insert(inst.id.clone(), boot);
                                    }
                                    Err(e) => inst.event("boot-failed", format!("{e:#}")),
                                }
                            }
                        }
                        Err(e) => inst.event("sshd-failed", format!("{e:#}")),
                    }
                }
            }
            if inst.status != Status::Stopped && inst.termination_time.is_some_and(|tt| t >= tt) {
                for pid in [inst.sshd_pid, inst.boot_pid].into_iter().flatten() {
                    kill_tree(pid as i32);
                }
                inst.status = Status::Stopped;
                inst.stopped = Some(t);
                inst.locks = vec!["Recycling".to_string()];
                inst.event("reclaimed", "spot instance reclaimed: sshd killed, status Stopped (Recycling)");
            }
            let linger = time::Duration::try_from(RECLAIM_LINGER).unwrap_or(time::Duration::ZERO);
            if inst.status == Status::Stopped && inst.stopped.is_some_and(|s| t - s >= linger) {
                release = Some(("released", "reclaimed spot instance released".to_string()));
            } else if inst.auto_release.is_some_and(|a| t >= a) {
                release = Some(("auto-released", "AutoReleaseTime reached".to_string()));
            }
        }
        if let Some((event, detail)) = release {
            Core::delete_locked(st, &id, event, &detail);
        }
    }
}
