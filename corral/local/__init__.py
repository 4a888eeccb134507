"""Local mode: ``corral run -- <agent>`` sandboxes a command on the developer's own machine
(issue 9; docs/local.md). No server: namespaces, a seccomp filter and corral's egress proxy."""
