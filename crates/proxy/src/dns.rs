//! The agent's DNS proxy (Istio's, on 15053, where capture sends the pod's DNS queries):
//! answers for the hosts of the control plane's name table — a Kubernetes service also by the
//! short names its DNS gives it from this pod's namespace, and a name the resolver's first
//! search domain was appended to by a CNAME to the host — and forwards every other query to
//! the pod's nameservers, from this process, whose traffic capture lets through.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use isthmus_xds::nds::NameTable;
use prometheus_client::metrics::histogram::Histogram;
use simple_dns::rdata::{A, AAAA, CNAME, RData};
use simple_dns::{CLASS, Name, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};

use crate::config::Config;

/// Istio's TTL for the answers it makes: short, so that clients that cache them follow
/// changes soon.
const TTL: u32 = 30;
/// A nameserver that has not answered by then is given up for the next.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A client's TCP connection is closed after this long without a query.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries handled at once; more wait (UDP ones in the socket's buffer).
const IN_FLIGHT: usize = 256;
/// The largest UDP answer to a client that advertises no more (RFC 1035), and the most any
/// may advertise here.
const UDP_MIN: usize = 512;
const UDP_MAX: usize = 4096;

/// The registry of Kubernetes services in the name table.
const KUBERNETES: &str = "Kubernetes";

/// What the agent answers for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Addresses(Vec<Ipv4Addr>, Vec<Ipv6Addr>),
    /// The name is another with a search domain appended: answered by a CNAME to it.
    Alias(String),
}

/// The names of a name table as DNS asks for them (lower case, with the final dot).
#[derive(Debug, Default)]
struct Table {
    names: HashMap<String, Entry>,
}

impl Table {
    /// The table for a proxy in `namespace` of cluster domain `domain` (`cluster.local`),
    /// whose resolver searches `search`, as Istio's agent builds it.
    fn build(nt: &NameTable, namespace: &str, domain: &str, search: &[String]) -> Table {
        let svc_domain = format!(".svc.{domain}");
        let mut names = HashMap::new();
        for (host, info) in &nt.table {
            let (mut v4, mut v6) = (Vec::new(), Vec::new());
            for ip in info.ips.iter().filter_map(|i| i.parse::<IpAddr>().ok()) {
                match ip {
                    IpAddr::V4(a) => v4.push(a),
                    IpAddr::V6(a) => v6.push(a),
                }
            }
            if v4.is_empty() && v6.is_empty() {
                continue;
            }
            let mut hosts = vec![fqdn(host)];
            // `name.ns`, `name.ns.svc` and, from the same namespace, `name`: what a pod's
            // resolver sends for the short forms it is given.
            if info.registry == KUBERNETES
                && !info.shortname.is_empty()
                && host.ends_with(&svc_domain)
            {
                let (name, ns) = (&info.shortname, &info.namespace);
                hosts.push(fqdn(&format!("{name}.{ns}")));
                hosts.push(fqdn(&format!("{name}.{ns}.svc")));
                if *ns == namespace {
                    hosts.push(fqdn(name));
                }
            }
            hosts.extend(info.alt_hosts.iter().map(|h| fqdn(h)));
            for h in &hosts {
                names.insert(h.clone(), Entry::Addresses(v4.clone(), v6.clone()));
            }
            // The resolver tries the first search domain first (`reviews.ns.svc.cluster.local`
            // + `.ns.svc.cluster.local`): a CNAME back to the host spares the rest of the
            // search and the upstream queries it would make.
            if let Some(first) = search.first() {
                for h in hosts.iter().filter(|h| !h.starts_with("*.")) {
                    let expanded = fqdn(&format!("{h}{}", first.trim_end_matches('.')));
                    names
                        .entry(expanded)
                        .or_insert_with(|| Entry::Alias(h.clone()));
                }
            }
        }
        Table { names }
    }

    /// The entry for `name` (an FQDN in lower case), or for the closest wildcard host that
    /// covers it (`*.example.com.` for `a.b.example.com.`).
    fn get(&self, name: &str) -> Option<&Entry> {
        if let Some(e) = self.names.get(name) {
            return Some(e);
        }
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if parent.is_empty() {
                break;
            }
            if let Some(e) = self.names.get(&format!("*.{parent}")) {
                return Some(e);
            }
            rest = parent;
        }
        None
    }

    fn len(&self) -> usize {
        self.names.len()
    }
}

fn fqdn(host: &str) -> String {
    let mut h = host.to_ascii_lowercase();
    if !h.ends_with('.') {
        h.push('.');
    }
    h
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// Send this answer.
    Local(Vec<u8>),
    /// Not a name of the table: ask the nameservers.
    Forward,
}

/// The answer to `query` from `table` (None before the control plane sent one: the query
/// fails, as Istio's agent answers before it has synced), at most `max` bytes long.
fn answer(table: Option<&Table>, query: &[u8], max: usize) -> Reply {
    let Ok(q) = Packet::parse(query) else {
        return Reply::Local(failure(query, RCODE::FormatError));
    };
    let Some(question) = q.questions.first() else {
        return Reply::Local(failure(query, RCODE::ServerFailure));
    };
    let Some(table) = table else {
        return Reply::Local(failure(query, RCODE::ServerFailure));
    };
    let asked = fqdn(&question.qname.to_string());
    let wants = match question.qtype {
        QTYPE::TYPE(TYPE::A) => TYPE::A,
        QTYPE::TYPE(TYPE::AAAA) => TYPE::AAAA,
        // Other record types of our names are the nameservers' to answer, as Istio does.
        _ => return Reply::Forward,
    };
    let Some(entry) = table.get(&asked) else {
        return Reply::Forward;
    };
    let mut reply = Packet::new_reply(q.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.questions.push(question.clone());
    let (owner, addresses) = match entry {
        Entry::Alias(target) => {
            let Some(Entry::Addresses(v4, v6)) = table.names.get(target) else {
                return Reply::Forward;
            };
            reply.answers.push(ResourceRecord::new(
                question.qname.clone(),
                CLASS::IN,
                TTL,
                RData::CNAME(CNAME(Name::new_unchecked(target.trim_end_matches('.')))),
            ));
            (Name::new_unchecked(target.trim_end_matches('.')), (v4, v6))
        }
        Entry::Addresses(v4, v6) => (question.qname.clone(), (v4, v6)),
    };
    // A known name without addresses of the type asked is NOERROR with no answer, not
    // NXDOMAIN, which clients asking for A and AAAA at once would take for both.
    let mut records: Vec<RData> = match wants {
        TYPE::A => addresses.0.iter().map(|a| RData::A(A::from(*a))).collect(),
        _ => addresses
            .1
            .iter()
            .map(|a| RData::AAAA(AAAA::from(*a)))
            .collect(),
    };
    // Spread clients over a headless service's pods, as Kubernetes' DNS does.
    if records.len() > 1 {
        let turn = rand::random_range(0..records.len());
        records.rotate_left(turn);
    }
    reply.answers.extend(
        records
            .into_iter()
            .map(|r| ResourceRecord::new(owner.clone(), CLASS::IN, TTL, r)),
    );
    let bytes = match reply.build_bytes_vec_compressed() {
        Ok(b) => b,
        Err(_) => return Reply::Local(failure(query, RCODE::ServerFailure)),
    };
    if bytes.len() <= max {
        return Reply::Local(bytes);
    }
    // Too long for the client's UDP: it asks again over TCP.
    reply.answers.clear();
    reply.set_flags(PacketFlag::TRUNCATION);
    Reply::Local(
        reply
            .build_bytes_vec_compressed()
            .unwrap_or_else(|_| failure(query, RCODE::ServerFailure)),
    )
}

/// A reply to `query` with `rcode` and nothing else: its question when it parses, only its
/// id when not (a query too short for one gets an id of 0).
fn failure(query: &[u8], rcode: RCODE) -> Vec<u8> {
    let id = query
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let mut reply = Packet::new_reply(id);
    if let Ok(q) = Packet::parse(query) {
        reply.questions.extend(q.questions.into_iter().take(1));
    }
    *reply.rcode_mut() = rcode;
    reply.build_bytes_vec().unwrap_or_default()
}

/// The largest UDP answer `query`'s client takes: what its EDNS record advertises, within
/// bounds, else 512 bytes.
fn udp_limit(query: &[u8]) -> usize {
    Packet::parse(query)
        .ok()
        .and_then(|q| q.opt().map(|o| usize::from(o.udp_packet_size)))
        .map_or(UDP_MIN, |n| n.clamp(UDP_MIN, UDP_MAX))
}

/// The agent's DNS metrics, exported on 15020 with Istio's names.
#[derive(Debug)]
pub struct DnsStats {
    pub requests: AtomicU64,
    pub upstream_requests: AtomicU64,
    pub upstream_failures: AtomicU64,
    /// Seconds a forwarded query took, all nameservers tried (Istio's buckets).
    pub upstream_duration: Histogram,
}

impl Default for DnsStats {
    fn default() -> DnsStats {
        DnsStats {
            requests: AtomicU64::new(0),
            upstream_requests: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            upstream_duration: Histogram::new([0.001, 0.005, 0.01, 0.1, 1.0, 5.0]),
        }
    }
}

/// The DNS proxy: the current table and where the rest goes.
pub struct Resolver {
    table: watch::Receiver<Option<Arc<Table>>>,
    nameservers: Vec<SocketAddr>,
    stats: Arc<DnsStats>,
    in_flight: Arc<Semaphore>,
}

impl Resolver {
    /// A resolver whose table follows the configuration's name table, rebuilt when a new one
    /// arrives, for a pod in `namespace` of cluster domain `domain`; names the table does not
    /// know go to `nameservers`.
    pub fn start(
        mut config: watch::Receiver<Arc<Config>>,
        namespace: String,
        domain: String,
        search: Vec<String>,
        nameservers: Vec<SocketAddr>,
        stats: Arc<DnsStats>,
    ) -> Arc<Resolver> {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let nt = config
                    .borrow_and_update()
                    .xds
                    .name_tables
                    .values()
                    .next()
                    .cloned();
                if let Some(nt) = nt
                    && last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &nt))
                {
                    match nt.decode() {
                        Ok(decoded) => {
                            let table = Table::build(&decoded, &namespace, &domain, &search);
                            tracing::debug!(names = table.len(), "DNS table updated");
                            tx.send_replace(Some(Arc::new(table)));
                        }
                        Err(e) => tracing::warn!(error = %e, "name table does not decode"),
                    }
                    last = Some(nt);
                }
                if config.changed().await.is_err() {
                    return;
                }
            }
        });
        Arc::new(Resolver {
            table: rx,
            nameservers,
            stats,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
        })
    }

    /// The answer to `query`, from the table or the nameservers (over TCP when `tcp`).
    async fn resolve(&self, query: &[u8], tcp: bool) -> Vec<u8> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let table = self.table.borrow().clone();
        let max = if tcp {
            usize::from(u16::MAX)
        } else {
            udp_limit(query)
        };
        match answer(table.as_deref(), query, max) {
            Reply::Local(bytes) => bytes,
            Reply::Forward => {
                self.stats.upstream_requests.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let took = || {
                    self.stats
                        .upstream_duration
                        .observe(started.elapsed().as_secs_f64());
                };
                for server in &self.nameservers {
                    let asked = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                        if tcp {
                            exchange_tcp(*server, query).await
                        } else {
                            exchange_udp(*server, query).await
                        }
                    });
                    match asked.await {
                        Ok(Ok(bytes)) => {
                            took();
                            return bytes;
                        }
                        Ok(Err(e)) => tracing::debug!(%server, error = %e, "nameserver failed"),
                        Err(_) => tracing::debug!(%server, "nameserver did not answer in time"),
                    }
                }
                took();
                self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                failure(query, RCODE::ServerFailure)
            }
        }
    }

    /// Answers the queries that come to `socket`, each in its own task.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; usize::from(u16::MAX)];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS receive failed");
                    continue;
                }
            };
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            let (me, socket, query) = (self.clone(), socket.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                let bytes = me.resolve(&query, false).await;
                let _ = socket.send_to(&bytes, from).await;
                drop(permit);
            });
        }
    }

    /// Answers the queries of each connection to `listener` (length-prefixed, RFC 1035 4.2.2).
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: give the connections in hand time to close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.connection(stream).await {
                    tracing::debug!(error = %e, "DNS connection ended");
                }
            });
        }
    }

    async fn connection(&self, mut stream: TcpStream) -> std::io::Result<()> {
        loop {
            let Ok(query) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await else {
                return Ok(());
            };
            let Some(query) = query? else {
                return Ok(());
            };
            let _permit = self.in_flight.acquire().await;
            let bytes = self.resolve(&query, true).await;
            write_framed(&mut stream, &bytes).await?;
        }
    }
}

/// One query to a nameserver over UDP, from a socket of its own (so that only that server's
/// answer to this query comes back to it).
async fn exchange_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Another query's late answer, or a forgery: not this one's.
        if n >= 2 && buf[..2] == query[..2.min(query.len())] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// One query to a nameserver over TCP.
async fn exchange_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream)
        .await?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
}

/// A length-prefixed message (at most 64 KiB by its prefix); None at a clean end of stream.
async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_xds::nds::NameInfo;

    fn table() -> Table {
        let info = |ips: &[&str], registry: &str, short: &str, ns: &str| NameInfo {
            ips: ips.iter().map(|s| s.to_string()).collect(),
            registry: registry.into(),
            shortname: short.into(),
            namespace: ns.into(),
            alt_hosts: Vec::new(),
        };
        let mut nt = NameTable::default();
        for (host, i) in [
            (
                "reviews.shop.svc.cluster.local",
                info(&["10.96.0.7"], "Kubernetes", "reviews", "shop"),
            ),
            (
                "ratings.other.svc.cluster.local",
                info(&["10.96.0.8", "fd00::8"], "Kubernetes", "ratings", "other"),
            ),
            (
                "db.shop.svc.cluster.local",
                info(
                    &["10.1.0.1", "10.1.0.2", "10.1.0.3"],
                    "Kubernetes",
                    "db",
                    "shop",
                ),
            ),
            (
                "api.example.test",
                info(&["240.240.0.1"], "External", "", ""),
            ),
            ("*.wild.test", info(&["240.240.0.2"], "External", "", "")),
        ] {
            nt.table.insert(host.into(), i);
        }
        Table::build(
            &nt,
            "shop",
            "cluster.local",
            &["shop.svc.cluster.local".into(), "svc.cluster.local".into()],
        )
    }

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut q = Packet::new_query(0x1234);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(simple_dns::Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        q.build_bytes_vec().unwrap()
    }

    /// The answer's code and records as text (`A 10.0.0.1`, `CNAME x`).
    fn ask(t: Option<&Table>, name: &str, qtype: TYPE, max: usize) -> (RCODE, Vec<String>, bool) {
        let Reply::Local(bytes) = answer(t, &query(name, qtype), max) else {
            return (RCODE::NoError, vec!["forward".into()], false);
        };
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.id(), 0x1234);
        let records = p
            .answers
            .iter()
            .map(|r| match &r.rdata {
                RData::A(a) => format!("{} A {}", r.name, Ipv4Addr::from(a.address)),
                RData::AAAA(a) => format!("{} AAAA {}", r.name, Ipv6Addr::from(a.address)),
                RData::CNAME(c) => format!("{} CNAME {}", r.name, c.0),
                other => format!("{other:?}"),
            })
            .collect();
        (p.rcode(), records, p.has_flags(PacketFlag::TRUNCATION))
    }

    #[test]
    fn services_answer_by_every_name_a_pod_of_the_namespace_uses() {
        let t = table();
        for name in [
            "reviews.shop.svc.cluster.local",
            "reviews.shop.svc",
            "reviews.shop",
            "reviews",
            "REVIEWS.Shop",
        ] {
            let (code, records, _) = ask(Some(&t), name, TYPE::A, UDP_MIN);
            assert_eq!(code, RCODE::NoError, "{name}");
            assert_eq!(records, [format!("{name} A 10.96.0.7")], "{name}");
        }
        // Another namespace's service has no one-label name here.
        assert_eq!(ask(Some(&t), "ratings", TYPE::A, UDP_MIN).1, ["forward"]);
        assert_eq!(
            ask(Some(&t), "ratings.other", TYPE::AAAA, UDP_MIN).1,
            ["ratings.other AAAA fd00::8"]
        );
        // A known name without an address of the type asked: no answer, but no NXDOMAIN.
        let (code, records, _) = ask(Some(&t), "reviews", TYPE::AAAA, UDP_MIN);
        assert_eq!((code, records.len()), (RCODE::NoError, 0));
        // The first search domain appended to a host: a CNAME to it, with its address.
        assert_eq!(
            ask(
                Some(&t),
                "api.example.test.shop.svc.cluster.local",
                TYPE::A,
                UDP_MIN
            )
            .1,
            [
                "api.example.test.shop.svc.cluster.local CNAME api.example.test",
                "api.example.test A 240.240.0.1"
            ]
        );
        // Wildcard hosts cover their subdomains, answered under the name asked.
        assert_eq!(
            ask(Some(&t), "a.b.wild.test", TYPE::A, UDP_MIN).1,
            ["a.b.wild.test A 240.240.0.2"]
        );
    }

    #[test]
    fn other_names_and_types_go_upstream_and_bad_queries_fail() {
        let t = table();
        assert_eq!(
            ask(Some(&t), "example.com", TYPE::A, UDP_MIN).1,
            ["forward"]
        );
        assert_eq!(ask(Some(&t), "reviews", TYPE::MX, UDP_MIN).1, ["forward"]);
        // Before the control plane's table, as Istio's agent: a failure.
        assert_eq!(
            ask(None, "reviews", TYPE::A, UDP_MIN).0,
            RCODE::ServerFailure
        );
        for bad in [&b""[..], &b"\x12"[..], &b"\x12\x34\x01\x00\x00\x05"[..]] {
            let Reply::Local(bytes) = answer(Some(&t), bad, UDP_MIN) else {
                panic!("{bad:?} forwarded");
            };
            let p = Packet::parse(&bytes).unwrap();
            assert_eq!(p.rcode(), RCODE::FormatError, "{bad:?}");
        }
    }

    #[test]
    fn an_answer_too_long_for_udp_is_truncated_and_pods_are_spread() {
        let t = table();
        let (_, records, truncated) = ask(Some(&t), "db", TYPE::A, 40);
        assert!(truncated && records.is_empty());
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..60 {
            let (_, records, truncated) = ask(Some(&t), "db", TYPE::A, UDP_MIN);
            assert!(!truncated);
            assert_eq!(records.len(), 3);
            firsts.insert(records[0].clone());
        }
        assert_eq!(firsts.len(), 3, "{firsts:?}");
    }

    /// One A query over UDP: the answer's code and first address.
    async fn over_udp(client: &UdpSocket, name: &str) -> (RCODE, Option<String>) {
        let mut buf = vec![0u8; 4096];
        client.send(&query(name, TYPE::A)).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let p = Packet::parse(&buf[..n]).unwrap();
        let first = p.answers.first().map(|r| match &r.rdata {
            RData::A(a) => Ipv4Addr::from(a.address).to_string(),
            other => format!("{other:?}"),
        });
        (p.rcode(), first)
    }

    /// A nameserver on loopback that answers every A query with 192.0.2.1.
    async fn nameserver() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let q = Packet::parse(&buf[..n]).unwrap();
                let mut r = Packet::new_reply(q.id());
                r.questions.push(q.questions[0].clone());
                r.answers.push(ResourceRecord::new(
                    q.questions[0].qname.clone(),
                    CLASS::IN,
                    60,
                    RData::A(A::from(Ipv4Addr::new(192, 0, 2, 1))),
                ));
                let _ = socket.send_to(&r.build_bytes_vec().unwrap(), from).await;
            }
        });
        addr
    }

    /// Queries over real sockets: the table's names answered, others asked of the first
    /// nameserver that answers (a closed port is given up for the next), all counted.
    #[tokio::test]
    async fn the_resolver_answers_over_udp_and_tcp_and_forwards_the_rest() {
        let closed = {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.local_addr().unwrap()
        };
        let upstream = nameserver().await;
        let mut nt = NameTable::default();
        nt.table.insert(
            "reviews.shop.svc.cluster.local".into(),
            NameInfo {
                ips: vec!["10.96.0.7".into()],
                registry: "Kubernetes".into(),
                shortname: "reviews".into(),
                namespace: "shop".into(),
                alt_hosts: Vec::new(),
            },
        );
        let mut xds = isthmus_xds::client::XdsState::default();
        xds.name_tables.insert(String::new(), Arc::new(nt.into()));
        let (_config, rx) = watch::channel(Arc::new(Config {
            xds: Arc::new(xds),
            ..Config::default()
        }));
        let stats = Arc::new(DnsStats::default());
        let resolver = Resolver::start(
            rx,
            "shop".into(),
            "cluster.local".into(),
            Vec::new(),
            vec![closed, upstream],
            stats.clone(),
        );
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_at, tcp_at) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        tokio::spawn(resolver.clone().serve_udp(udp));
        tokio::spawn(resolver.serve_tcp(tcp));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(udp_at).await.unwrap();
        // The table arrives from the configuration a moment after the start.
        let mut local = (RCODE::ServerFailure, None);
        for _ in 0..50 {
            local = over_udp(&client, "reviews").await;
            if local.0 == RCODE::NoError {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(local, (RCODE::NoError, Some("10.96.0.7".into())));
        assert_eq!(
            over_udp(&client, "example.com").await,
            (RCODE::NoError, Some("192.0.2.1".into()))
        );

        let mut stream = TcpStream::connect(tcp_at).await.unwrap();
        write_framed(&mut stream, &query("reviews.shop", TYPE::A))
            .await
            .unwrap();
        let answer = read_framed(&mut stream).await.unwrap().unwrap();
        let p = Packet::parse(&answer).unwrap();
        assert!(
            matches!(&p.answers[0].rdata, RData::A(a) if Ipv4Addr::from(a.address) == Ipv4Addr::new(10, 96, 0, 7))
        );

        assert!(stats.requests.load(Ordering::Relaxed) >= 3);
        assert_eq!(stats.upstream_requests.load(Ordering::Relaxed), 1);
        assert_eq!(stats.upstream_failures.load(Ordering::Relaxed), 0);
    }
}
