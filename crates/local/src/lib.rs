//! The local mesh runtime: pods as network namespaces (`isthmus up`). `sockets` reads what a
//! pod listens on, for the LocalhostListener precheck.

pub mod sockets;
