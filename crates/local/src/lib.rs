//! The local mesh runtime: pods as network namespaces
