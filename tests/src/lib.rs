//! Helpers shared by the integration tests: network namespaces, cgroups, probes.
