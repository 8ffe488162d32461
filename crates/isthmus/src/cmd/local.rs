//! The local runtime's commands: `up`, `down`, `status`, `logs`, `exec`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use isthmus_config::{Loader, Severity};
use isthmus_local::runtime::{self, PodStatus, Status, UpOptions};

use crate::cmd::{read_yaml, render_table};
use crate::exit;

/// Where a mesh keeps its state: `/run/isthmus/<name>`.
fn default_state_dir(name: &str) -> PathBuf {
    PathBuf::from("/run/isthmus").join(name)
}

#[derive(Debug, Args)]
pub struct MeshArgs {
    /// The mesh's name (several can run side by side).
    #[arg(long, default_value = "default", env = "ISTHMUS_MESH")]
    pub name: String,
    /// State directory (default /run/isthmus/<name>).
    #[arg(long = "state-dir")]
    pub state_dir: Option<PathBuf>,
}

impl MeshArgs {
    pub fn dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(&self.name))
    }
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directories or files of Kubernetes and Istio YAML.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// MeshConfig for the control plane.
    #[arg(long = "meshConfig")]
    pub mesh_config: Option<PathBuf>,
    /// Istio's PILOT_ENABLE_INBOUND_PASSTHROUGH (false: LOCALHOST mode).
    #[arg(long = "inbound-passthrough")]
    pub inbound_passthrough: Option<bool>,
    /// Run the supervisor in this process instead of in the background.
    #[arg(long)]
    pub foreground: bool,
}

pub fn up(a: UpArgs) -> Result<i32> {
    crate::cmd::require_root_and_tools()?;
    if a.foreground {
        return up_foreground(a);
    }
    let st = start_detached(&a, true)?;
    print!("{}", status_table(&st));
    Ok(if st.phase == "Running" {
        exit::OK
    } else {
        exit::FAILURE
    })
}

/// Starts the supervisor in its own session and waits until the mesh is up; `echo` shows its
/// progress lines.
pub fn start_detached(a: &UpArgs, echo: bool) -> Result<Status> {
    let dir = a.mesh.dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("up.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating the isthmus binary")?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("up")
        .args(a.paths.iter().map(|p| absolute(p)))
        .arg("--foreground")
        .arg("--name")
        .arg(&a.mesh.name)
        .arg("--state-dir")
        .arg(&dir);
    if let Some(m) = &a.mesh_config {
        cmd.arg("--meshConfig").arg(m);
    }
    if let Some(b) = a.inbound_passthrough {
        cmd.arg(format!("--inbound-passthrough={b}"));
    }
    use std::os::unix::process::CommandExt;
    // Its own session: it outlives this command and the terminal.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the supervisor")?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut shown = 0usize;
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if echo {
            for line in text.lines().skip(shown) {
                eprintln!("  {line}");
            }
        }
        shown = text.lines().count();
        if let Some(st) = runtime::read_status(&dir)
            && st.phase != "Starting"
        {
            return Ok(st);
        }
        if let Ok(Some(code)) = child.try_wait() {
            if !echo {
                eprint!("{text}");
            }
            bail!("the supervisor exited ({code}) before the mesh was up");
        }
        if Instant::now() > deadline {
            bail!("the mesh is not up after 180 s; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn up_foreground(a: UpArgs) -> Result<i32> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let loaded = Loader {
        default_namespace: Some("default".into()),
    }
    .load_paths(&a.paths);
    let mut bad = false;
    for d in &loaded.diagnostics {
        eprintln!("{d}");
        bad |= d.severity == Severity::Error;
    }
    if bad {
        bail!("the manifests have errors");
    }
    let plan = isthmus_local::plan::plan(&loaded.resources, "cluster.local")?;
    let mesh: Option<isthmus_config::mesh::MeshConfig> =
        a.mesh_config.as_deref().map(read_yaml).transpose()?;
    let opts = UpOptions {
        name: a.mesh.name.clone(),
        state_dir: a.mesh.dir(),
        binary: std::env::current_exe().context("locating the isthmus binary")?,
        mesh_config: a.mesh_config.map(|p| absolute(&p)),
        proxy_defaults: mesh.and_then(|m| m.default_config),
        inbound_passthrough: a.inbound_passthrough,
    };
    eprintln!(
        "creating {} pods and {} services",
        plan.pods.len(),
        plan.services.len()
    );
    let prepared = match runtime::prepare(opts.clone(), plan) {
        Ok(p) => p,
        Err(e) => {
            runtime::cleanup(&opts.state_dir);
            return Err(e.into());
        }
    };
    // From here on this process lives in the runtime's namespace, beside the pods' bridge.
    runtime::enter_netns(&prepared.names.node())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let shutdown = async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        runtime::run(prepared, |m| eprintln!("{m}"), shutdown).await
    })?;
    Ok(exit::OK)
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

pub fn down(a: MeshArgs) -> Result<i32> {
    let dir = a.dir();
    let state: Option<runtime::State> = std::fs::read(runtime::state_path(&dir))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok());
    let Some(state) = state else {
        if dir.exists() {
            runtime::cleanup(&dir);
        }
        eprintln!("mesh {:?} is not up", a.name);
        return Ok(exit::OK);
    };
    if let Ok(pid) = i32::try_from(state.supervisor_pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    // The supervisor drains and removes everything; after a crash, the files say what to remove.
    let alive = || {
        i32::try_from(state.supervisor_pid)
            .is_ok_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while dir.exists() && alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if dir.exists() {
        runtime::cleanup(&dir);
    }
    eprintln!("mesh {:?} is down", a.name);
    Ok(exit::OK)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub fn status_table(st: &Status) -> String {
    let mut rows = vec![vec![
        "NAMESPACE".to_string(),
        "NAME".into(),
        "READY".into(),
        "STATUS".into(),
        "RESTARTS".into(),
        "IP".into(),
        "SIDECAR".into(),
    ]];
    for p in &st.pods {
        let running = p.containers.iter().filter(|c| c.running).count();
        rows.push(vec![
            p.namespace.clone(),
            p.name.clone(),
            format!("{running}/{}", p.containers.len()),
            if p.ready { "Running" } else { "NotReady" }.into(),
            p.restarts().to_string(),
            p.ip.clone(),
            if p.sidecar { "yes" } else { "no" }.into(),
        ]);
    }
    render_table(&rows)
}

fn status_of(mesh: &MeshArgs) -> Result<Status> {
    runtime::read_status(&mesh.dir()).with_context(|| {
        format!(
            "mesh {:?} is not up (no status in {})",
            mesh.name,
            mesh.dir().display()
        )
    })
}

pub fn status(a: StatusArgs) -> Result<i32> {
    let st = status_of(&a.mesh)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&st)?),
        Output::Table => print!("{}", status_table(&st)),
    }
    Ok(exit::OK)
}

/// A pod by `name`, `name.namespace` or `namespace/name`; a unique prefix of the name will do
/// (Deployment pods have generated suffixes).
pub fn find_pod<'a>(st: &'a Status, query: &str) -> Result<&'a PodStatus> {
    let (ns, name) = match query.split_once('/') {
        Some((ns, n)) => (Some(ns), n),
        None => match query.split_once('.') {
            Some((n, ns)) => (Some(ns), n),
            None => (None, query),
        },
    };
    let in_ns = |p: &&PodStatus| ns.is_none_or(|ns| p.namespace == ns);
    if let Some(p) = st.pods.iter().filter(in_ns).find(|p| p.name == name) {
        return Ok(p);
    }
    let matches: Vec<&PodStatus> = st
        .pods
        .iter()
        .filter(in_ns)
        .filter(|p| p.name.starts_with(name))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => bail!("no pod {query:?}"),
        many => bail!(
            "{query:?} matches {} pods: {}",
            many.len(),
            many.iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub pod: String,
    /// The container (`istio-proxy` for the sidecar); the app's by default.
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

pub fn logs(a: LogsArgs) -> Result<i32> {
    let st = status_of(&a.mesh)?;
    let pod = find_pod(&st, &a.pod)?;
    let container = match &a.container {
        Some(c) if c == "proxy" => "istio-proxy".to_string(),
        Some(c) => c.clone(),
        None => pod
            .containers
            .iter()
            .find(|c| c.name != "istio-proxy")
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "istio-proxy".into()),
    };
    let path = a
        .mesh
        .dir()
        .join("pods")
        .join(format!("{}.{}", pod.name, pod.namespace))
        .join(format!("{container}.log"));
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "no log for container {container:?} of {}/{} ({})",
            pod.namespace,
            pod.name,
            path.display()
        )
    })?;
    use std::io::Write;
    std::io::stdout().write_all(&text)?;
    Ok(exit::OK)
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub pod: String,
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// The command, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn exec(a: ExecArgs) -> Result<i32> {
    let st = status_of(&a.mesh)?;
    let pod = find_pod(&st, &a.pod)?;
    let exe = std::env::current_exe().context("locating the isthmus binary")?;
    let mut path = exe
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    path.push(':');
    path.push_str(&std::env::var("PATH").unwrap_or_default());
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .args(&a.command)
        .env("PATH", path)
        .env("HOSTNAME", &pod.name)
        .status()
        .context("running ip netns exec")?;
    Ok(status.code().unwrap_or(exit::FAILURE))
}
