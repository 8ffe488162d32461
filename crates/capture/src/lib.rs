//! Traffic capture rules (istio-iptables compatible)
