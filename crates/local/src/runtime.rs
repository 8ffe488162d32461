//! `isthmus up`: realise a plan and keep it running — the control plane in the runtime's own
//! namespace, then per pod what the injector and kubelet would do (capture rules, the proxy as
//! UID 1337, the app as its user), restarting what exits, publishing status, and tearing it all
//! down on shutdown. State on disk lets `down` clean up after a crash too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_config::mesh::ProxyConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::process::Command;
use tokio::sync::watch;

use crate::net::{self, Names};
use crate::plan::{GATEWAY, PROXY_UID, Plan};

/// How long a pod's proxy has to be ready before `up` gives up waiting.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] isthmus_ca::CaError),
    #[error("entering the runtime's namespace: {0}")]
    Setns(String),
    #[error("the control plane did not become ready: {0}")]
    ControlPlane(String),
    #[error("a mesh named {0:?} is already up (isthmus down --name {0} first)")]
    AlreadyUp(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub state_dir: PathBuf,
    /// The isthmus binary, for the control plane, the capture tool and the proxies.
    pub binary: PathBuf,
    pub mesh_config: Option<PathBuf>,
    /// The mesh's `defaultConfig`: what each pod's ProxyConfig starts from.
    pub proxy_defaults: Option<ProxyConfig>,
    pub inbound_passthrough: Option<bool>,
}

/// What `down` needs even when the supervisor is gone.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub id: String,
    pub supervisor_pid: u32,
    pub netns: Vec<String>,
    /// What the control plane was started with, for tools that reason like it (precheck).
    #[serde(default)]
    pub inbound_passthrough: Option<bool>,
    #[serde(default)]
    pub mesh_config: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerStatus {
    pub name: String,
    pub pid: Option<u32>,
    pub running: bool,
    pub restarts: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodStatus {
    pub name: String,
    pub namespace: String,
    pub ip: String,
    pub netns: String,
    pub ready: bool,
    pub sidecar: bool,
    pub containers: Vec<ContainerStatus>,
}

impl PodStatus {
    pub fn restarts(&self) -> u32 {
        self.containers.iter().map(|c| c.restarts).sum()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub phase: String,
    pub control_plane: String,
    pub control_plane_pid: Option<u32>,
    pub node_netns: String,
    pub pods: Vec<PodStatus>,
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

pub fn status_path(dir: &Path) -> PathBuf {
    dir.join("status.json")
}

pub fn read_state(dir: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(state_path(dir)).ok()?).ok()
}

pub fn read_status(dir: &Path) -> Option<Status> {
    serde_json::from_slice(&std::fs::read(status_path(dir)).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap_or_default()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A short id for names of namespaces and links, from the mesh name.
fn short_id(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    if clean.len() <= 6 {
        clean
    } else {
        // Keep it unique-ish when long: 3 chars and a hash.
        let h = clean
            .bytes()
            .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
        format!("{}{:03x}", &clean[..3], h & 0xfff)
    }
}

/// The synchronous part of `up`: the network and the files, before entering the runtime's
/// namespace. Everything created is recorded in the state file first.
pub struct Prepared {
    pub opts: UpOptions,
    pub plan: Plan,
    pub names: Names,
    pub pod_netns: Vec<String>,
}

pub fn prepare(opts: UpOptions, plan: Plan) -> Result<Prepared, RuntimeError> {
    let dir = &opts.state_dir;
    if let Ok(text) = std::fs::read(state_path(dir))
        && let Ok(st) = serde_json::from_slice::<State>(&text)
        && process_alive(st.supervisor_pid)
    {
        return Err(RuntimeError::AlreadyUp(opts.name.clone()));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let names = Names {
        id: short_id(&opts.name),
    };
    let pod_netns: Vec<String> = plan.pods.iter().map(|p| names.pod(p)).collect();
    let mut state = State {
        name: opts.name.clone(),
        id: names.id.clone(),
        supervisor_pid: std::process::id(),
        netns: std::iter::once(names.node())
            .chain(pod_netns.iter().cloned())
            .collect(),
        inbound_passthrough: opts.inbound_passthrough,
        mesh_config: opts.mesh_config.clone(),
    };
    write_json(&state_path(dir), &state)?;
    // Leftovers of a crashed run with the same name go first.
    for ns in &state.netns {
        net::delete_netns(ns);
    }
    net::create_node(&names)?;
    for (i, pod) in plan.pods.iter().enumerate() {
        let ns = net::create_pod(&names, pod, i)?;
        net::write_pod_files(&ns, &plan.hosts_file(pod), &plan.resolv_conf(pod))
            .map_err(io(Path::new("/etc/netns")))?;
    }
    let config = dir.join("config");
    std::fs::create_dir_all(&config).map_err(io(&config))?;
    let docs: Vec<String> = plan
        .resources
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_default())
        .collect();
    let mesh = config.join("mesh.yaml");
    std::fs::write(&mesh, docs.join("\n---\n")).map_err(io(&mesh))?;
    for pod in &plan.pods {
        let pdir = dir.join("pods").join(pod.key());
        std::fs::create_dir_all(&pdir).map_err(io(&pdir))?;
    }
    state.supervisor_pid = std::process::id();
    write_json(&state_path(dir), &state)?;
    Ok(Prepared {
        opts,
        plan,
        names,
        pod_netns,
    })
}

/// Moves the calling thread (and threads it creates later) into a named network namespace.
pub fn enter_netns(name: &str) -> Result<(), RuntimeError> {
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).map_err(|e| RuntimeError::Setns(format!("{path}: {e}")))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| RuntimeError::Setns(e.to_string()))
}

fn process_alive(pid: u32) -> bool {
    pid != 0
        && nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
            None,
        )
        .is_ok()
}

/// One supervised process.
struct Proc {
    pod: usize,
    container: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

#[derive(Default)]
struct Live {
    status: Status,
    proxy_ready: BTreeMap<usize, bool>,
}

/// The `pod` index of the control plane's process.
const CONTROL_PLANE: usize = usize::MAX;

/// Runs the mesh until `shutdown`, then tears it down. `progress` hears what happens.
pub async fn run(
    p: Prepared,
    progress: impl Fn(&str) + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RuntimeError> {
    let progress = Arc::new(progress);
    let dir = p.opts.state_dir.clone();
    let live = Arc::new(Mutex::new(Live {
        status: Status {
            name: p.opts.name.clone(),
            phase: "Starting".into(),
            control_plane: format!("{GATEWAY}:15012"),
            control_plane_pid: None,
            node_netns: p.names.node(),
            pods: p
                .plan
                .pods
                .iter()
                .zip(&p.pod_netns)
                .map(|(pod, ns)| PodStatus {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    ip: pod.ip.to_string(),
                    netns: ns.clone(),
                    ready: false,
                    sidecar: pod.sidecar,
                    containers: Vec::new(),
                })
                .collect(),
        },
        ..Default::default()
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let result = start(&p, &live, &stop_rx, progress.as_ref()).await;
    let publish = {
        let live = live.clone();
        let dir = dir.clone();
        tokio::spawn(async move {
            loop {
                refresh_readiness(&live).await;
                let st = live.lock().map(|l| l.status.clone()).unwrap_or_default();
                let _ = write_json(&status_path(&dir), &st);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    if let Err(e) = &result {
        progress(&format!("error: {e}"));
    } else {
        shutdown.await;
    }
    progress("stopping");
    publish.abort();
    stop_tx.send_replace(true);
    stop_all(&live).await;
    teardown(&p);
    result
}

/// A pod's ProxyConfig as Istio's injector makes it: the mesh's `defaultConfig`, with each
/// field the pod's `proxy.istio.io/config` sets in its place (`proxyMetadata` merged name by
/// name). The annotation is read as the proxy will read it, so that a field of the wrong shape
/// is reported here rather than stopping the proxy.
fn injected_proxy_config(
    defaults: Option<&ProxyConfig>,
    annotation: Option<&str>,
) -> Result<Map<String, Value>, String> {
    let mut merged = match defaults.map(serde_json::to_value) {
        Some(Ok(Value::Object(m))) => m,
        _ => Map::new(),
    };
    let Some(annotation) = annotation else {
        return Ok(merged);
    };
    let v = serde_saphyr::from_str::<Value>(annotation).map_err(|e| e.to_string())?;
    // A sequence would pass as a struct's fields in order; ProxyConfig is a mapping.
    let Value::Object(own) = v else {
        return Err("not a mapping".into());
    };
    serde_json::from_value::<ProxyConfig>(Value::Object(own.clone())).map_err(|e| e.to_string())?;
    for (k, v) in own {
        match (merged.get_mut(&k), v) {
            (Some(Value::Object(base)), Value::Object(extra)) if k == "proxyMetadata" => {
                base.extend(extra);
            }
            (_, v) => {
                merged.insert(k, v);
            }
        }
    }
    Ok(merged)
}

/// The sidecar's environment from its ProxyConfig, as Istio's injector passes it:
/// PROXY_CONFIG, and each of `proxyMetadata` as a variable.
fn proxy_config_env(pc: &Map<String, Value>) -> Vec<(String, String)> {
    if pc.is_empty() {
        return Vec::new();
    }
    let mut env: Vec<(String, String)> = pc
        .get("proxyMetadata")
        .and_then(|m| m.as_object())
        .into_iter()
        .flatten()
        .filter_map(|(k, val)| Some((k.clone(), val.as_str()?.to_string())))
        .collect();
    env.push(("PROXY_CONFIG".into(), Value::Object(pc.clone()).to_string()));
    env
}

/// How a pod's sidecar is started: `isthmus-proxy` where it was installed beside `binary` from
/// the same build (the same proxy, with none of the other subcommands' code to map into every
/// pod), else `binary proxy`.
async fn sidecar_command(binary: &Path) -> Vec<String> {
    let alone = binary.with_file_name("isthmus-proxy");
    if alone.is_file() {
        let (ours, theirs) = tokio::join!(build_of(binary), build_of(&alone));
        if ours.is_some() && ours == theirs {
            return vec![alone.display().to_string()];
        }
        // An older sidecar may refuse what this control plane sends.
        tracing::warn!(
            "{} is not from the build of {} ({} against {}): sidecars run `{} proxy`",
            alone.display(),
            binary.display(),
            theirs.as_deref().unwrap_or("no version"),
            ours.as_deref().unwrap_or("no version"),
            binary.display(),
        );
    }
    vec![binary.display().to_string(), "proxy".into()]
}

/// What `binary --version` prints after its name: the version and the build's fingerprint.
async fn build_of(binary: &Path) -> Option<String> {
    let run = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let (_, version) = text.trim().split_once(' ')?;
    out.status.success().then(|| version.to_string())
}

async fn start(
    p: &Prepared,
    live: &Arc<Mutex<Live>>,
    stop: &watch::Receiver<bool>,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), RuntimeError> {
    let dir = &p.opts.state_dir;
    let bin = p.opts.binary.display().to_string();
    let sidecar = sidecar_command(&p.opts.binary).await;
    // The CA and its token key exist before anyone needs them.
    let ca_dir = dir.join("ca");
    let authority = isthmus_ca::Authority::load_or_create(&ca_dir, Default::default())?;
    drop(authority);
    let tokens = isthmus_ca::TokenAuthority::load_or_create(&ca_dir)?;
    // The proxies run as 1337 and read the roots.
    set_mode(&ca_dir.join("root-cert.pem"), 0o644);
    let mut cp = vec![
        bin.clone(),
        "control-plane".into(),
        "--config-dir".into(),
        dir.join("config").display().to_string(),
        "--xds-addr".into(),
        format!("{GATEWAY}:15010"),
        "--http-addr".into(),
        format!("{GATEWAY}:15014"),
        "--ca-dir".into(),
        ca_dir.display().to_string(),
        "--secure-addr".into(),
        format!("{GATEWAY}:15012"),
    ];
    if let Some(m) = &p.opts.mesh_config {
        cp.push("--meshConfig".into());
        cp.push(m.display().to_string());
    }
    if let Some(b) = p.opts.inbound_passthrough {
        cp.push(format!("--inbound-passthrough={b}"));
    }
    progress("starting the control plane");
    supervise(
        live.clone(),
        stop.clone(),
        Proc {
            pod: CONTROL_PLANE,
            container: "control-plane".into(),
            argv: cp,
            env: Vec::new(),
            log: dir.join("control-plane.log"),
        },
    );
    wait_http(
        SocketAddr::new(GATEWAY.into(), 15014),
        "/ready",
        Duration::from_secs(30),
    )
    .await
    .map_err(RuntimeError::ControlPlane)?;

    let bin_dir = p
        .opts
        .binary
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let path = format!(
        "{bin_dir}:{}",
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    for (i, (pod, ns)) in p.plan.pods.iter().zip(&p.pod_netns).enumerate() {
        progress(&format!("starting pod {}/{}", pod.namespace, pod.name));
        let pdir = dir.join("pods").join(pod.key());
        let mut hold_application = false;
        if pod.sidecar {
            let annotation = pod.annotations.get("proxy.istio.io/config");
            let defaults = p.opts.proxy_defaults.as_ref();
            let mut pc = injected_proxy_config(defaults, annotation.map(String::as_str))
                .unwrap_or_else(|e| {
                    progress(&format!(
                        "pod {}/{}: proxy.istio.io/config ignored: {e}",
                        pod.namespace, pod.name
                    ));
                    injected_proxy_config(defaults, None).unwrap_or_default()
                });
            // This runtime's control plane is the one its pods talk to, whatever address a
            // mesh config written for a cluster names (Istio's `istiod.istio-system.svc`).
            pc.remove("discoveryAddress");
            hold_application =
                pc.get("holdApplicationUntilProxyStarts") == Some(&Value::Bool(true));
            // TPROXY keeps the caller's address all the way to the app. Istio's annotation
            // wins over the ProxyConfig's `interceptionMode`.
            let tproxy = pod
                .annotations
                .get("sidecar.istio.io/interceptionMode")
                .map(String::as_str)
                .or_else(|| pc.get("interceptionMode").and_then(Value::as_str))
                == Some("TPROXY");
            let mode = if tproxy { "TPROXY" } else { "REDIRECT" };
            // istio-init: capture first, as root; DNS too when the agent answers it (the
            // ProxyConfig's `ISTIO_META_DNS_CAPTURE`, as Istio's injector reads it).
            let mut capture = vec![
                "ip",
                "netns",
                "exec",
                ns,
                &bin,
                "iptables",
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-m",
                mode,
                "-i",
                "*",
                "-x",
                "",
                "-b",
                "*",
                "-d",
                "15090,15021,15020",
            ];
            let dns_capture = pc
                .get("proxyMetadata")
                .and_then(|m| m.get("ISTIO_META_DNS_CAPTURE"))
                .and_then(Value::as_str)
                == Some("true");
            if dns_capture {
                capture.push("--redirect-dns");
            }
            net::run(&capture)?;
            let token = pdir.join("token");
            std::fs::write(
                &token,
                tokens.issue(
                    &pod.namespace,
                    &pod.service_account,
                    Duration::from_secs(86_400),
                ),
            )
            .map_err(io(&token))?;
            set_mode(&token, 0o644);
            let mut argv = vec![
                "ip".to_string(),
                "netns".into(),
                "exec".into(),
                ns.clone(),
                "setpriv".into(),
            ];
            if tproxy {
                // As Istio's injector does for TPROXY: user root (transparent sockets need
                // NET_ADMIN), group 1337 (what capture exempts).
                argv.push(format!("--regid={PROXY_UID}"));
            } else {
                argv.push(format!("--reuid={PROXY_UID}"));
                argv.push(format!("--regid={PROXY_UID}"));
            }
            argv.push("--clear-groups".into());
            argv.push("--".into());
            argv.extend(sidecar.iter().cloned());
            argv.extend([
                "--interception-mode".to_string(),
                mode.into(),
                "--discovery-address".into(),
                format!("{GATEWAY}:15012"),
                "--root-cert".into(),
                ca_dir.join("root-cert.pem").display().to_string(),
                "--token".into(),
                token.display().to_string(),
                "--pod-name".into(),
                pod.name.clone(),
                "--pod-namespace".into(),
                pod.namespace.clone(),
                "--instance-ip".into(),
                pod.ip.to_string(),
                "--service-account".into(),
                pod.service_account.clone(),
                "--domain".into(),
                p.plan.domain.clone(),
            ]);
            for (k, v) in &pod.labels {
                argv.push("--label".into());
                argv.push(format!("{k}={v}"));
            }
            let mut proxy_env = vec![("RUST_LOG".to_string(), "info".to_string())];
            proxy_env.extend(proxy_config_env(&pc));
            if let Some(port) = pod.annotations.get("prometheus.io/port") {
                argv.push("--app-metrics-port".into());
                argv.push(port.clone());
                if let Some(path) = pod.annotations.get("prometheus.io/path") {
                    argv.push("--app-metrics-path".into());
                    argv.push(path.clone());
                }
            }
            supervise(
                live.clone(),
                stop.clone(),
                Proc {
                    pod: i,
                    container: "istio-proxy".into(),
                    argv,
                    env: proxy_env,
                    log: pdir.join("istio-proxy.log"),
                },
            );
        }
        net::install_service_rules(&p.plan, ns)?;
        if hold_application {
            wait_http(
                SocketAddr::new(pod.ip.into(), 15021),
                "/healthz/ready",
                READY_TIMEOUT,
            )
            .await
            .map_err(RuntimeError::ControlPlane)?;
        }
        for c in &pod.containers {
            let mut argv = vec!["ip".to_string(), "netns".into(), "exec".into(), ns.clone()];
            if c.uid.is_some() || c.gid.is_some() {
                argv.push("setpriv".into());
                let uid = c.uid.unwrap_or(0);
                argv.push(format!("--reuid={uid}"));
                argv.push(format!("--regid={}", c.gid.unwrap_or(uid)));
                argv.push("--clear-groups".into());
                argv.push("--".into());
            }
            argv.extend(c.argv.iter().cloned());
            let mut env = c.env.clone();
            env.push(("PATH".into(), path.clone()));
            env.push(("HOSTNAME".into(), pod.name.clone()));
            env.push(("POD_NAME".into(), pod.name.clone()));
            env.push(("POD_NAMESPACE".into(), pod.namespace.clone()));
            env.push(("INSTANCE_IP".into(), pod.ip.to_string()));
            supervise(
                live.clone(),
                stop.clone(),
                Proc {
                    pod: i,
                    container: c.name.clone(),
                    argv,
                    env,
                    log: pdir.join(format!("{}.log", c.name)),
                },
            );
        }
    }
    // Up once every pod is ready (bounded); a pod that never gets ready stays visible in status.
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        refresh_readiness(live).await;
        let (ready, total) = {
            let l = live.lock().map(|l| l.status.clone()).unwrap_or_default();
            (l.pods.iter().filter(|p| p.ready).count(), l.pods.len())
        };
        if ready == total || Instant::now() > deadline {
            let phase = if ready == total {
                "Running"
            } else {
                "Degraded"
            };
            if let Ok(mut l) = live.lock() {
                l.status.phase = phase.into();
            }
            let st = live.lock().map(|l| l.status.clone()).unwrap_or_default();
            write_json(&status_path(dir), &st)?;
            progress(&format!("{ready}/{total} pods ready"));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

/// Starts a process and restarts it when it exits (restartPolicy Always), until `stop`.
fn supervise(live: Arc<Mutex<Live>>, mut stop: watch::Receiver<bool>, proc: Proc) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        let mut restarts = 0u32;
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&proc.log);
            let (out, err) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
                Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
                Err(_) => (Stdio::null(), Stdio::null()),
            };
            let child = Command::new(&proc.argv[0])
                .args(&proc.argv[1..])
                .envs(proc.env.iter().cloned())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .process_group(0)
                .kill_on_drop(true)
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(container = %proc.container, error = %e, "cannot start");
                    return;
                }
            };
            set_container(&live, &proc, child.id(), true, restarts);
            let stopping = async {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = child.wait() => {}
                () = stopping => {
                    // Stopped by stop_all through the recorded pid; reap it here.
                    let _ = tokio::time::timeout(Duration::from_secs(6), child.wait()).await;
                    let _ = child.kill().await;
                    set_container(&live, &proc, None, false, restarts);
                    return;
                }
            }
            if *stop.borrow() {
                return;
            }
            restarts += 1;
            set_container(&live, &proc, None, false, restarts);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    });
}

fn set_container(live: &Mutex<Live>, proc: &Proc, pid: Option<u32>, running: bool, restarts: u32) {
    let Ok(mut l) = live.lock() else { return };
    if proc.pod == CONTROL_PLANE {
        l.status.control_plane_pid = pid;
        return;
    }
    let Some(pod) = l.status.pods.get_mut(proc.pod) else {
        return;
    };
    let c = match pod.containers.iter_mut().find(|c| c.name == proc.container) {
        Some(c) => c,
        None => {
            pod.containers.push(ContainerStatus {
                name: proc.container.clone(),
                ..Default::default()
            });
            pod.containers.last_mut().expect("just pushed")
        }
    };
    c.pid = pid;
    c.running = running;
    c.restarts = restarts;
}

async fn refresh_readiness(live: &Arc<Mutex<Live>>) {
    let pods: Vec<(usize, PodStatus)> = live
        .lock()
        .map(|l| l.status.pods.iter().cloned().enumerate().collect())
        .unwrap_or_default();
    for (i, pod) in pods {
        let proxy_ok = if pod.sidecar {
            let addr = SocketAddr::new(pod.ip.parse().unwrap_or(GATEWAY.into()), 15021);
            probe(addr, "/healthz/ready").await
        } else {
            true
        };
        if let Ok(mut l) = live.lock() {
            l.proxy_ready.insert(i, proxy_ok);
            if let Some(p) = l.status.pods.get_mut(i) {
                p.ready =
                    proxy_ok && !p.containers.is_empty() && p.containers.iter().all(|c| c.running);
            }
        }
    }
}

/// One bounded HTTP GET: true on a 2xx.
async fn probe(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        let head = std::str::from_utf8(&buf[..n]).ok()?;
        Some(head.starts_with("HTTP/1.1 2"))
    };
    tokio::time::timeout(Duration::from_secs(1), work)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn wait_http(addr: SocketAddr, path: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if probe(addr, path).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("http://{addr}{path} not ready after {limit:?}"))
}

/// SIGTERM to every process group (apps first, proxies drain, the control plane last),
/// then SIGKILL whatever remains.
async fn stop_all(live: &Arc<Mutex<Live>>) {
    let groups = |which: &dyn Fn(&str) -> bool| -> Vec<i32> {
        live.lock()
            .map(|l| {
                l.status
                    .pods
                    .iter()
                    .flat_map(|p| p.containers.iter())
                    .filter(|c| which(&c.name))
                    .filter_map(|c| c.pid)
                    .filter_map(|p| i32::try_from(p).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let signal_all = |pids: &[i32], sig: nix::sys::signal::Signal| {
        for pid in pids {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(*pid), sig);
        }
    };
    let apps = groups(&|n| n != "istio-proxy");
    let proxies = groups(&|n| n == "istio-proxy");
    signal_all(&apps, nix::sys::signal::Signal::SIGTERM);
    signal_all(&proxies, nix::sys::signal::Signal::SIGTERM);
    let all: Vec<i32> = apps.iter().chain(&proxies).copied().collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && all.iter().any(|p| process_alive(*p as u32)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_all(&all, nix::sys::signal::Signal::SIGKILL);
    let cp = live
        .lock()
        .ok()
        .and_then(|l| l.status.control_plane_pid)
        .and_then(|p| i32::try_from(p).ok());
    if let Some(cp) = cp {
        signal_all(&[cp], nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && process_alive(cp as u32) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal_all(&[cp], nix::sys::signal::Signal::SIGKILL);
    }
}

/// Removes the namespaces, their `/etc/netns` files and the state directory.
fn teardown(p: &Prepared) {
    for ns in &p.pod_netns {
        net::delete_netns(ns);
    }
    net::delete_netns(&p.names.node());
    remove_state(&p.opts.state_dir);
}

/// The state directory, and the shared parents when this mesh was their last user.
fn remove_state(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    let _ = std::fs::remove_dir("/etc/netns");
}

/// `down` without a supervisor (or after it did not finish): kill what the files name, delete
/// every namespace of the mesh, remove the state.
pub fn cleanup(state_dir: &Path) {
    let state: Option<State> = std::fs::read(state_path(state_dir))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok());
    if let Some(status) = read_status(state_dir) {
        for pid in status
            .pods
            .iter()
            .flat_map(|p| p.containers.iter())
            .filter_map(|c| c.pid)
            .chain(status.control_plane_pid)
        {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    if let Some(st) = &state {
        // Processes in the mesh's namespaces that the files did not name.
        for ns in &st.netns {
            if let Ok(pids) = net::run(&["ip", "netns", "pids", ns]) {
                for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        for ns in &st.netns {
            net::delete_netns(ns);
        }
    }
    remove_state(state_dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_config_annotation_becomes_the_sidecars_environment() {
        let env = |annotation: &str| {
            injected_proxy_config(None, Some(annotation)).map(|pc| proxy_config_env(&pc))
        };
        let got = env(
            r#"{"proxyMetadata": {"SECRET_TTL": "16s"}, "proxyHeaders": {"server": {"value": "p"}}}"#,
        )
        .unwrap();
        assert_eq!(got[0], ("SECRET_TTL".to_string(), "16s".to_string()));
        assert_eq!(got[1].0, "PROXY_CONFIG");
        assert!(got[1].1.contains(r#""server":{"value":"p"}"#), "{got:?}");
        // YAML too, as annotations are often written.
        assert!(env("concurrency: 2").is_ok());
        let bad = env(r#"{"proxyHeaders": {"server": "p"}}"#).unwrap_err();
        assert!(bad.contains("expected struct ServerHeader"), "{bad}");
        let bad = env(r#"{"proxyHeaders": {"forwardedClientCert": "APPEND"}}"#).unwrap_err();
        assert!(bad.contains("unknown variant `APPEND`"), "{bad}");
        assert!(env("[unclosed").is_err());
        assert!(env("[1, 2]").is_err());
        // Neither a mesh default nor an annotation: nothing to pass.
        assert!(proxy_config_env(&injected_proxy_config(None, None).unwrap()).is_empty());
    }

    #[test]
    fn the_annotation_overrides_the_mesh_default_field_by_field() {
        let defaults: ProxyConfig = serde_json::from_value(serde_json::json!({
            "holdApplicationUntilProxyStarts": true,
            "concurrency": 2,
            "proxyMetadata": {"A": "mesh", "B": "mesh"},
            "proxyStatsMatcher": {"inclusionPrefixes": ["cluster.outbound"]},
        }))
        .unwrap();
        let pc = injected_proxy_config(
            Some(&defaults),
            Some("concurrency: 4\nproxyMetadata: {B: pod}\nproxyStatsMatcher: {inclusionSuffixes: [upstream_rq_total]}"),
        )
        .unwrap();
        assert_eq!(pc["holdApplicationUntilProxyStarts"], true);
        assert_eq!(pc["concurrency"], 4);
        assert_eq!(
            pc["proxyMetadata"],
            serde_json::json!({"A": "mesh", "B": "pod"})
        );
        // Other fields are the annotation's whole, as Istio's injector applies them.
        assert_eq!(
            pc["proxyStatsMatcher"],
            serde_json::json!({"inclusionSuffixes": ["upstream_rq_total"]})
        );
        // The mesh's default alone, for a pod without the annotation.
        let pc = injected_proxy_config(Some(&defaults), None).unwrap();
        assert_eq!(pc["holdApplicationUntilProxyStarts"], true);
        let env = proxy_config_env(&pc);
        assert_eq!(env[0], ("A".to_string(), "mesh".to_string()));
        assert_eq!(env.last().map(|e| e.0.as_str()), Some("PROXY_CONFIG"));
    }

    #[tokio::test]
    async fn sidecars_run_the_proxy_binary_of_the_same_build_beside_isthmus_else_the_subcommand() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, version: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\necho '{name} {version}'\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let isthmus = script("isthmus", "0.1.0 (build 1)");
        let subcommand = vec![isthmus.display().to_string(), "proxy".to_string()];
        assert_eq!(sidecar_command(&isthmus).await, subcommand);
        let alone = script("isthmus-proxy", "0.1.0 (build 1)");
        assert_eq!(
            sidecar_command(&isthmus).await,
            [alone.display().to_string()]
        );
        // One left over from another build is passed over.
        script("isthmus-proxy", "0.1.0 (build 2)");
        assert_eq!(sidecar_command(&isthmus).await, subcommand);
    }
}
